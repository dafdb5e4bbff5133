"""Convert a released xT checkpoint into a Hub-ready transformers repo, and prove it equal to the original.

    python -m conversion.convert_original_checkpoint --checkpoint swin-t-mamba-512-256-top1.ckpt \\
        --variant swin-t-mamba-512-256 --output xt-swin-t-mamba --verify io.safetensors

Steps: read the checkpoint safely (tensors only) → build the XTConfig of the variant → rename every key
with the declarative table of `key_mapping.py` → fail, naming them, on any missing, unexpected,
unmatched or mis-shaped key → load → write config, safetensors weights, image processor, remote code
and a model card → optionally compare with the original model's logits.

Exit status: 0 written; 1 the converted model does not reproduce the --verify outputs (beyond tolerance,
or NaN/inf in its outputs); 2 an unusable input (unreadable, refused or non-finite checkpoint, config or
--verify file of the wrong format, checkpoint of another variant, --output that is a file or not empty).
Nothing is written unless every check passes.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path


def argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="original .ckpt (trainer payload or bare state dict)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--variant", help="released variant: original config name or Hub name")
    source.add_argument("--original-config", help="original YAML config, or JSON with its `model_config`")
    parser.add_argument("--output", required=True, type=Path, help="folder to write the repo into")
    parser.add_argument("--labels", help="class names: JSON list / {id: name}, or one name per line")
    parser.add_argument("--verify", help="safetensors with `pixel_values` and the original's `logits`")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --output")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the written folder to this Hub repo")
    return parser


if __package__ in (None, ""):
    sys.exit(f"Run this as a module from the repository root: python -m conversion.{Path(__file__).stem} ...")

if __name__ == "__main__":
    # Help and usage errors answer before torch and xt_hf are imported below (seconds; over a minute on a busy
    # machine); `main` parses the same arguments again.
    argument_parser().parse_args()

import torch  # noqa: E402

from .checkpoint_io import (  # noqa: E402
    CheckpointError,
    check_finite,
    describe_file,
    file_kind,
    first_line,
    load_original_state_dict,
    non_finite_entries,
)
from .key_mapping import MappingContext, MappingReport, check_against_model, map_state_dict, rules_for  # noqa: E402
from .model_card import render_model_card  # noqa: E402
from .original_config import (  # noqa: E402
    ConfigError,
    check_model_config,
    read_model_config,
    xt_config_from_original,
)
from xt_hf import XTForImageClassification, XTImageProcessor  # noqa: E402

VARIANTS_FILE = Path(__file__).with_name("variants.json")
LOGITS_TOLERANCE, FEATURES_TOLERANCE = 1e-5, 1e-4  # the float32 noise floor measured by the fixtures
CLASSIFIER_WEIGHT_KEYS = ("decoder.cls.1.weight", "decoder.layers.3.weight")  # "xl" head, "naive" head


class ConversionError(ValueError):
    """A conversion that cannot produce a faithful model, with every reason by name."""


class VerificationError(RuntimeError):
    """The converted model ran but does not reproduce the original's outputs (exit status 1)."""


def load_variants() -> dict[str, dict]:
    return json.loads(VARIANTS_FILE.read_text())


def resolve_variant(name: str) -> tuple[str, dict]:
    """`(original config name, registry entry)` for an original config name or a Hub name."""
    variants = load_variants()
    if name in variants:
        return name, variants[name]
    for config_name, entry in variants.items():
        if entry["hub_name"] == name:
            return config_name, entry
    known = list(variants) + [entry["hub_name"] for entry in variants.values()]
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.4)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConversionError(f"Unknown variant {name!r}.{hint} Known variants are listed in {VARIANTS_FILE}.")


