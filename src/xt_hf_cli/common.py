"""What every inference command shares: loading a model for a task, the device, and usage errors."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn


def fail(message: str) -> NoReturn:
    """A usage error: one line naming the problem, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer ≥ 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def band_numbers(text: str) -> tuple[int, ...]:
    """argparse type: 1-based band numbers separated by commas, `1,2` (as GDAL and rasterio number bands)."""
    try:
        bands = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected band numbers separated by commas, such as 1,2; got {text!r}")
    if any(band < 1 for band in bands):
        raise argparse.ArgumentTypeError(f"bands are numbered from 1; got {text!r}")
    return bands


def add_streaming_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every whole-scene command shares: batching, reading, device, precision, spilling."""
    parser.add_argument("--region-batch-size", type=positive_int, metavar="N",
                        help="regions encoded at a time (default: the model's saved config.region_batch_size)")
    parser.add_argument("--token-chunk-size", type=positive_int, metavar="N",
                        help="context tokens whose per-token layers run at a time, in place (default: the model's "
                             "saved config.context_token_chunk_size)")
    parser.add_argument("--num-workers", type=non_negative_int, default=0, help="background processes reading regions")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--spill-dir", help="CPU: keep the context encoder's token buffers in files in this directory "
                        "(memory then holds chunks; the disk needs about twice the token grid)")
    parser.add_argument("--rescale-factor", type=float, help="multiply raw pixels by this before normalising "
                        "(default: the model's processor setting, else by data type: uint8 1/255, uint16 1/65535, "
                        "floats as they are)")
    parser.add_argument("--bands", type=band_numbers, metavar="1,2", help="the bands (channels) to read, numbered "
                        "from 1, in order (default: all); a GeoTIFF reads only these")


def with_rescale_factor(processor, model, rescale_factor: float | None):
    """The image processor to stream with: `--rescale-factor`, when given, replaces the processor's (or the
    default processor's) rescaling."""
    if rescale_factor is None:
        return processor
    if rescale_factor <= 0:
        fail(f"--rescale-factor {rescale_factor}: must be positive")
    if processor is None:
        from xt_hf import XTImageProcessor

        processor = XTImageProcessor(region_size=model.config.region_size)
    processor.rescale_factor, processor.do_rescale = rescale_factor, True
    return processor


def resolve_device(name: str, state=None):
    """`auto` → CUDA when available, else CPU; a device that is not there is a usage error. One of several
    processes (`state`, Accelerate's `PartialState`) takes its own GPU for `auto` and `cuda`."""
    import torch

    if state is not None and name in ("auto", "cuda"):
        if name == "cuda" and not torch.cuda.is_available():
            fail(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        return state.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    return device


def _looks_like_a_path(model_id: str) -> bool:
    return model_id.startswith((".", "/", "~")) or model_id.count("/") != 1 or Path(model_id).exists()


def load_for_inference(auto_class, model_id: str, device, dtype, *, task: str):
    """`(model in eval mode on device/dtype, image processor or None)` for `task` (e.g. "xt-hf segment").

    Fails with one line, exit status 2, before any work: a missing folder, a model that is not xT, and a
    model without trained weights for the head `auto_class` builds (loading a classifier as a segmenter
    would otherwise give a randomly initialised head and plausible-looking noise).
    """
    from transformers import AutoConfig, AutoImageProcessor
    from transformers.utils import logging as transformers_logging

    import xt_hf  # noqa: F401  (registers the xT classes with the Auto classes)

    if _looks_like_a_path(model_id) and not Path(model_id).expanduser().is_dir():
        fail(f"--model {model_id}: no such folder (give a folder written by save_pretrained or a Hub id)")
    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=True)
    except (OSError, ValueError) as error:
        fail(f"cannot load the model {model_id!r}: {error}")
    if config.model_type != "xt":
        fail(f"--model {model_id} is a {config.model_type!r} model, not an xT model")
    verbosity, progress_bar = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()  # the missing-weights report is ours to give, as one line
    transformers_logging.disable_progress_bar()  # a usage error is one line, not a loading bar and then the line
    try:
        model, info = auto_class.from_pretrained(model_id, trust_remote_code=True, output_loading_info=True)
    except (OSError, ValueError) as error:
        fail(f"cannot load the model {model_id!r}: {error}")
    finally:
        transformers_logging.set_verbosity(verbosity)
        if progress_bar:
            transformers_logging.enable_progress_bar()
    if info["missing_keys"]:
        trained = ", ".join(config.architectures or ["an unknown head"])
        missing = sorted(info["missing_keys"])
        fail(f"--model {model_id} is {trained}; {task} needs an {type(model).__name__}, and "
             f"{len(missing)} of its weights are not in the checkpoint (e.g. {missing[0]})")
    try:
        processor = AutoImageProcessor.from_pretrained(model_id, trust_remote_code=True)
    except (OSError, ValueError):
        processor = None  # no preprocessor_config.json: ImageNet statistics, as the original
    return model.to(device, dtype).eval(), processor


def load_streaming_model(arguments: argparse.Namespace, auto_class, *, task: str, state=None):
    """What every whole-scene command does before its work: the spill directory checked, the device resolved
    (one of several processes, `state`, takes its own GPU), the model loaded for `task` and the processor given
    `--rescale-factor`. Returns `(model, processor, device)`."""
    import torch

    check_spill_directory(arguments.spill_dir)
    device = resolve_device(arguments.device, state)
    model, processor = load_for_inference(auto_class, arguments.model, device, getattr(torch, arguments.dtype),
                                          task=task)
    return model, with_rescale_factor(processor, model, arguments.rescale_factor), device


