"""Released checkpoints convert completely and reproduce the original model's outputs."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys

import pytest
import torch
from conftest import FIXTURES, REGION, REPO_ROOT, tiny_config
from transformers import AutoModelForImageClassification

from conversion.checkpoint_io import CheckpointError, load_original_state_dict
from conversion.convert_original_checkpoint import ConversionError, convert_checkpoint, main, resolve_variant, verify
from conversion.key_mapping import MappingContext, MappingReport, check_against_model, map_state_dict, rules_for
from conversion.make_model_cards import MODELING, expected_files
from conversion.original_config import xt_config_from_original
from xt_hf import XTForImageClassification, XTImageProcessor

FIXTURE_VARIANTS = sorted(p.name for p in FIXTURES.iterdir() if (p / "model.ckpt").is_file()) if FIXTURES.is_dir() else []
MANIFESTS = sorted((FIXTURES / "manifests").glob("*.json")) if FIXTURES.is_dir() else []
needs_fixtures = pytest.mark.skipif(not FIXTURE_VARIANTS, reason=f"parity fixtures not found at {FIXTURES}")


@needs_fixtures
@pytest.mark.parametrize("variant", FIXTURE_VARIANTS)
def test_converted_checkpoint_matches_original_logits(variant):
    folder = FIXTURES / variant
    model, _, report = convert_checkpoint(folder / "model.ckpt", original_config=folder / "variant.json")
    assert report.ok, report.describe()
    differences = verify(model, folder / "io.safetensors")
    assert differences["logits"] <= 1e-5, differences
    assert differences["region_features"] <= 1e-4, differences


@needs_fixtures
def test_command_line_conversion_writes_a_loadable_repo(tmp_path):
    folder = FIXTURES / "swin-hyper"
    output = tmp_path / "repo"
    code = main(["--checkpoint", str(folder / "model.ckpt"), "--original-config", str(folder / "variant.json"),
                 "--output", str(output), "--verify", str(folder / "io.safetensors")])
    assert code == 0
    config = json.loads((output / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_xt.XTForImageClassification"
    assert (output / "model.safetensors").is_file() and (output / "README.md").is_file()
    reloaded = AutoModelForImageClassification.from_pretrained(output).eval()
    assert verify(reloaded, folder / "io.safetensors")["logits"] <= 1e-5


@needs_fixtures
def test_script_runs_from_the_repository_root(tmp_path):
    folder = FIXTURES / "swin-naive"
    command = [sys.executable, "conversion/convert_original_checkpoint.py", "--checkpoint", str(folder / "model.ckpt"),
               "--original-config", str(folder / "variant.json"), "--output", str(tmp_path / "out"),
               "--verify", str(folder / "io.safetensors")]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"max \|Δ\| logits = [0-9.e-]+", result.stdout)


@needs_fixtures
@pytest.mark.parametrize("manifest", MANIFESTS, ids=[m.stem for m in MANIFESTS])
def test_every_released_key_layout_maps_completely(manifest):
    layout = json.loads(manifest.read_text())
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


@needs_fixtures
def test_truncated_file_is_rejected(tmp_path):
    data = (FIXTURES / "swin-naive" / "model.ckpt").read_bytes()
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_original_state_dict(path)


class NotATensor:
    """Unpickling this would need to import and run test code."""


def test_pickle_that_needs_arbitrary_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": NotATensor()}}, path)
    with pytest.raises(CheckpointError, match="Refusing to load .*arbitrary Python objects"):
        load_original_state_dict(path)


@needs_fixtures
def test_checkpoint_of_another_variant_fails_naming_the_keys():
    naive = FIXTURES / "swin-naive"
    with pytest.raises(ConversionError, match=r"does not fit this variant:(.|\n)*missing(.|\n)*context_encoder"):
        convert_checkpoint(naive / "model.ckpt", original_config=FIXTURES / "swin-hyper" / "variant.json")


@needs_fixtures
def test_non_empty_output_is_never_overwritten_silently(tmp_path, capsys):
    folder = FIXTURES / "swin-naive"
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


@needs_fixtures
def test_label_names_must_match_the_class_count(tmp_path):
    folder = FIXTURES / "swin-naive"
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"species {i}" for i in range(10)))
    model, _, _ = convert_checkpoint(folder / "model.ckpt", original_config=folder / "variant.json", labels=names)
    assert model.config.id2label[3] == "species 3"
    names.write_text("only\ntwo")
    with pytest.raises(ConversionError, match="names 2 labels but the checkpoint's classifier has 10"):
        convert_checkpoint(folder / "model.ckpt", original_config=folder / "variant.json", labels=names)


# ---- modeling/ ------------------------------------------------------------------------------

def test_model_cards_and_configs_are_up_to_date():
    stale = [str(path) for path, content in expected_files().items() if not path.exists() or path.read_text() != content]
    assert not stale, f"run `python conversion/make_model_cards.py`: stale {stale}"


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
