"""Wrong input at the command line gets a clear, named answer, at once, and never costs the user data:

- a results table is resumed only when its journal says we wrote it with the same command, model and options;
  any other file at `--output` is refused (exit status 2) unless `--overwrite` is given;
- an array of another layout, a truncated `.npy` or a TIFF whose header claims pixels it does not hold is named,
  with the problem, before the model loads;
- help and usage errors of `xt-hf train` and of the checkpoint converter answer without importing torch.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REGION, REPO_ROOT, tiny_config

from xt_hf.engine.batch import read_table
from xt_hf_cli import main


def fails_with(capsys, argv: list[str], *expected: str) -> str:
    """Run the command line in-process: exit status 2 and a single line on stderr, `error: ...`, holding each of
    `expected`."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2, exited.value.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def succeeds(capsys, argv: list[str]) -> str:
    """Run the command line in-process: it returns (exit status 0); its stdout."""
    main(argv)
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A saved tiny xT classifier and an image it can read."""
    from xt_hf import XTForImageClassification, XTImageProcessor

    root = tmp_path_factory.mktemp("wrong-input")
    torch.manual_seed(0)
    XTForImageClassification(tiny_config()).save_pretrained(root / "classifier")
    XTImageProcessor(region_size=REGION).save_pretrained(root / "classifier")
    np.save(root / "image.npy", np.random.default_rng(0).integers(0, 256, (2 * REGION, 2 * REGION, 3), np.uint8))
    return root


@pytest.fixture
def no_model_loading(monkeypatch):
    """Checks that must come before the model loads: loading it fails the test."""
    import xt_hf_cli.common

    def load_for_inference(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(xt_hf_cli.common, "load_for_inference", load_for_inference)


def predict_argv(classifier, image, *extra) -> list[str]:
    return ["predict", str(image), "--model", str(classifier / "classifier"), "--device", "cpu", *extra]


# a. A results table: resumed only when it is ours and of the same run; nothing else is replaced silently.

@pytest.mark.parametrize("command", ["predict", "embed"])
def test_a_table_we_did_not_write_is_refused_and_kept(command, classifier, tmp_path, capsys, no_model_loading):
    table = tmp_path / "table.parquet"
    table.write_bytes(b"the user's own table")
    argv = [command, str(classifier / "image.npy"), "--model", str(classifier / "classifier"), "--device", "cpu",
            "--output", str(table)]
    fails_with(capsys, argv, str(table), "exists", "--overwrite", "no journal", "table.parquet.parts")
    assert table.read_bytes() == b"the user's own table"


def test_overwrite_replaces_a_table_we_did_not_write(classifier, tmp_path, capsys):
    table = tmp_path / "table.jsonl"
    table.write_text('{"path": "the user\'s own row"}\n')
    out = succeeds(capsys, predict_argv(classifier, classifier / "image.npy", "--output", str(table), "--overwrite"))
    assert "1 of 1 inputs succeeded" in out
    (row,) = read_table(table)
    assert row["path"] == str(classifier / "image.npy") and row["error"] is None


def test_a_table_of_the_same_run_is_resumed_and_of_another_run_refused_naming_what_differs(classifier, tmp_path,
                                                                                          capsys):
    table = tmp_path / "results.parquet"
    argv = predict_argv(classifier, classifier / "image.npy", "--output", str(table))
    assert "(0 already done" in succeeds(capsys, argv)
    assert "(1 already done, skipped)" in succeeds(capsys, argv)
    fails_with(capsys, [*argv, "--top-k", "2"], str(table), "another run", "top_k was 5, now 2", "--overwrite")
    fails_with(capsys, [*argv, "--dtype", "bfloat16"], "dtype was 'float32', now 'bfloat16'")
    # --overwrite starts over: the journal of the earlier run is forgotten, the new one records the new options.
    assert "(0 already done" in succeeds(capsys, [*argv, "--top-k", "2", "--overwrite"])
    assert json.loads((tmp_path / "results.parquet.parts" / "run.json").read_text())["top_k"] == 2
    assert len(read_table(table)[0]["labels"]) == 2


# d. Arrays of another layout and truncated .npy files are named with their problem before the model loads.

def test_a_4d_npy_fails_at_once_naming_the_file_its_shape_and_the_layouts(classifier, tmp_path, capsys,
                                                                          no_model_loading):
    image = tmp_path / "stack.npy"
    np.save(image, np.zeros((2, 2 * REGION, 2 * REGION, 3), np.uint8))
    fails_with(capsys, predict_argv(classifier, image), str(image), "(2, 64, 64, 3)", "(height, width)",
               "(height, width, channels)")


def test_a_truncated_npy_is_named_truncated_or_corrupt(classifier, tmp_path, capsys, no_model_loading):
    image = tmp_path / "cut.npy"
    np.save(image, np.zeros((8 * REGION, 8 * REGION, 3), np.uint8))
    image.write_bytes(image.read_bytes()[:5000])
    line = fails_with(capsys, predict_argv(classifier, image), str(image), "truncated or corrupt",
                      "(256, 256, 3) uint8", "196,608 bytes")
    assert "mmap length" not in line


# e. A TIFF whose header claims far more pixels than the file holds.

def forged_tiff(path) -> None:
    """A 16 × 16 RGB TIFF (one strip of 768 bytes) whose header then claims 1,000,000 × 1,000,000 pixels."""
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(path, np.zeros((16, 16, 3), np.uint8))
    with tifffile.TiffFile(path, mode="r+b") as tiff:
        for tag in ("ImageWidth", "ImageLength"):
            tiff.pages[0].tags[tag].overwrite(1_000_000)


def test_a_tiff_header_claiming_missing_pixels_is_named_before_the_model_loads(classifier, tmp_path, capsys,
                                                                                no_model_loading):
    image = tmp_path / "forged.tif"
    forged_tiff(image)
    line = fails_with(capsys, predict_argv(classifier, image), str(image), "1,000,000 × 1,000,000 × 3",
                      "missing or the file is corrupt")
    assert "cannot be reshaped" not in line


def test_a_tiff_cut_short_is_named_and_whole_tiffs_still_open(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    from xt_hf.engine import open_region_source

    pixels = np.random.default_rng(0).integers(0, 256, (100, 70, 3), np.uint8)
    layouts = {"strips": dict(rowsperstrip=16), "tiles": dict(tile=(32, 32)), "zlib": dict(compression="zlib"),
               "planar": dict(photometric="rgb", planarconfig="separate")}
    for name, options in layouts.items():
        data = np.moveaxis(pixels, -1, 0) if name == "planar" else pixels
        tifffile.imwrite(tmp_path / f"{name}.tif", data, **options)
        np.testing.assert_array_equal(open_region_source(tmp_path / f"{name}.tif").read(0, 0, 100, 70), pixels)
    cut = tmp_path / "cut.tif"
    cut.write_bytes((tmp_path / "strips.tif").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"cut\.tif: the TIFF header claims 100 × 70 × 3 uint8 pixels in strips "
                                         r"that end past the end of the file"):
        open_region_source(cut)


# h. Help and usage errors answer without importing torch.

def imported_modules(argv: list[str]) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `argv` under `python -X importtime`: the process and the names of the modules it imported."""
    result = subprocess.run([sys.executable, "-X", "importtime", *argv], capture_output=True, text=True,
                            timeout=120, cwd=REPO_ROOT)
    modules = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
               if line.startswith("import time:") and line.count("|") == 2}
    return result, modules


