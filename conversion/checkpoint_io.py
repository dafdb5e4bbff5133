"""Read released xT checkpoints safely: tensors only, any device, with or without the trainer payload."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason in words."""


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The original model's state dict from a `.ckpt`, CPU, contiguous, `module.` prefix stripped.

    Accepts the trainer payload (`{"state_dict": ..., "optimizer_state_dict": ..., ...}`) and a bare
    state dict. Never unpickles arbitrary objects (`weights_only=True`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist or is not a file.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        global_name = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if global_name:
            raise CheckpointError(
                f"Refusing to load {path}: it needs to unpickle arbitrary Python objects ({global_name.group(1)}), "
                f"which could run code. Only tensor checkpoints are accepted (torch.load(weights_only=True))."
            ) from error
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?).") from error
    except Exception as error:  # noqa: BLE001 - garbage bytes surface as KeyError, IndexError, EOFError, ...
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {str(error).splitlines()[0]}"
        ) from error

    state_dict = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError(f"{path} holds no state dict (found {type(payload).__name__}).")
    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor.")
        # Released weights were saved on GPU and in channels_last; safetensors needs contiguous storage.
        tensors[key.removeprefix("module.")] = value.detach().to("cpu").contiguous()
    return tensors
