"""Released checkpoints convert completely and reproduce the original model's outputs."""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ORIGINAL_REFERENCES, REGION, REPO_ROOT, SHARED_FIXTURES, tiny_config
from transformers import AutoModelForImageClassification

from conversion.checkpoint_io import CheckpointError, load_original_state_dict
from conversion.convert_original_checkpoint import (
    read_reference,
    ConversionError,
    convert_checkpoint,
    load_variants,
    main,
    resolve_variant,
    verify,
)
from conversion.key_mapping import MappingContext, MappingReport, check_against_model, map_state_dict, rules_for
from conversion.make_model_cards import MODELING, expected_files
from conversion.original_config import ConfigError, read_model_config, xt_config_from_original
from xt_hf import XTForImageClassification, XTImageProcessor


def reference_folders(root: Path) -> list[Path]:
    """The variant folders (`model.ckpt`, `variant.json`, `io.safetensors`) under `root`; none if it is absent."""
    return sorted(path.parent for path in root.glob("*/model.ckpt")) if root.is_dir() else []


# Every clone has the repository's own references; `../shared`'s larger set adds to them where a checkout has it.
REFERENCES = [pytest.param(folder, id=f"repo-{folder.name}") for folder in reference_folders(ORIGINAL_REFERENCES)]
REFERENCES += [pytest.param(folder, id=f"shared-{folder.name}") for folder in reference_folders(SHARED_FIXTURES)]
# Full-size key layouts of the released configurations, built with the original code (the repository's, gzipped),
# and `../shared`'s manifests of the same layouts where a checkout has them.
LAYOUTS = [pytest.param(path, id=f"repo-{path.name.removesuffix('.json.gz')}")
           for path in sorted((ORIGINAL_REFERENCES / "layouts").glob("*.json.gz"))]
LAYOUTS += [pytest.param(path, id=f"shared-{path.stem}") for path in sorted((SHARED_FIXTURES / "manifests").glob("*.json"))]
NAIVE = ORIGINAL_REFERENCES / "swin-naive"  # no context encoder: the naive classification head
HYPER = ORIGINAL_REFERENCES / "swin-hyper"  # the xl head with a HyperAttention context encoder


def test_the_repository_keeps_references_for_every_head_and_region_encoder():
    variants = {folder.name: json.loads((folder / "variant.json").read_text()) for folder in
                reference_folders(ORIGINAL_REFERENCES)}
    assert {"swin-naive", "swin-hyper"} <= variants.keys()
    heads = {variant["model_config"]["cls_head"] for variant in variants.values()}
    families = {variant["backbone"]["family"] for variant in variants.values()}
    assert heads == {"naive", "xl"} and families == {"swinv2", "hiera"}, (heads, families)


@pytest.mark.parametrize("folder", REFERENCES)
def test_converted_checkpoint_matches_original_logits(folder):
    model, _, report = convert_checkpoint(folder / "model.ckpt", original_config=folder / "variant.json")
    assert report.ok, report.describe()
    differences = verify(model, folder / "io.safetensors")
    assert differences["logits"] <= 1e-5, differences
    assert differences["region_features"] <= 1e-4, differences