@pytest.mark.parametrize("argv, status, says", [
    (["train", "--help"], 0, "--learning-rate"),
    (["train", "--learning-rate"], 2, "expected one argument"),
    (["train", "--no-such-setting", "1"], 2, "unrecognized arguments"),
])
def test_train_help_and_argument_errors(argv, status, says):
    """The training settings are `xt_hf.training`'s dataclasses, and importing `xt_hf` imports torch (transformers'
    config classes do), so unlike the other commands' help this one is not instant."""
    result, _ = imported_modules(["-c", "from xt_hf_cli import main; main()", *argv])
    assert result.returncode == status, result.stderr[-2000:]
    assert says in result.stdout + result.stderr


@pytest.mark.parametrize("argv, status, says", [
    ([], 2, "the following arguments are required: --checkpoint"),
    (["--help"], 0, "Convert a released xT checkpoint"),
    (["--checkpoint", "x.ckpt", "--variant", "v", "--original-config", "c.yaml", "--output", "o"], 2,
     "not allowed with argument"),
])
def test_converter_help_and_usage_errors_do_not_import_torch(argv, status, says):
    result, modules = imported_modules(["-m", "conversion.convert_original_checkpoint", *argv])
    assert result.returncode == status, result.stderr[-2000:]
    assert says in result.stdout + result.stderr
    assert "torch" not in modules and "xt_hf" not in modules, sorted(m for m in modules if "torch" in m)[:5]
