"""The xT app for xt-hf/swin-l-nonxl-256, as a Hugging Face Space (written by conversion/make_model_cards.py).

Locally: pip install "xt-hf[app]" && xt-hf app --model xt-hf/swin-l-nonxl-256
"""

from xt_hf_app import build_app

demo = build_app("xt-hf/swin-l-nonxl-256")

if __name__ == "__main__":
    demo.launch()
