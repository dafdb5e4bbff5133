"""`xt-hf embed IMAGES... --model M --output embeddings.parquet`: one pooled embedding per image.

Each image is encoded region by region from disk (`xt_hf.engine.encode_context_streaming`, so a whole slide
works as well as a PNG); its row holds `XTModel`'s `pooler_output` as a list of floats. With `--tokens-dir DIR`
the context-encoded token grid of each image is also written, as `DIR/<input name>.safetensors` holding
`tokens` `(H_S, W_S, hidden)` float32. Resumable and shared between processes as predict and segment are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    add_inputs_argument,
    add_overwrite_argument,
    add_streaming_arguments,
    fail,
    is_table,
    run_many,
    scene_options,
)

COLUMNS = {"path": "string", "embedding": "list<float32>", "tokens": "string", "seconds": "float64",
           "error": "string"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("embed", help="pooled embeddings (and token grids) of many large images")
    add_inputs_argument(parser)
    parser.add_argument("--model", required=True, help="local folder or Hub id of an xT model (any head: its encoder)")
    parser.add_argument("--output", required=True, help="results table: .parquet or .jsonl (one row per input; a "
                        "rerun skips the inputs already done)")
    parser.add_argument("--tokens-dir", help="also write each image's context token grid to "
                        "DIR/<input name>.safetensors")
    add_streaming_arguments(parser)
    add_overwrite_argument(parser)
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> None:
    from transformers import AutoModel

    if not is_table(arguments.output):
        fail(f"--output {arguments.output}: a results table is .parquet or .jsonl")
    folder = None
    if arguments.tokens_dir is not None:
        folder = Path(arguments.tokens_dir)
        if not folder.parent.is_dir():
            fail(f"--tokens-dir {folder}: the folder {folder.parent} does not exist")
        folder.mkdir(exist_ok=True)

    def make_work(model, processor, images):
        from safetensors.torch import save_file

        from xt_hf.engine import encode_context_streaming
        from xt_hf.engine.batch import output_names
        from xt_hf.engine.writers import atomic_write

        names = output_names(images, ".safetensors")

        def work(image: str) -> dict:
            output, (rows, cols) = encode_context_streaming(model, image,
                                                            scene_options(arguments, processor, progress=False))
            row = {"embedding": output.pooler_output[0].float().cpu().tolist(), "tokens": None}
            if folder is not None:
                tokens = output.last_hidden_state[0].float().cpu().reshape(rows, cols, -1).contiguous()
                target = folder / names[image]
                with atomic_write(target) as partial:
                    save_file({"tokens": tokens}, str(partial), metadata={"path": str(image)})
                row["tokens"] = str(target)
            return row

        return work

    run_many(arguments, command="embed", auto_class=AutoModel, columns=COLUMNS,
             signature={"tokens_dir": None if folder is None else str(folder.resolve())}, make_work=make_work)
