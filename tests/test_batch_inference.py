"""Many inputs, one results table (`xt_hf.engine.batch`, `xt-hf predict/segment/embed --output table`): inputs
from files, globs, folders, manifests and saved datasets; a bad input never stops the batch; reruns skip what is
done, also after `kill -9`; two processes give the table of one; embeddings equal the model's pooled output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REGION, REPO_ROOT, tiny_config

from xt_hf.engine.batch import Journal, expand_inputs, read_table
from xt_hf_cli import main

# Big enough (256 regions each, ~0.3 s on one core) that a kill lands mid-batch.
SLOW_SIDE = 16 * REGION


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Saved tiny models (classifier, segmenter), four small images and a file that is not one, eight slower
    images for the subprocess runs."""
    from xt_hf import XTForImageClassification, XTForSemanticSegmentation, XTImageProcessor

    root = tmp_path_factory.mktemp("batch")
    torch.manual_seed(0)
    XTForImageClassification(tiny_config()).save_pretrained(root / "classifier")
    XTForSemanticSegmentation(tiny_config(num_labels=3, classifier="pool")).save_pretrained(root / "segmenter")
    for name in ("classifier", "segmenter"):
        XTImageProcessor(region_size=REGION).save_pretrained(root / name)
    (root / "images").mkdir()
    for index in range(4):
        image = np.random.default_rng(index).integers(0, 256, (2 * REGION, 3 * REGION, 3), np.uint8)
        np.save(root / "images" / f"image{index}.npy", image)
    (root / "images" / "broken.npy").write_text("not an array")
    (root / "slow").mkdir()
    for index in range(8):
        image = np.random.default_rng(10 + index).integers(0, 256, (SLOW_SIDE, SLOW_SIDE, 3), np.uint8)
        np.save(root / "slow" / f"scene{index}.npy", image)
    return root


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "seconds"} for row in rows]


def run_cli(argv: list[str]) -> int:
    """The command line in-process; its exit status (0 when it returns)."""
    try:
        main(argv)
    except SystemExit as exited:
        return exited.code
    return 0


def subprocess_environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}


# 1. Many inputs.

def test_inputs_from_files_globs_folders_manifests_and_saved_datasets(work, tmp_path):
    from datasets import Dataset

    images = sorted(str(path) for path in (work / "images").glob("image*.npy"))
    assert expand_inputs([work / "images"]) == [str(work / "images" / "broken.npy"), *images]  # sorted by name
    assert expand_inputs([str(work / "images" / "image*.npy")]) == images
    assert expand_inputs([images[1], images[0], images[1]]) == [images[1], images[0]]  # first place kept
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{os.path.relpath(p, tmp_path)},x\n" for p in images))
    assert [os.path.realpath(p) for p in expand_inputs([tmp_path / "list.csv"])] == images
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"path": p}) + "\n" for p in images[:2]))
    assert expand_inputs([tmp_path / "list.jsonl"]) == images[:2]
    Dataset.from_dict({"path": images[::-1], "label": [0, 1, 0, 1]}).save_to_disk(tmp_path / "dataset")
    assert expand_inputs([tmp_path / "dataset"]) == images[::-1]
    assert expand_inputs([tmp_path / "missing.npy"]) == [str(tmp_path / "missing.npy")]  # an error row later
    with pytest.raises(ValueError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.tif")])
    (tmp_path / "bad.csv").write_text("file\na.npy\n")
    with pytest.raises(ValueError, match="'path' column"):
        expand_inputs([tmp_path / "bad.csv"])


def test_predict_writes_a_row_per_input_and_a_bad_input_does_not_stop_the_batch(work, tmp_path, capsys):
    table = tmp_path / "results.parquet"
    status = run_cli(["predict", str(work / "images"), str(tmp_path / "missing.npy"), "--model",
                      str(work / "classifier"), "--device", "cpu", "--top-k", "3", "--output", str(table)])
    assert status == 1
    assert "4 of 6 inputs succeeded, 2 failed" in capsys.readouterr().out
    rows = read_table(table)
    assert [Path(row["path"]).name for row in rows] == ["broken.npy", "image0.npy", "image1.npy", "image2.npy",
                                                        "image3.npy", "missing.npy"]
    assert set(rows[0]) == {"path", "labels", "scores", "seconds", "error"}
    failed = {Path(row["path"]).name: row["error"] for row in rows if row["error"] is not None}
    assert set(failed) == {"broken.npy", "missing.npy"} and "missing.npy" in failed["missing.npy"]
    # Each row holds what the single-input command prints for that image.
    assert run_cli(["predict", str(work / "images" / "image2.npy"), "--model", str(work / "classifier"),
                    "--device", "cpu", "--top-k", "3", "--json"]) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rows[3]["labels"] == [p["label"] for p in single["predictions"]]
    assert rows[3]["scores"] == pytest.approx([p["score"] for p in single["predictions"]], abs=1e-6)
    assert all(len(row["labels"]) == 3 and row["seconds"] > 0 for row in rows if row["error"] is None)


def test_all_inputs_succeeding_exit_0_and_jsonl_tables(work, tmp_path, capsys):
    table = tmp_path / "results.jsonl"
    assert run_cli(["predict", str(work / "images" / "image*.npy"), "--model", str(work / "classifier"),
                    "--device", "cpu", "--output", str(table)]) == 0
    assert "4 of 4 inputs succeeded, 0 failed" in capsys.readouterr().out
    lines = table.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["error"] is None for line in lines)


