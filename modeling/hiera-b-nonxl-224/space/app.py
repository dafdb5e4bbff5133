"""The xT app for xt-hf/hiera-b-nonxl-224, as a Hugging Face Space (written by conversion/make_model_cards.py).

Locally: pip install "xt-hf[app]" && xt-hf app --model xt-hf/hiera-b-nonxl-224
"""

from xt_hf_app import build_app

demo = build_app("xt-hf/hiera-b-nonxl-224")

if __name__ == "__main__":
    demo.launch()
