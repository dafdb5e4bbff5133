"""The xT app: a Gradio page for any xT model (classification, segmentation, detection), above the library.

    xt-hf app --model M              (also python -m xt_hf_cli app; without --model, the packaged demo model)

- `inference`: loading a model for its task, reading images region by region through the engine, the pictures;
- `relevance`: how much each region's tokens moved a classifier's answer (where the context came from);
- `ui`: the Gradio page (`build_app`), the one module that imports Gradio;
- `space`: the `app.py` and README of a Hugging Face Space for a model repo;
- `browser`: drives the page in headless Chromium (the browser test and the documentation's screenshots).

Nothing in `xt_hf` imports this package. Gradio is the `app` extra (`pip install xt-hf[app]`): importing this
package needs only the library; `build_app` and `launch` need Gradio.
"""

from __future__ import annotations

GRADIO_MISSING = "the xT app needs Gradio: pip install 'xt-hf[app]'"


def require_gradio() -> None:
    """Raise `ImportError` with one line naming the extra when Gradio is not installed."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise ImportError(GRADIO_MISSING)


def build_app(model, **options):
    """The Gradio page for `model` (a folder, a Hub repo id or a loaded model): see `xt_hf_app.ui.build_app`."""
    require_gradio()
    from .ui import build_app as build

    return build(model, **options)


def launch(model, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False, **options) -> None:
    """Serve the page for `model` until interrupted."""
    build_app(model, **options).launch(server_name=host, server_port=port, share=share)


__all__ = ["GRADIO_MISSING", "build_app", "launch", "require_gradio"]