def open_input(image, region_size: int | None = None, bands: tuple[int, ...] | None = None):
    """The region source of `image` (a path, or a source opened earlier), or a usage error naming the file and
    the problem. Called before the model loads, so that a file that cannot be an image (another array layout,
    truncated, a header that claims data the file lacks) is named at once rather than after minutes of loading;
    then again with the model's `region_size`."""
    from xt_hf.engine import open_region_source

    try:
        return open_region_source(image, region_size, bands=bands)
    except ValueError as error:
        fail(str(error))


def check_spill_directory(path: str | None) -> None:
    """A spill directory must exist before an hour of region encoding starts."""
    if path is None or Path(path).is_dir():
        return
    if Path(path).exists():
        fail(f"--spill-dir {path}: not a directory (the spill directory must be an existing folder)")
    fail(f"--spill-dir {path}: the spill directory does not exist (create it first)")


# Many inputs, one results table (xt_hf.engine.batch does the work; these are the command-line pieces).

TABLE_SUFFIXES = (".parquet", ".jsonl")  # as xt_hf.engine.batch.TABLE_SUFFIXES, without importing torch


def is_table(path: str | None) -> bool:
    """Whether `--output` names a results table (many inputs) rather than one image's output."""
    return path is not None and Path(path).suffix.lower() in TABLE_SUFFIXES


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output (without it an "
                        "existing file is refused, except a results table of the same command, model and options, "
                        "which is resumed)")


def add_inputs_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="TIFF/BigTIFF, .npy, zarr, whole-slide image, PNG/JPEG; with --output results.parquet "
                             "or .jsonl also several files, glob patterns, folders, CSV/JSONL manifests or saved "
                             "datasets with a 'path' column")


def run_many(arguments: argparse.Namespace, *, command: str, auto_class, columns: dict[str, str], signature: dict,
             make_work) -> None:
    """Run `command` over many inputs into the `--output` table; exit 0 when every input succeeded, else 1.

    `make_work(model, processor, images)` returns the function that turns one input into its row's results.
    Usage errors (no inputs, an output that cannot be written, a file at `--output` that is not a table of this
    very run to resume and no `--overwrite`) stop before the model loads. Under `accelerate launch` / `torchrun`
    the inputs are shared between the processes.
    """
    from xt_hf.engine.batch import check_table_output, distributed_state, expand_inputs, run_batch

    if getattr(arguments, "bands", None) is not None:  # until the engine's batch path reads bands: never ignore them
        fail("--bands works on one input at a time, not yet with a results table --output")
    output = Path(arguments.output)
    model_id = os.path.realpath(arguments.model) if Path(arguments.model).expanduser().exists() else arguments.model
    signature = {"command": command, "model": model_id, "dtype": arguments.dtype,
                 "rescale_factor": arguments.rescale_factor, **signature}
    try:
        check_table_output(output, signature, overwrite=arguments.overwrite)
    except ValueError as error:
        fail(f"--output {output}: {error}")
    try:
        images = expand_inputs(arguments.images)
    except ValueError as error:
        fail(str(error))
    state = distributed_state(cpu=arguments.device == "cpu")
    model, processor, _ = load_streaming_model(arguments, auto_class, task=f"xt-hf {command}", state=state)
    summary = run_batch(images, make_work(model, processor, images), output, columns=columns, signature=signature,
                        state=state, fresh=arguments.overwrite)
    if state is None or state.is_main_process:
        print(summary.line(f"xt-hf {command}"))
    if summary.failed:
        sys.exit(1)


def scene_options(arguments: argparse.Namespace, processor, *, progress: bool):
    """The engine's `SceneOptions` from the whole-scene flags; an unset `--region-batch-size` or `--token-chunk-size`
    stays None, so the engine uses the model's saved value."""
    from xt_hf.engine.scene import SceneOptions

    return SceneOptions(processor=processor, region_batch_size=arguments.region_batch_size,
                        token_chunk_size=arguments.token_chunk_size, num_workers=arguments.num_workers,
                        progress=progress, spill_directory=arguments.spill_dir,
                        shard_regions=getattr(arguments, "shard_regions", False))


def add_preview_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """`--preview out.png` and its size: a downsampled picture of the scene with `what` drawn over it."""
    parser.add_argument("--preview", metavar="PNG", help=f"also draw the scene, downsampled, with {what} and a "
                        "legend into this .png (from the file's overviews when it has them; memory bounded by the "
                        "picture)")
    parser.add_argument("--preview-size", type=positive_int, default=1024, metavar="PX",
                        help="the preview's longer side in pixels (default 1024)")


def check_preview_output(arguments: argparse.Namespace):
    """The `--preview` path checked before any work (a `.png` in a writable folder, not replacing a file without
    `--overwrite`), or None when no preview was asked for."""
    if arguments.preview is None:
        return None
    from xt_hf.engine.writers import check_output_path

    if arguments.preview_size < 16:
        fail(f"--preview-size {arguments.preview_size}: at least 16 px")
    try:
        return check_output_path(arguments.preview, suffixes=(".png",), overwrite=arguments.overwrite)
    except ValueError as error:
        fail(f"--preview {arguments.preview}: {error}")