def test_usage_errors_of_many_inputs(work, tmp_path, capsys):
    images = [str(work / "images" / "image0.npy"), str(work / "images" / "image1.npy")]
    model = ["--model", str(work / "classifier"), "--device", "cpu"]
    assert run_cli(["predict", *images, *model]) == 2
    assert "several inputs need --output" in capsys.readouterr().err
    assert run_cli(["predict", *images, *model, "--output", str(tmp_path / "results.csv")]) == 2
    assert ".parquet or .jsonl" in capsys.readouterr().err
    assert run_cli(["segment", *images, "--model", str(work / "segmenter"), "--output",
                    str(tmp_path / "results.jsonl")]) == 2
    assert "needs --output-dir" in capsys.readouterr().err
    assert run_cli(["predict", str(tmp_path / "*.npy"), *model, "--output", str(tmp_path / "r.jsonl")]) == 2
    assert "matches no file" in capsys.readouterr().err


def test_segment_writes_each_mask_into_output_dir(work, tmp_path, capsys):
    zarr = pytest.importorskip("zarr")
    images = [str(work / "images" / f"image{index}.npy") for index in (0, 1)]
    assert run_cli(["segment", *images, "--model", str(work / "segmenter"), "--device", "cpu", "--output",
                    str(tmp_path / "masks.parquet"), "--output-dir", str(tmp_path / "masks")]) == 0
    rows = read_table(tmp_path / "masks.parquet")
    assert [Path(row["mask"]).name for row in rows] == ["image0.zarr", "image1.zarr"]
    assert sorted(os.listdir(tmp_path / "masks")) == ["image0.zarr", "image1.zarr"]  # no partial masks left
    # The same mask as the single-input command writes.
    assert run_cli(["segment", images[1], "--model", str(work / "segmenter"), "--device", "cpu", "--output",
                    str(tmp_path / "single.zarr")]) == 0
    np.testing.assert_array_equal(zarr.open(rows[1]["mask"], mode="r")[:],
                                  zarr.open(str(tmp_path / "single.zarr"), mode="r")[:])
    assert (rows[1]["height"], rows[1]["width"]) == zarr.open(rows[1]["mask"], mode="r").shape


# 2. Resumable and safe.

