"""`xt-hf app --model M`: the xT app, a Gradio page for any xT classifier, segmenter or detector (`xt_hf_app`).

Without `--model`, the packaged demo classifier. Gradio is the `app` extra: `pip install xt-hf[app]`.
"""

from __future__ import annotations

import argparse
import importlib.util

from .common import fail, positive_int


def add_parser(subparsers) -> None:
    """Register `xt-hf app`."""
    parser = subparsers.add_parser(
        "app", help="serve a Gradio page for an xT model (upload or generated example, answer, context map)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--model", help="local folder or Hub id of an xT model (default: the packaged demo model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=positive_int, help="port to listen on (default: Gradio's, 7860 or the next free)")
    parser.add_argument("--share", action="store_true", help="also open a temporary public link through Gradio")
    parser.add_argument("--region-batch-size", type=positive_int, metavar="N",
                        help="regions encoded at a time (default: the model's saved config.region_batch_size)")
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> None:
    if importlib.util.find_spec("gradio") is None:
        fail("xt-hf app needs Gradio: pip install 'xt-hf[app]'")
    from xt_hf_app import launch
    from xt_hf_app.inference import AppError

    from .demo import DEMO_MODEL

    try:
        launch(arguments.model or str(DEMO_MODEL), host=arguments.host, port=arguments.port, share=arguments.share,
               region_batch_size=arguments.region_batch_size)
    except AppError as error:
        fail(str(error))
