"""benchmarks/context_gain.py, the documented "does context help" protocol, runs end to end from the repository."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "context_gain.py"


def protocol(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("task", ["coastline", "beacons", "relations"])
def test_the_protocol_trains_both_models_scores_them_and_resumes(tmp_path, task):
    workdir = tmp_path / "protocol"
    first = protocol("--task", task, "--setting", "smoke", "--data-seeds", "3", "--train-seeds", "5",
                     "--workdir", str(workdir))
    assert first.returncode in (0, 1), first.stderr[-3000:]  # 1: targets not met, as expected after two steps
    table = (workdir / "table.md").read_text()
    assert "| 3 | 5 | context |" in table and "| 3 | 5 | nocontext |" in table
    assert "target" in table and "gain (with − without)" in table
    for variant in ("context", "nocontext"):
        result = json.loads((workdir / "runs" / f"data3_train5_{variant}" / "result.json").read_text())
        assert (result["data_seed"], result["train_seed"], result["variant"]) == (3, 5, variant)
        trained = (workdir / "runs" / f"data3_train5_{variant}" / "train_config.yaml").read_text()
        assert "seed: 5" in trained

        assert all(value == value for value in result.values()), result  # no NaN metric

    # A result missing a metric (one added to the task since it ran) is scored again from its kept checkpoint.
    result_file = workdir / "runs" / "data3_train5_context" / "result.json"
    result = json.loads(result_file.read_text())
    scored = {name: value for name, value in result.items() if name.startswith("test_")}
    result_file.write_text(json.dumps({name: value for name, value in result.items() if name not in scored}))
    log = workdir / "runs" / "data3_train5_context.log"
    trained_log = log.read_text()

    again = protocol("--task", task, "--setting", "smoke", "--data-seeds", "3", "--train-seeds", "5",
                     "--workdir", str(workdir))
    assert again.returncode == first.returncode
    assert (workdir / "table.md").read_text().split("\n\n", 1)[1] == table.split("\n\n", 1)[1]  # reused runs
    assert json.loads(result_file.read_text()) == result and log.read_text() == trained_log  # not trained again

    if task == "beacons":  # the documented picture of both models' detections on one test scene
        picture = tmp_path / "predictions.png"
        drawn = subprocess.run(
            [sys.executable, str(SCRIPT.parent / "detection_picture.py"), "--dataset", str(workdir / "data" / "seed3"),
             "--with-context", str(workdir / "runs" / "data3_train5_context" / "best"),
             "--without-context", str(workdir / "runs" / "data3_train5_nocontext" / "best"),
             "--threshold", "0.0", "--output", str(picture)], capture_output=True, text=True, timeout=300)
        assert drawn.returncode == 0, drawn.stderr[-3000:]
        from PIL import Image

        with Image.open(picture) as image:
            assert image.size[0] > 3 * image.size[1] * 0.9  # three panels side by side: truth, with, without


def test_a_workdir_with_data_of_other_settings_is_refused(tmp_path):
    folder = tmp_path / "data" / "seed0"
    folder.mkdir(parents=True)
    (folder / "protocol.json").write_text(json.dumps({"task": "coastline", "setting": "full"}))
    refused = protocol("--task", "coastline", "--setting", "smoke", "--data-seeds", "0", "--train-seeds", "0",
                       "--workdir", str(tmp_path))
    assert refused.returncode == 2
    assert "other settings" in refused.stderr


def test_a_failed_run_neither_cancels_the_others_nor_passes_for_a_missed_target(tmp_path, monkeypatch, capsys):
    """Exit status 1 means "targets not met"; a run that failed gives 2, after every other run has had its turn."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("context_gain", SCRIPT)
    context_gain = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "context_gain", context_gain)  # dataclasses look their module up there
    spec.loader.exec_module(context_gain)
    ran = []

    def fake_run(task, setting, data, data_seed, train_seed, variant, run_dir):
        ran.append((data_seed, train_seed, variant))
        if (data_seed, train_seed, variant) == (0, 0, "context"):
            raise context_gain.ProtocolError("training failed (a stand-in)")
        return {"data_seed": data_seed, "train_seed": train_seed, "variant": variant, "train_seconds": 1,
                "test_top1": 0.9 if variant == "context" else 0.25}

    monkeypatch.setattr(context_gain, "train_and_score", fake_run)
    monkeypatch.setattr(context_gain, "dataset_folder", lambda workdir, task, name, seed, setting: workdir / str(seed))
    status = context_gain.main(["--task", "relations", "--data-seeds", "0", "1", "--train-seeds", "0",
                                "--jobs", "1", "--workdir", str(tmp_path)])
    assert status == 2
    assert sorted(ran) == [(0, 0, "context"), (0, 0, "nocontext"), (1, 0, "context"), (1, 0, "nocontext")]
    assert "error: training failed (a stand-in)" in capsys.readouterr().err
    assert "| 1 | 0 | context | 0.900 |" in (tmp_path / "table.md").read_text()


def test_a_workdir_that_cannot_be_made_is_named_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    refused = protocol("--setting", "smoke", "--workdir", str(blocker / "protocol"))
    assert refused.returncode == 2
    assert "--workdir" in refused.stderr and "Not a directory" in refused.stderr
    assert not (tmp_path / "data").exists()


def test_a_finished_run_trained_with_other_steps_is_refused_not_reused(tmp_path, monkeypatch):
    """Changing a task's steps and running again in the same workdir must not report the old runs as new."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("context_gain", SCRIPT)
    context_gain = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "context_gain", context_gain)
    spec.loader.exec_module(context_gain)
    task, setting = context_gain.TASKS["relations"], context_gain.SMOKE
    run_dir = tmp_path / "runs" / "data0_train0_context"
    run_dir.mkdir(parents=True)
    old = {**context_gain.run_setting(setting), "max_steps": setting.max_steps + 1}
    (run_dir / "result.json").write_text(json.dumps({"data_seed": 0, "train_seed": 0, "variant": "context",
                                                     "train_seconds": 1, "test_top1": 0.5, "setting": old}))
    with pytest.raises(context_gain.ProtocolError, match="trained with other settings"):
        context_gain.train_and_score(task, setting, tmp_path / "data", 0, 0, "context", run_dir)

    same = {**json.loads((run_dir / "result.json").read_text()), "setting": context_gain.run_setting(setting)}
    (run_dir / "result.json").write_text(json.dumps(same))
    assert context_gain.train_and_score(task, setting, tmp_path / "data", 0, 0, "context", run_dir) == same