def read_labels(path: str | Path, num_labels: int) -> dict[int, str]:
    """id2label from a JSON list, a JSON {id: name} object, or a text file with one name per line."""
    path = Path(path)
    expected = "expected a JSON list, a JSON {id: name} object, or one name per line"
    if not path.is_file():
        raise ConversionError(f"Labels file {path} does not exist or is not a file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConversionError(f"{path} is a binary file, not class names: {expected}.") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
            names = data if isinstance(data, list) else [data[key] for key in sorted(data, key=int)]
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
            raise ConversionError(f"{path} is not a JSON list or {{id: name}} object: {expected}.") from None
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != num_labels:
        raise ConversionError(f"{path} names {len(names)} labels but the checkpoint's classifier has {num_labels}.")
    return {index: str(name) for index, name in enumerate(names)}


def checkpoint_num_labels(state_dict: dict[str, torch.Tensor]) -> int:
    for key in CLASSIFIER_WEIGHT_KEYS:
        if key in state_dict:
            return state_dict[key].shape[0]
    raise ConversionError(f"No classifier weight ({' or '.join(CLASSIFIER_WEIGHT_KEYS)}) in the checkpoint.")


def convert_checkpoint(
    checkpoint: str | Path,
    *,
    variant: str | None = None,
    original_config: str | Path | None = None,
    labels: str | Path | None = None,
) -> tuple[XTForImageClassification, XTImageProcessor, MappingReport]:
    """Load an original checkpoint into an `XTForImageClassification` of the given variant or config."""
    if (variant is None) == (original_config is None):
        raise ConversionError("Give exactly one of `variant` and `original_config`.")
    state_dict = load_original_state_dict(checkpoint)
    check_finite(state_dict, checkpoint)  # NaN / inf weights would be published as a working model
    if variant is not None:
        _, entry = resolve_variant(variant)
        model_config, overrides = entry["original_config"], {}
    else:
        model_config, overrides = read_model_config(original_config)
        check_model_config(model_config, original_config)

    num_labels = checkpoint_num_labels(state_dict)
    if num_labels != model_config["num_classes"]:
        raise ConversionError(
            f"The checkpoint's classifier has {num_labels} classes but the config says "
            f"{model_config['num_classes']}: is this the checkpoint of another variant?"
        )
    extra = {"id2label": read_labels(labels, num_labels)} if labels else {}
    config = xt_config_from_original(model_config, overrides, **extra)
    model = XTForImageClassification(config)

    backbone_type = config.backbone_config.model_type
    context = MappingContext(hiera_depths=tuple(config.backbone_config.depths) if backbone_type == "hiera" else ())
    mapped, unmatched, duplicated = map_state_dict(state_dict, rules_for(backbone_type, config.classifier), context)
    report = check_against_model(
        mapped, model.state_dict(), MappingReport(unmatched_original=unmatched, duplicated=duplicated)
    )
    if not report.ok:
        raise ConversionError(f"The checkpoint does not fit this variant:\n{report.describe()}")
    model.load_state_dict(mapped, strict=True)
    return model.eval(), XTImageProcessor(region_size=config.region_size), report


REFERENCE_KEYS = ("pixel_values", "logits")


def read_reference(io_file: str | Path) -> dict[str, torch.Tensor]:
    """The original's recorded input and outputs, checked: a safetensors file with finite float tensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    io_file = Path(io_file)
    expected = "expected a safetensors file with the original's `pixel_values` and `logits`"
    if not io_file.is_file():
        raise ConversionError(f"--verify file {io_file} does not exist or is not a file.")
    if file_kind(io_file) != "safetensors":
        raise ConversionError(f"--verify file {io_file} is {describe_file(io_file)}: {expected}.")
    try:
        reference = load_file(str(io_file))
    except (SafetensorError, OSError, ValueError) as error:
        raise ConversionError(f"--verify file {io_file} is unreadable ({first_line(error)}): {expected}.") from None
    missing = [key for key in REFERENCE_KEYS if key not in reference]
    if missing:
        raise ConversionError(f"--verify file {io_file} lacks {', '.join(missing)}: {expected}.")
    reference = {key: value for key, value in reference.items() if key in (*REFERENCE_KEYS, "region_features")}
    bad = non_finite_entries(reference)
    if bad:
        raise ConversionError(f"--verify file {io_file} holds non-finite values in {', '.join(bad)}: "
                              f"record the original's outputs again.")
    return reference


def verify(model: XTForImageClassification, io_file: str | Path | dict) -> dict[str, float]:
    """Max |Δ| between the converted model and the original's recorded outputs on the same input.

    Raises `ConversionError` for an unusable reference and `VerificationError` when the converted model's
    outputs hold NaN or inf (a max |Δ| of nan would otherwise compare as within tolerance).
    """
    reference = io_file if isinstance(io_file, dict) else read_reference(io_file)
    with torch.inference_mode():
        try:
            outputs = model.xt(reference["pixel_values"].float(), output_region_features=True)
        except (RuntimeError, ValueError) as error:
            raise ConversionError(f"The model cannot run on the --verify `pixel_values` of shape "
                                  f"{tuple(reference['pixel_values'].shape)}: {first_line(error)}") from None
        ours = {"logits": model.classifier(outputs.pooler_output)}
        if "region_features" in reference:
            ours["region_features"] = outputs.region_feature_maps[-1]
    bad = non_finite_entries(ours)
    if bad:
        raise VerificationError(f"the converted model's outputs are not finite: {', '.join(bad)}")
    differences = {}
    for name, value in ours.items():
        if value.shape != reference[name].shape:
            raise ConversionError(f"--verify `{name}` has shape {tuple(reference[name].shape)} but the converted "
                                  f"model gives {tuple(value.shape)}: is it the file of another variant?")
        differences[name] = (value - reference[name]).abs().max().item()
    return differences


def write_repo(model, processor, output: Path, model_card: str, overwrite: bool) -> None:
    """Write the Hub repo files. Never deletes anything; refuses a non-empty folder without `overwrite`.

    The files are written into a temporary sibling folder first and moved into place only when all of
    them were written, so a failure leaves no half-written repo behind.
    """
    if output.exists() and not output.is_dir():
        raise ConversionError(f"--output {output} is a file, not a folder: choose a folder path.")
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ConversionError(f"{output} is not empty: choose another --output or pass --overwrite "
                              f"(which replaces only the files this script writes).")
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # the usual permissions (mkdtemp's 0700 would stick to the renamed repo)
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / "README.md").write_text(model_card)
        if not output.exists() or not any(output.iterdir()):
            os.replace(staging, output)  # one rename: the repo appears complete or not at all
            return
        for entry in sorted(staging.iterdir()):
            target = output / entry.name
            if target.is_dir() and not target.is_symlink():
                raise ConversionError(f"{target} is a folder where the repo needs a file: move it away.")
            os.replace(entry, target)
    except OSError as error:
        raise ConversionError(f"could not write {output}: {first_line(error)}; nothing written") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    arguments = argument_parser().parse_args(argv)

    try:
        if arguments.output.exists() and not arguments.output.is_dir():
            raise ConversionError(f"--output {arguments.output} is a file, not a folder: choose a folder path.")
        reference = read_reference(arguments.verify) if arguments.verify else None  # fail before converting
        model, processor, report = convert_checkpoint(
            arguments.checkpoint, variant=arguments.variant, original_config=arguments.original_config,
            labels=arguments.labels,
        )
        print(f"keys: {report.describe()}")
        differences = verify(model, reference) if reference is not None else {}
        for name, difference in differences.items():
            print(f"verify: max |Δ| {name} = {difference:.3g}")
        tolerances = {"logits": LOGITS_TOLERANCE, "region_features": FEATURES_TOLERANCE}
        failed = [name for name, difference in differences.items() if not difference <= tolerances[name]]
        if failed:  # a model that does not reproduce the original is never written
            raise VerificationError(f"{', '.join(failed)} differ from the original beyond tolerance")
        entry = resolve_variant(arguments.variant)[1] if arguments.variant else None
        write_repo(model, processor, arguments.output, render_model_card(entry, model.config), arguments.overwrite)
    except VerificationError as error:
        print(f"error: {error}; nothing written", file=sys.stderr)
        return 1
    except (CheckpointError, ConfigError, ConversionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # unreadable inputs, unwritable output: nothing was left behind
        print(f"error: {first_line(error)}", file=sys.stderr)
        return 2
    print(f"wrote {arguments.output}")

    if arguments.push_to_hub:
        from huggingface_hub import HfApi

        HfApi().create_repo(arguments.push_to_hub, exist_ok=True)
        HfApi().upload_folder(folder_path=arguments.output, repo_id=arguments.push_to_hub)
        print(f"pushed to https://huggingface.co/{arguments.push_to_hub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