def test_command_line_conversion_writes_a_loadable_repo(tmp_path):
    folder = HYPER
    output = tmp_path / "repo"
    code = main(["--checkpoint", str(folder / "model.ckpt"), "--original-config", str(folder / "variant.json"),
                 "--output", str(output), "--verify", str(folder / "io.safetensors")])
    assert code == 0
    config = json.loads((output / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_xt.XTForImageClassification"
    assert (output / "model.safetensors").is_file() and (output / "README.md").is_file()
    reloaded = AutoModelForImageClassification.from_pretrained(output).eval()
    assert verify(reloaded, folder / "io.safetensors")["logits"] <= 1e-5


@pytest.mark.parametrize("script", ["convert_original_checkpoint", "make_model_cards"])
def test_running_a_conversion_file_as_a_script_says_how_to_run_it(script):
    result = subprocess.run([sys.executable, f"conversion/{script}.py", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and f"python -m conversion.{script}" in result.stderr


def test_script_runs_from_the_repository_root(tmp_path):
    folder = NAIVE
    command = [sys.executable, "-m", "conversion.convert_original_checkpoint",
               "--checkpoint", str(folder / "model.ckpt"), "--original-config", str(folder / "variant.json"), "--output", str(tmp_path / "out"),
               "--verify", str(folder / "io.safetensors")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"max \|Δ\| logits = [0-9.e-]+", result.stdout)


@pytest.mark.parametrize("manifest", LAYOUTS)
def test_every_released_key_layout_maps_completely(manifest):
    layout = read_layout(manifest)
    config = xt_config_from_original(layout["model_config"])
    with torch.device("meta"):  # full-size models without allocating their weights
        model = XTForImageClassification(config)
    original = {
        entry["key"].removeprefix("module."): torch.empty(entry["shape"], device="meta")
        for entry in _manifest_keys(layout)
    }
    backbone_type = config.backbone_config.model_type
    context = MappingContext(hiera_depths=tuple(config.backbone_config.depths) if backbone_type == "hiera" else ())
    mapped, unmatched, duplicated = map_state_dict(original, rules_for(backbone_type, config.classifier), context)
    report = check_against_model(mapped, model.state_dict(), MappingReport(unmatched_original=unmatched,
                                                                            duplicated=duplicated))
    assert report.ok, report.describe()
    assert sum(p.numel() for p in model.parameters()) == layout["num_parameters"]


def read_layout(path: Path) -> dict:
    """A key layout: the repository's gzipped JSON, or `../shared`'s plain one."""
    data = path.read_bytes()
    return json.loads(gzip.decompress(data) if path.suffix == ".gz" else data)


def test_the_repository_keeps_the_layout_of_every_released_variant():
    layouts = {path.name.removesuffix(".json.gz") for path in (ORIGINAL_REFERENCES / "layouts").glob("*.json.gz")}
    assert set(load_variants()) <= layouts, sorted(set(load_variants()) - layouts)


def _manifest_keys(layout):
    keys = layout["keys"]
    if isinstance(keys, dict):
        return [{"key": key, **value} for key, value in keys.items()]
    return keys


def test_variants_resolve_by_config_name_and_hub_name():
    by_config = resolve_variant("swin_v2_tiny_1e-4_mamba_512_256")
    assert resolve_variant("swin-t-mamba-512-256") == by_config
    with pytest.raises(ConversionError, match="Did you mean: .*swin-t-mamba-512-256"):
        resolve_variant("swin-t-mamba-512")


def test_swin_large_variants_keep_the_pretraining_window_scale():
    _, entry = resolve_variant("swin-l-hyper-512-256")
    config = xt_config_from_original(entry["original_config"])
    assert list(config.backbone_config.pretrained_window_sizes) == [12, 12, 12, 6]
    _, entry = resolve_variant("swin-b-hyper-512-256")
    assert list(xt_config_from_original(entry["original_config"]).backbone_config.pretrained_window_sizes) == [0] * 4


# ---- failure modes -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_corrupt_file_is_rejected(tmp_path, seed):
    path = tmp_path / "corrupt.ckpt"
    path.write_bytes(random.Random(seed).randbytes(4096))  # garbage trips the unpickler in many ways
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_original_state_dict(path)


def test_truncated_file_is_rejected(tmp_path):
    data = (NAIVE / "model.ckpt").read_bytes()
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_original_state_dict(path)


class NotATensor:
    """Unpickling this would need to import and run test code."""


class RunsCode:
    """Unpickling this calls a function (`__reduce__`): torch words its refusal differently."""

    def __reduce__(self):
        return (print, ("unpickled",))


class RunsOsCode:
    """Unpickling this calls into `os` (a blocked module): the case that used to read "corrupt or truncated?"."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize(("payload", "offender"), [
    (NotATensor, r"test_conversion\.NotATensor"),
    (RunsCode, r"builtins\.print"),
    (RunsOsCode, r"(posix|nt)\.getcwd"),
], ids=["custom-class", "reduce-to-function", "reduce-to-os-function"])
def test_pickle_that_needs_code_is_refused_naming_the_global(tmp_path, payload, offender, legacy):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": payload()}}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as raised:
        load_original_state_dict(path)
    message = str(raised.value)
    assert re.search(rf"Refused .*needs code \({offender}\).*weights_only", message), message
    assert "corrupt" not in message and "truncated" not in message


def test_empty_checkpoint_is_named_empty(tmp_path, capsys):
    empty = tmp_path / "empty.ckpt"
    empty.touch()
    with pytest.raises(CheckpointError, match=r"is empty \(0 bytes\)"):
        load_original_state_dict(empty)
    assert main(["--checkpoint", str(empty), "--variant", "swin-t-mamba-512-256", "--output", str(tmp_path / "o")]) == 2
    assert _one_error_line(capsys).endswith("is empty (0 bytes): download or copy it again.")
    assert not (tmp_path / "o").exists()


def _one_error_line(capsys) -> str:
    """The single `error: ...` line the script prints on stderr (no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_checkpoint_of_another_variant_fails_naming_the_keys():
    naive = NAIVE
    with pytest.raises(ConversionError, match=r"does not fit this variant:(.|\n)*missing(.|\n)*context_encoder"):
        convert_checkpoint(naive / "model.ckpt", original_config=HYPER / "variant.json")


def test_non_empty_output_is_never_overwritten_silently(tmp_path, capsys):
    folder = NAIVE
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("the user's own file")
    arguments = ["--checkpoint", str(folder / "model.ckpt"), "--original-config", str(folder / "variant.json"),
                 "--output", str(output)]
    assert main(arguments) == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in output.iterdir()) == ["notes.txt"]
    assert main(arguments + ["--overwrite"]) == 0
    assert (output / "notes.txt").read_text() == "the user's own file"


def test_label_names_must_match_the_class_count(tmp_path):
    folder = NAIVE
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"species {i}" for i in range(10)))
    model, _, _ = convert_checkpoint(folder / "model.ckpt", original_config=folder / "variant.json", labels=names)
    assert model.config.id2label[3] == "species 3"
    names.write_text("only\ntwo")
    with pytest.raises(ConversionError, match="names 2 labels but the checkpoint's classifier has 10"):
        convert_checkpoint(folder / "model.ckpt", original_config=folder / "variant.json", labels=names)


# ---- non-finite weights and outputs -----------------------------------------------------------

def _fixture_arguments(output, variant="swin-naive"):
    folder = ORIGINAL_REFERENCES / variant
    return ["--checkpoint", str(folder / "model.ckpt"), "--original-config", str(folder / "variant.json"),
            "--output", str(output)]


def _nothing_written(tmp_path, output) -> bool:
    """No output folder and no staging folder left behind."""
    return not output.exists() and not list(output.parent.glob(f".{output.name}.partial-*"))


def _altered_checkpoint(tmp_path, key, change):
    payload = torch.load(NAIVE / "model.ckpt", map_location="cpu", weights_only=True)
    weight = payload["state_dict"][key]
    payload["state_dict"][key] = change(weight.clone())
    path = tmp_path / "altered.ckpt"
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weight_fails_naming_the_tensor(tmp_path, capsys, value):
    key = "module.decoder.layers.3.weight"
    checkpoint = _altered_checkpoint(tmp_path, key, lambda w: w.index_put_((torch.tensor([0]),), torch.tensor(value)))
    output = tmp_path / "repo"
    arguments = _fixture_arguments(output)
    arguments[1] = str(checkpoint)
    assert main(arguments + ["--verify", str(NAIVE / "io.safetensors")]) == 2
    line = _one_error_line(capsys)
    assert "non-finite weights" in line and "decoder.layers.3.weight" in line, line
    assert ("NaN" if value != value else "inf") in line
    assert _nothing_written(tmp_path, output)
    with pytest.raises(CheckpointError, match="non-finite weights: decoder.layers.3.weight"):  # also without --verify
        convert_checkpoint(checkpoint, original_config=NAIVE / "variant.json")


def test_non_finite_output_fails_verification(tmp_path, capsys):
    # Finite weights whose outputs overflow float32: a max |Δ| of inf/nan must not pass as "within tolerance".
    checkpoint = _altered_checkpoint(tmp_path, "module.decoder.layers.3.weight", lambda w: w.sign() * 3e38)
    output = tmp_path / "repo"
    arguments = _fixture_arguments(output)
    arguments[1] = str(checkpoint)
    assert main(arguments + ["--verify", str(NAIVE / "io.safetensors")]) == 1
    line = _one_error_line(capsys)
    assert "outputs are not finite: logits" in line and line.endswith("nothing written"), line
    assert _nothing_written(tmp_path, output)


@pytest.mark.parametrize("name", ["logits", "pixel_values", "region_features"])
def test_non_finite_reference_is_rejected_naming_the_tensor(tmp_path, capsys, name):
    from safetensors.torch import load_file, save_file

    reference = load_file(str(NAIVE / "io.safetensors"))
    reference[name].view(-1)[0] = float("nan")
    io_file = tmp_path / "io.safetensors"
    save_file(reference, str(io_file))
    output = tmp_path / "repo"
    assert main(_fixture_arguments(output) + ["--verify", str(io_file)]) == 2
    assert re.search(rf"--verify file .* non-finite values in {name} \(1 NaN\)", _one_error_line(capsys))
    assert _nothing_written(tmp_path, output)


def test_failed_write_leaves_no_partial_repo(tmp_path, capsys, monkeypatch):
    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(XTImageProcessor, "save_pretrained", disk_full)  # after the weights were written
    output = tmp_path / "repo"
    assert main(_fixture_arguments(output)) == 2
    line = _one_error_line(capsys)
    assert f"could not write {output}: [Errno 28] No space left on device; nothing written" in line, line
    assert _nothing_written(tmp_path, output) and list(tmp_path.iterdir()) == []


# ---- inputs of the wrong kind: one line, status 2, nothing written -------------------------------------

def _wrong_kind_files(tmp_path):
    from safetensors.torch import save_file

    files = {"text": tmp_path / "notes.txt", "json": tmp_path / "variant.json",
             "safetensors": tmp_path / "io.safetensors", "ckpt": tmp_path / "model.ckpt"}
    files["text"].write_text("not a config\n")
    files["json"].write_text(json.dumps({"model_config": {"backbone_class": "hiera_base", "num_classes": 3}}))
    save_file({"pixel_values": torch.zeros(1, 3, 4, 4), "logits": torch.zeros(1, 3)}, str(files["safetensors"]))
    torch.save({"state_dict": {"w": torch.zeros(2)}}, files["ckpt"])
    return files


@pytest.mark.parametrize(("kind", "message"), [
    ("text", r"is a text file: expected a safetensors file"),
    ("json", r"is a JSON file: expected a safetensors file"),
    ("ckpt", r"is a zip file \(a PyTorch checkpoint\?\): expected a safetensors file"),
])
def test_verify_file_of_the_wrong_kind_is_named(tmp_path, kind, message):
    with pytest.raises(ConversionError, match=message):
        read_reference(_wrong_kind_files(tmp_path)[kind])


def test_verify_file_without_the_recorded_outputs_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(ConversionError, match="lacks pixel_values, logits"):
        read_reference(path)


@pytest.mark.parametrize(("kind", "message"), [
    ("text", r"is not valid JSON \(line 1\): expected an original xT YAML config"),
    ("safetensors", r"is a safetensors file, not a config"),
    ("ckpt", r"is a zip file \(a PyTorch checkpoint\?\), not a config"),
])
def test_original_config_of_the_wrong_kind_is_named(tmp_path, kind, message):
    with pytest.raises(ConfigError, match=message):
        read_model_config(_wrong_kind_files(tmp_path)[kind])


def test_original_config_without_a_model_config_is_named(tmp_path):
    (tmp_path / "a.json").write_text("[1, 2]")
    (tmp_path / "b.yaml").write_text("trainer:\n  epochs: 3\n")
    (tmp_path / "c.json").write_text(json.dumps({"model_config": {"num_classes": 3}}))
    with pytest.raises(ConfigError, match="neither `model_config` nor `model`"):
        read_model_config(tmp_path / "a.json")
    with pytest.raises(ConfigError, match="no `model` section"):
        read_model_config(tmp_path / "b.yaml")
    with pytest.raises(ConfigError, match="lacks backbone_class"):
        xt_config_from_original(read_model_config(tmp_path / "c.json")[0])


@pytest.mark.parametrize(("flag", "kind", "message"), [
    ("--verify", "json", "is a JSON file: expected a safetensors file"),
    ("--verify", "text", "is a text file: expected a safetensors file"),
    ("--verify", "ckpt", "is a zip file (a PyTorch checkpoint?): expected a safetensors file"),
    ("--original-config", "safetensors", "is a safetensors file, not a config"),
    ("--original-config", "text", "is not valid JSON (line 1)"),
    ("--checkpoint", "json", "is a JSON file, not a PyTorch checkpoint"),
    ("--checkpoint", "safetensors", "it is a --verify file, not a checkpoint"),
    ("--output", "text", "is a file, not a folder"),
])
def test_command_line_names_a_file_of_the_wrong_kind(tmp_path, capsys, flag, kind, message):
    files = _wrong_kind_files(tmp_path)
    output = tmp_path / "repo"
    arguments = _fixture_arguments(output)
    if flag == "--verify":
        arguments += ["--verify", str(files[kind])]
    else:
        arguments[arguments.index(flag) + 1] = str(files[kind])
    assert main(arguments) == 2
    line = _one_error_line(capsys)
    assert message in line, line
    assert files["text"].read_text() == "not a config\n"  # an --output file is never touched
    assert _nothing_written(tmp_path, output)


# ---- docs/conversion.md: every block runs as written, or says it needs the user's own files ------------

DOC = REPO_ROOT / "docs" / "conversion.md"
DOC_BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```$", DOC.read_text(), re.M | re.S)
RUNNABLE_BLOCKS = [(language, code) for language, code in DOC_BLOCKS if not code.startswith("# Needs your own files")]


def test_conversion_doc_blocks_are_tagged_and_hold_no_placeholders():
    assert DOC_BLOCKS and RUNNABLE_BLOCKS
    for language, code in DOC_BLOCKS:
        assert language in ("bash", "python"), f"untagged or unknown block: {code[:80]!r}"
        assert not re.search(r"\[--?\w", code), f"bracketed optional flag in {code!r}"
    assert len(RUNNABLE_BLOCKS) < len(DOC_BLOCKS)  # the user's-own-files blocks each have a runnable variant


@pytest.mark.parametrize(("language", "code"), RUNNABLE_BLOCKS,
                         ids=[f"{language}-{index}" for index, (language, _) in enumerate(RUNNABLE_BLOCKS)])
def test_conversion_doc_block_runs_as_written(language, code):
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{code}\n--- stderr ---\n{result.stderr[-3000:]}"


# ---- modeling/ ------------------------------------------------------------------------------

def test_model_cards_and_configs_are_up_to_date():
    stale = [str(path) for path, content in expected_files().items() if not path.exists() or path.read_text() != content]
    assert not stale, f"run `python -m conversion.make_model_cards`: stale {stale}"


def test_every_model_card_demo_runs(tmp_path, monkeypatch):
    tiny = tmp_path / "tiny-xt"
    XTForImageClassification(tiny_config(id2label={i: f"class {i}" for i in range(5)})).save_pretrained(tiny)
    XTImageProcessor(region_size=REGION).save_pretrained(tiny)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cards = sorted(MODELING.glob("*/README.md"))
    assert cards
    demos = {re.search(r"```python\n(.*?)```", card.read_text(), re.S).group(1) for card in cards}
    for demo in demos:  # the cards differ only in repo id and image size
        code = re.sub(r'repo = ".*"', f"repo = {str(tiny)!r}", demo)
        code = re.sub(r"\(\d+, \d+, 3\)", "(70, 45, 3)", code)
        exec(compile(code, "model-card-demo", "exec"), {})
