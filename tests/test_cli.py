"""The command line's answers to bad inputs: one `error: ...` line naming the problem, exit status 2, before any
long work (no traceback, no misleading message, no model loaded when the output cannot be written); where its
runtime settings come from; and the ways to start it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REGION, tiny_config

from xt_hf import XTConfig
from xt_hf_cli import main


def fails_with(capsys, argv: list[str], *expected: str) -> str:
    """Run the command line in-process; it must exit with status 2 and one `error:` line holding `expected`."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2, exited.value.code
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1, captured.err
    assert "Traceback" not in captured.err, captured.err
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved tiny models: an xT classifier, an xT segmenter, a Swin V2 (not xT); an image and a plain folder."""
    from transformers import Swinv2Config, Swinv2Model

    from xt_hf import XTForImageClassification, XTForSemanticSegmentation, XTImageProcessor

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    XTForImageClassification(tiny_config()).save_pretrained(root / "classifier")
    XTForSemanticSegmentation(tiny_config(num_labels=3, classifier="pool")).save_pretrained(root / "segmenter")
    for name in ("classifier", "segmenter"):
        XTImageProcessor(region_size=REGION).save_pretrained(root / name)
    Swinv2Model(Swinv2Config(embed_dim=8, depths=[1], num_heads=[1], window_size=4)).save_pretrained(root / "swinv2")
    np.save(root / "image.npy", np.random.default_rng(0).integers(0, 256, (2 * REGION, 2 * REGION, 3), np.uint8))
    (root / "plain folder").mkdir()
    (root / "plain folder" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def no_model_loading(monkeypatch):
    """Checks that must come before the model loads: loading it fails the test."""
    import xt_hf_cli.common
    import xt_hf_cli.predict
    import xt_hf_cli.segment

    def load_for_inference(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")

    for module in (xt_hf_cli.common, xt_hf_cli.predict, xt_hf_cli.segment):
        monkeypatch.setattr(module, "load_for_inference", load_for_inference, raising=False)


# 1. A model with another head than the command needs.

def test_segment_with_a_classifier_names_both(folders, tmp_path, capsys):
    line = fails_with(capsys, ["segment", str(folders / "image.npy"), "--model", str(folders / "classifier"),
                               "--output", str(tmp_path / "mask.zarr"), "--device", "cpu"],
                      "is XTForImageClassification", "needs an XTForSemanticSegmentation", "segment")
    assert not (tmp_path / "mask.zarr").exists(), line


def test_predict_with_a_segmenter_names_both(folders, capsys):
    fails_with(capsys, ["predict", str(folders / "image.npy"), "--model", str(folders / "segmenter"),
                        "--device", "cpu"],
               "is XTForSemanticSegmentation", "needs an XTForImageClassification", "predict")


# 2. A directory that is not a zarr store given as the image.

@pytest.mark.parametrize("command", ["predict", "segment"])
def test_a_plain_directory_as_the_image_is_named_as_a_directory(command, folders, tmp_path, capsys):
    model = folders / ("classifier" if command == "predict" else "segmenter")
    argv = [command, str(folders / "plain folder"), "--model", str(model), "--device", "cpu"]
    if command == "segment":
        argv += ["--output", str(tmp_path / "mask.zarr")]
    line = fails_with(capsys, argv, "plain folder", "is a directory", "not an image or a zarr array")
    assert "No group found" not in line


def test_open_region_source_names_a_plain_directory(folders):
    from xt_hf.engine import open_region_source

    with pytest.raises(ValueError, match="is a directory, not an image or a zarr array"):
        open_region_source(folders / "plain folder")
    with pytest.raises(ValueError, match="is a directory, not an image or a zarr array"):
        open_region_source(folders / "classifier")  # a model folder by mistake


def test_a_zarr_directory_still_opens(tmp_path):
    zarr = pytest.importorskip("zarr")
    from xt_hf.engine import open_region_source

    array = zarr.open(str(tmp_path / "scene"), mode="w", shape=(40, 50, 3), dtype="uint8")  # no .zarr suffix
    array[:] = 7
    source = open_region_source(tmp_path / "scene", REGION)
    assert (source.height, source.width, source.channels) == (40, 50, 3)
    assert (source.read(0, 0, 2, 2) == 7).all()


def test_a_zarr_group_asks_for_one_of_its_arrays(tmp_path):
    zarr = pytest.importorskip("zarr")
    from xt_hf.engine import open_region_source

    group = zarr.open_group(str(tmp_path / "scene.zarr"), mode="w")
    group.create_array("level0", shape=(40, 50, 3), dtype="uint8")
    with pytest.raises(ValueError, match="is a zarr group, not an array.*level0"):
        open_region_source(tmp_path / "scene.zarr")
    assert open_region_source(tmp_path / "scene.zarr" / "level0").height == 40


# 3. --model that does not exist or is not xT.

@pytest.mark.parametrize("command", ["predict", "segment"])
def test_a_missing_model_folder(command, folders, tmp_path, capsys):
    argv = [command, str(folders / "image.npy"), "--model", str(tmp_path / "no-such-model"), "--device", "cpu"]
    if command == "segment":
        argv += ["--output", str(tmp_path / "mask.zarr")]
    fails_with(capsys, argv, "no-such-model", "no such folder")


def test_a_model_that_is_not_xt(folders, capsys):
    fails_with(capsys, ["predict", str(folders / "image.npy"), "--model", str(folders / "swinv2"), "--device", "cpu"],
               "swinv2", "not an xT model")


def test_a_folder_without_a_model(folders, capsys):
    fails_with(capsys, ["predict", str(folders / "image.npy"), "--model", str(folders / "plain folder"),
                        "--device", "cpu"],
               "plain folder", "config.json")


# 4. Numbers out of range, a device that is not there.

@pytest.mark.parametrize("value", ["-1", "0"])
def test_top_k_below_one(value, folders, capsys, no_model_loading):
    fails_with(capsys, ["predict", str(folders / "image.npy"), "--model", str(folders / "classifier"),
                        "--top-k", value], "--top-k", f"must be at least 1, got {value}")


@pytest.mark.parametrize("option", ["--region-batch-size", "--num-workers"])
def test_counts_out_of_range(option, folders, capsys, no_model_loading):
    value = "0" if option == "--region-batch-size" else "-1"
    fails_with(capsys, ["predict", str(folders / "image.npy"), "--model", str(folders / "classifier"),
                        option, value], option, f"got {value}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is available here")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu(device, folders, capsys, no_model_loading):
    fails_with(capsys, ["predict", str(folders / "image.npy"), "--model", str(folders / "classifier"),
                        "--device", device], f"--device {device}", "no CUDA GPU")


def test_an_unknown_device(folders, capsys, no_model_loading):
    fails_with(capsys, ["predict", str(folders / "image.npy"), "--model", str(folders / "classifier"),
                        "--device", "gpu0"], "unknown device 'gpu0'")


def test_demo_size_smaller_than_a_region(capsys):
    fails_with(capsys, ["demo", "--size", "100"], "--size 100", "at least one region", "128 px")


def test_demo_negative_seed(capsys):
    fails_with(capsys, ["demo", "--seed", "-1"], "--seed", "got -1")


# 5. Outputs and spill folders that cannot be written, all reported before the model loads.

def segment_argv(folders, output, *extra):
    return ["segment", str(folders / "image.npy"), "--model", str(folders / "segmenter"), "--output", str(output),
            "--device", "cpu", *extra]


def test_segment_output_in_a_missing_folder(folders, tmp_path, capsys, no_model_loading):
    fails_with(capsys, segment_argv(folders, tmp_path / "missing" / "mask.zarr"), "--output", "missing",
               "does not exist")


def test_segment_output_in_a_read_only_folder(folders, tmp_path, capsys, no_model_loading):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("this user (root?) can write to a read-only folder")
        fails_with(capsys, segment_argv(folders, folder / "mask.zarr"), "read-only", "not writable")
    finally:
        folder.chmod(0o755)


def test_segment_output_that_exists(folders, tmp_path, capsys, no_model_loading):
    (tmp_path / "mask.tif").write_bytes(b"earlier result")
    fails_with(capsys, segment_argv(folders, tmp_path / "mask.tif"), "mask.tif", "exists", "--overwrite")
    assert (tmp_path / "mask.tif").read_bytes() == b"earlier result"


@pytest.mark.parametrize("name", ["mask.png", "mask"])
def test_segment_output_with_a_wrong_suffix(name, folders, tmp_path, capsys, no_model_loading):
    fails_with(capsys, segment_argv(folders, tmp_path / name), ".zarr", ".tif", repr(name))


@pytest.mark.parametrize("command", ["predict", "segment"])
def test_a_missing_spill_directory(command, folders, tmp_path, capsys, no_model_loading):
    argv = [command, str(folders / "image.npy"), "--model", str(folders / "classifier"), "--device", "cpu",
            "--spill-dir", str(tmp_path / "no-spill")]
    if command == "segment":
        argv += ["--output", str(tmp_path / "mask.zarr")]
    fails_with(capsys, argv, "--spill-dir", "no-spill", "spill directory", "does not exist")


def test_a_bad_input_from_a_new_process_is_one_line_and_status_2(folders, tmp_path):
    """`python -m xt_hf_cli` behaves as `main` in-process: one line on stderr, no traceback, status 2."""
    result = subprocess.run(
        [sys.executable, "-m", "xt_hf_cli", "segment", str(folders / "image.npy"), "--model",
         str(folders / "classifier"), "--output", str(tmp_path / "mask.zarr"), "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "XTForImageClassification" in lines[0]


def test_rescale_factor_sets_how_raw_pixels_are_scaled(folders, tmp_path, capsys):
    """A uint16 scene is scaled by 1/65535 by default (the uint8 scene's numbers); `--rescale-factor` overrides it."""
    import json

    image = np.load(folders / "image.npy")
    np.save(tmp_path / "image16.npy", image.astype(np.uint16) * 257)

    def scores(path, *extra):
        main(["predict", str(path), "--model", str(folders / "classifier"), "--json", "--top-k", "5", *extra])
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        return {p["label"]: p["score"] for p in report["predictions"]}

    as_uint8 = scores(folders / "image.npy")
    by_dtype = scores(tmp_path / "image16.npy")
    assert by_dtype == pytest.approx(as_uint8, abs=1e-6)
    overridden = scores(tmp_path / "image16.npy", "--rescale-factor", str(1 / 255))
    assert overridden != pytest.approx(as_uint8, abs=1e-3)
    fails_with(capsys, ["predict", str(folders / "image.npy"), "--model", str(folders / "classifier"),
                        "--rescale-factor", "-1"], "--rescale-factor")


@pytest.mark.parametrize("argv, status", [(["--help"], 0), (["predict", "--help"], 0), (["segment", "--help"], 0),
                                          (["demo", "--help"], 0), (["detect", "--help"], 0), (["embed", "--help"], 0),
                                          (["predict", "x", "--model", "m", "--top-k", "-1"], 2),
                                          (["nonsense"], 2)])
def test_help_and_argument_errors_answer_without_importing_torch(argv, status):
    """`xt-hf --help` and argument errors must answer at once: torch (and xt_hf with it) is imported only by a
    command that runs."""
    code = ("import sys\nfrom xt_hf_cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exited:\n"
            "    print('status', exited.code, 'torch' in sys.modules, 'xt_hf' in sys.modules, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert result.stderr.splitlines()[-1] == f"status {status} False False", result.stderr[-1000:]


# 6. The ways to start it.

def test_python_m_xt_hf_cli_answers_help_without_importing_torch():
    code = ("import runpy, sys\nsys.argv = ['xt_hf_cli', 'predict', '--help']\ntry:\n"
            "    runpy.run_module('xt_hf_cli', run_name='__main__', alter_sys=True)\nexcept SystemExit as exited:\n"
            "    print('status', exited.code, 'torch' in sys.modules, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "--region-batch-size" in result.stdout, result.stderr[-1000:]
    assert result.stderr.splitlines()[-1] == "status 0 False", result.stderr[-1000:]


def test_python_m_xt_hf_still_runs_the_command_line():
    """The older form: the library runs the installed `xt-hf` console script, without importing `xt_hf_cli` itself
    (tests/test_layering.py)."""
    result = subprocess.run([sys.executable, "-m", "xt_hf", "nonsense"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "invalid choice: 'nonsense'" in result.stderr, result.stderr[-1000:]


# 7. A runtime setting that the model saves is the command's default; the command line overrides it.

@pytest.fixture
def requested_region_batch_sizes(monkeypatch):
    """The number of regions each whole-scene run asks its region reader for at a time."""
    from xt_hf.engine.sources import RegionReader

    sizes, batches = [], RegionReader.batches

    def recording(self, batch_size, *args, **kwargs):
        sizes.append(batch_size)
        return batches(self, batch_size, *args, **kwargs)

    monkeypatch.setattr(RegionReader, "batches", recording)
    return sizes


@pytest.mark.parametrize("flag, expected", [((), 3), (("--region-batch-size", "2"), 2)], ids=["saved", "flag"])
def test_region_batch_size_is_the_saved_models_unless_the_command_line_gives_one(
        flag, expected, folders, tmp_path, capsys, requested_region_batch_sizes):
    from xt_hf import XTForImageClassification

    XTForImageClassification(tiny_config(region_batch_size=3)).save_pretrained(tmp_path / "model")
    main(["predict", str(folders / "image.npy"), "--model", str(tmp_path / "model"), "--device", "cpu", "--json",
          *flag])
    assert requested_region_batch_sizes == [expected]


@pytest.mark.parametrize("saved, given, expected", [(3, None, 3), (3, 2, 2), (None, None, XTConfig.region_batch_size)])
def test_the_engine_streams_the_models_region_batch_size_by_default(saved, given, expected, folders,
                                                                     requested_region_batch_sizes):
    """A config of None (all regions at once, in memory) streams the config class's default instead."""
    from xt_hf import XTForImageClassification
    from xt_hf.engine import predict_streaming

    model = XTForImageClassification(tiny_config(region_batch_size=saved)).eval()
    predict_streaming(model, folders / "image.npy", region_batch_size=given)
    assert requested_region_batch_sizes == [expected]