def test_a_rerun_skips_inputs_done_retries_failures_and_redoes_changed_files(work, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(3):
        (folder / f"image{index}.npy").write_bytes((work / "images" / f"image{index}.npy").read_bytes())
    (folder / "broken.npy").write_text("not an array")
    argv = ["predict", str(folder), "--model", str(work / "classifier"), "--device", "cpu", "--output",
            str(tmp_path / "results.parquet")]
    assert run_cli(argv) == 1
    first = read_table(tmp_path / "results.parquet")
    assert "3 of 4 inputs succeeded, 1 failed (0 already done" in capsys.readouterr().out
    assert run_cli(argv) == 1
    assert "(3 already done, skipped)" in capsys.readouterr().out  # the failure is tried again
    assert without_seconds(read_table(tmp_path / "results.parquet")) == without_seconds(first)
    np.save(folder / "broken.npy", np.load(work / "images" / "image3.npy"))  # fixed: new size and time
    os.utime(folder / "image0.npy", ns=(1, 1))  # changed time: done again
    assert run_cli(argv) == 0
    assert "4 of 4 inputs succeeded, 0 failed (2 already done, skipped)" in capsys.readouterr().out
    rows = read_table(tmp_path / "results.parquet")
    assert [row["error"] for row in rows] == [None] * 4
    # Another command, model or setting must not mix its rows in: refused before the model loads.
    assert run_cli([*argv, "--top-k", "2"]) == 2
    assert "holds results of another run (different top_k)" in capsys.readouterr().err


def slow_predict_argv(work, output) -> list[str]:
    return [sys.executable, "-m", "xt_hf", "predict", str(work / "slow"), "--model", str(work / "classifier"),
            "--device", "cpu", "--output", str(output)]


@pytest.fixture(scope="module")
def uninterrupted(work, tmp_path_factory):
    """The table of one uninterrupted single-process run over the eight slow images, and its wall time."""
    output = tmp_path_factory.mktemp("uninterrupted") / "results.parquet"
    start = time.perf_counter()
    result = subprocess.run(slow_predict_argv(work, output), capture_output=True, text=True, timeout=300,
                            env=subprocess_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    return read_table(output), time.perf_counter() - start


def test_kill_9_midway_then_a_rerun_gives_the_uninterrupted_table(work, uninterrupted, tmp_path):
    output = tmp_path / "results.parquet"
    journal = Journal(output)
    process = subprocess.Popen(slow_predict_argv(work, output), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=subprocess_environment())
    part = journal.directory / "rank0.jsonl"
    deadline = time.monotonic() + 240
    while not (part.exists() and part.read_text().count("\n") >= 1) and time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before its first row"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    done = journal.read()
    assert 1 <= len(done) < 8, f"{len(done)} rows: the kill did not land mid-batch"
    if output.exists():  # the table is only ever replaced whole
        assert len(read_table(output)) == len(done)
    with open(part, "a") as handle:  # as if the kill had torn a line in half
        handle.write('{"key": "torn')
    result = subprocess.run(slow_predict_argv(work, output), capture_output=True, text=True, timeout=300,
                            env=subprocess_environment())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"({len(done)} already done, skipped)" in result.stdout
    assert without_seconds(read_table(output)) == without_seconds(uninterrupted[0])


# 3. Many processes.

def test_two_processes_give_the_table_of_one(work, uninterrupted, tmp_path):
    output = tmp_path / "results.parquet"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29541", *slow_predict_argv(work, output)[1:]]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=subprocess_environment())
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("8 of 8 inputs succeeded") == 1  # rank 0 reports
    parts = {path.name: path.read_text().count("\n") for path in Journal(output).directory.glob("rank*.jsonl")}
    assert parts == {"rank0.jsonl": 4, "rank1.jsonl": 4}
    assert without_seconds(read_table(output)) == without_seconds(uninterrupted[0])
    print(f"8 images of {SLOW_SIDE}² px: 1 process {uninterrupted[1]:.1f} s, 2 processes {seconds:.1f} s (wall)")


# 5. Embeddings.

def test_embed_writes_the_pooled_output_and_token_grids(work, tmp_path, capsys):
    from safetensors.torch import load_file

    from xt_hf import XTImageProcessor, XTModel

    images = [str(work / "images" / f"image{index}.npy") for index in (0, 1)]
    assert run_cli(["embed", *images, "--model", str(work / "classifier"), "--device", "cpu", "--output",
                    str(tmp_path / "embeddings.parquet"), "--tokens-dir", str(tmp_path / "tokens")]) == 0
    rows = read_table(tmp_path / "embeddings.parquet")
    model = XTModel.from_pretrained(work / "classifier").eval()  # the classifier's encoder
    processor = XTImageProcessor.from_pretrained(work / "classifier")
    for image, row in zip(images, rows):
        pixels = processor(np.load(image), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            expected = model(pixels)
        assert len(row["embedding"]) == model.config.context_hidden_size
        torch.testing.assert_close(torch.tensor(row["embedding"]), expected.pooler_output[0], atol=1e-5, rtol=0)
        tokens = load_file(row["tokens"])["tokens"]
        assert tokens.shape == (8, 12, model.config.context_hidden_size)  # 2 × 3 regions of 4 × 4 tokens
        torch.testing.assert_close(tokens.reshape(1, -1, tokens.shape[-1]), expected.last_hidden_state,
                                   atol=1e-5, rtol=0)
    assert sorted(os.listdir(tmp_path / "tokens")) == ["image0.safetensors", "image1.safetensors"]


def test_image_feature_extraction_pipeline_on_a_saved_xtmodel(work, tmp_path):
    from PIL import Image
    from transformers import pipeline

    from xt_hf import XTImageProcessor, XTModel

    torch.manual_seed(0)
    XTModel(tiny_config()).save_pretrained(tmp_path / "encoder")
    XTImageProcessor(region_size=REGION).save_pretrained(tmp_path / "encoder")
    image = np.load(work / "images" / "image0.npy")
    Image.fromarray(image).save(tmp_path / "image.png")
    extractor = pipeline("image-feature-extraction", model=str(tmp_path / "encoder"), device="cpu")
    pooled = torch.tensor(extractor(Image.fromarray(image), pool=True))
    tokens = torch.tensor(extractor(Image.fromarray(image)))
    assert run_cli(["embed", str(tmp_path / "image.png"), "--model", str(tmp_path / "encoder"), "--device", "cpu",
                    "--output", str(tmp_path / "embeddings.jsonl")]) == 0
    (row,) = read_table(tmp_path / "embeddings.jsonl")
    torch.testing.assert_close(pooled.reshape(-1), torch.tensor(row["embedding"]), atol=1e-5, rtol=0)
    assert tokens.shape == (1, 8 * 12, 32)


@pytest.mark.parametrize("argv", [["embed", "--help"], ["predict", "--help"], ["embed", "x.npy", "--model", "m"]])
def test_embed_help_and_argument_errors_answer_without_importing_torch(argv):
    code = ("import sys\nfrom xt_hf_cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as exited:\n"
            "    print('status', exited.code, 'torch' in sys.modules, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    status = 0 if "--help" in argv else 2
    assert result.stderr.splitlines()[-1] == f"status {status} False", result.stderr[-1000:]
