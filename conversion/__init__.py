"""Turning the released xT checkpoints into Hub model repositories. Run its commands as modules from the repository
root (`python -m conversion.convert_original_checkpoint`, `python -m conversion.make_model_cards`)."""
