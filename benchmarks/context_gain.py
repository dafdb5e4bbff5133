"""Does the context encoder help? The same model trained with and without it, over data and training seeds.

    python benchmarks/context_gain.py --task coastline --workdir runs/coastline                  # the documented table
    python benchmarks/context_gain.py --task coastline --workdir runs/one --data-seeds 0 --train-seeds 0   # one pair
    python benchmarks/context_gain.py --task beacons --workdir runs/beacons                      # the detection task
    python benchmarks/context_gain.py --task relations --workdir runs/relations                  # the classification task

For every data seed the task's generator writes a dataset (train, validation, test); for every training seed
both models are trained with identical settings from the task's two configs in `configs/train/` (they
differ only in the context encoder); each keeps its best checkpoint on `validation`, and `test` is scored
once, afterwards. The script prints every run, the per-pair gain (same data seed, same training seed), and
mean ± standard deviation (n - 1) of each metric, then says which targets hold on every seed pair.

Everything comes from the repository: the generators, the configs and the training command. Runs go
`--jobs` at a time, one thread each; a finished run (its `result.json`) is reused (one trained with other
steps or batch size is refused, exit status 2), so an interrupted protocol
resumes where it stopped (a run without its result is started again from scratch). A failed run does not stop
the others; the script then exits with status 2 (1 means every run finished but a target was not met). `--setting smoke` runs the whole pipeline on a few tiny images in about a minute
(the numbers mean nothing; the test suite runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
VARIANTS = ("context", "nocontext")


class ProtocolError(Exception):
    """Something that stops the protocol or one of its runs; reported in one line, exit status 2."""


@dataclass(frozen=True)
class Setting:
    """How much data and training one protocol run uses."""

    train: int
    validation: int
    test: int
    max_steps: int
    eval_steps: int
    batch_size: int = 8


@dataclass(frozen=True)
class Task:
    """A synthetic context task: how to generate it, train on it and score it."""

    name: str
    configs: dict[str, str]  # variant → training config in configs/train/
    generator_options: dict
    full: Setting
    metrics: tuple[str, ...]  # what `score` returns, in table order
    targets: dict = field(default_factory=dict)  # metric → (minimum of the context model, minimum gain), per pair

    def generate(self, folder: Path, seed: int, setting: Setting) -> None:
        from xt_hf.synthetic import coastline, detection, relations

        generator = {"coastline": coastline, "beacons": detection, "relations": relations}[self.name]
        dataset = generator.generate_dataset(setting.train, setting.test, num_validation=setting.validation,
                                             seed=seed, **self.generator_options)
        dataset.save_to_disk(str(folder))

    def score(self, model: Path, data: Path, seed: int) -> dict[str, float]:
        from xt_hf.training.score import evaluate_saved_model

        if self.name == "coastline":
            report = evaluate_saved_model(str(model), str(data), "test", seed=seed, **self.generator_options)
            coast_free = report["vessel_accuracy"]["region_shows_no_land"]
            return {"test_mean_iou": report["mean_iou"], "coast_free_vessel_accuracy": coast_free["accuracy"],
                    "coast_free_vessels": coast_free["vessels"]}
        report = evaluate_saved_model(str(model), str(data), "test")
        if self.name == "relations":
            return {"test_top1": report["top1"]}
        return {"test_ap50": report["map_50"], "test_ap": report["map"],
                "test_class_agnostic_ap50": report["map_50_agnostic"]}


TASKS = {
    "coastline": Task(
        name="coastline",
        configs={"context": "coastline_context.yaml", "nocontext": "coastline_nocontext.yaml"},
        generator_options=dict(image_size=256, region_size=32, near_distance=3.5, margin=0.5, num_vessels=(30, 40)),
        full=Setting(train=800, validation=64, test=128, max_steps=1000, eval_steps=100),
        metrics=("test_mean_iou", "coast_free_vessel_accuracy"),
        targets={"coast_free_vessel_accuracy": (0.75, None), "test_mean_iou": (None, 0.05)},
    ),
    "beacons": Task(
        name="beacons",
        configs={"context": "detection_context.yaml", "nocontext": "detection_nocontext.yaml"},
        generator_options=dict(image_size=128, region_size=32, num_objects=(6, 10), num_beacons=1),
        full=Setting(train=800, validation=64, test=128, max_steps=1000, eval_steps=100),
        metrics=("test_ap50", "test_ap", "test_class_agnostic_ap50"),
        targets={"test_ap50": (None, 0.10)},
    ),
    "relations": Task(
        name="relations",
        configs={"context": "relations_xt.yaml", "nocontext": "relations_pool.yaml"},
        generator_options={},
        full=Setting(train=4000, validation=256, test=1000, max_steps=500, eval_steps=100, batch_size=16),
        metrics=("test_top1",),
        targets={"test_top1": (None, 0.5)},
    ),
}

SMOKE = Setting(train=4, validation=2, test=2, max_steps=2, eval_steps=2, batch_size=2)


def dataset_folder(workdir: Path, task: Task, setting_name: str, seed: int, setting: Setting) -> Path:
    """The data of one seed, generated once; a folder made with other settings is an error, never reused."""
    folder = workdir / "data" / f"seed{seed}"
    stamp = {"task": task.name, "setting": setting_name, "seed": seed, "options": repr(task.generator_options),
             "sizes": [setting.train, setting.validation, setting.test]}
    stamp_file = folder / "protocol.json"
    if stamp_file.exists():
        if json.loads(stamp_file.read_text()) != stamp:
            raise ProtocolError(f"{folder} holds data made with other settings ({stamp_file}); use another "
                                f"--workdir")
        return folder
    if folder.exists():
        raise ProtocolError(f"{folder} exists but was not made by this script; use another --workdir")
    task.generate(folder, seed, setting)
    stamp_file.write_text(json.dumps(stamp))
    return folder


def run_setting(setting: Setting) -> dict:
    """What a finished run must share with this invocation to be reused: its training steps and batch."""
    return {"max_steps": setting.max_steps, "eval_steps": setting.eval_steps, "batch_size": setting.batch_size}


def train_and_score(task: Task, setting: Setting, data: Path, data_seed: int, train_seed: int, variant: str,
                    run_dir: Path) -> dict:
    """Train one model in a child process (one thread), then score its best checkpoint on the test split."""
    result_file = run_dir / "result.json"
    if result_file.exists():
        result = json.loads(result_file.read_text())
        trained = result.get("setting")  # absent in results written before runs recorded it
        if trained is not None and trained != run_setting(setting):
            raise ProtocolError(f"{run_dir} was trained with other settings ({trained}, now "
                                f"{run_setting(setting)}); use another --workdir")
        if all(name in result and result[name] == result[name] for name in task.metrics):  # NaN != NaN
            return result
        # A metric the run's scoring lacked (added since, or NaN): score its kept checkpoint again, no retraining.
        result.update(task.score(run_dir / "best", data, data_seed))
        result_file.write_text(json.dumps(result, indent=2))
        return result
    if run_dir.exists():  # an interrupted run of this script: its partial output would mix into the new one
        shutil.rmtree(run_dir)
    command = [sys.executable, "-m", "xt_hf.training",
               "--config", str(REPOSITORY / "configs" / "train" / task.configs[variant]),
               "--dataset", str(data), "--output-dir", str(run_dir), "--seed", str(train_seed),
               "--max-steps", str(setting.max_steps), "--eval-steps", str(setting.eval_steps),
               "--batch-size", str(setting.batch_size), "--checkpointing-steps", "0"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=REPOSITORY)
    if completed.returncode:
        raise ProtocolError(f"training failed ({' '.join(command)}); see {run_dir.parent / run_dir.name}.log")
    seconds = time.perf_counter() - started
    result = {"data_seed": data_seed, "train_seed": train_seed, "variant": variant, "train_seconds": round(seconds),
              "setting": run_setting(setting),
              **task.score(run_dir / "best", data, data_seed)}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def mean_and_spread(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(task: Task, results: list[dict]) -> tuple[str, bool]:
    """The table of every run, the per-pair gains, mean ± sd, and whether every target holds on every pair."""
    lines = ["| data seed | training seed | model | " + " | ".join(task.metrics) + " | training s |",
             "|---|---|---|" + "---|" * (len(task.metrics) + 1)]
    for result in sorted(results, key=lambda r: (r["data_seed"], r["train_seed"], r["variant"])):
        cells = " | ".join(f"{result[name]:.3f}" for name in task.metrics)
        lines.append(f"| {result['data_seed']} | {result['train_seed']} | {result['variant']} | {cells} | "
                     f"{result['train_seconds']} |")
    by_pair = {}
    for result in results:
        by_pair.setdefault((result["data_seed"], result["train_seed"]), {})[result["variant"]] = result
    pairs = [runs for _, runs in sorted(by_pair.items()) if set(runs) == set(VARIANTS)]
    lines += ["", "| metric | with context | without | gain (with − without) |", "|---|---|---|---|"]
    for name in task.metrics:
        with_context = [runs["context"][name] for runs in pairs]
        without = [runs["nocontext"][name] for runs in pairs]
        gains = [a - b for a, b in zip(with_context, without)]
        if pairs:
            lines.append(f"| {name} | {mean_and_spread(with_context)} | {mean_and_spread(without)} | "
                         f"{mean_and_spread(gains)} (min {min(gains):+.3f}) |")
    met = bool(pairs)
    lines.append("")
    for name, (minimum, minimum_gain) in task.targets.items():
        if minimum is not None:
            worst = min((runs["context"][name] for runs in pairs), default=float("nan"))
            holds = bool(pairs) and worst >= minimum
            lines.append(f"target {name} with context ≥ {minimum} on every pair: {'met' if holds else 'NOT met'} "
                         f"(lowest {worst:.3f})")
            met &= holds
        if minimum_gain is not None:
            worst = min((runs["context"][name] - runs["nocontext"][name] for runs in pairs), default=float("nan"))
            holds = bool(pairs) and worst >= minimum_gain
            lines.append(f"target {name} gain ≥ {minimum_gain} on every pair: {'met' if holds else 'NOT met'} "
                         f"(smallest {worst:+.3f})")
            met &= holds
    return "\n".join(lines), met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), default="coastline")
    parser.add_argument("--setting", choices=["full", "smoke"], default="full",
                        help="full: the documented sizes and steps of the task; smoke: a few tiny images, 2 steps")
    parser.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--workdir", type=Path, required=True, help="data, runs and the table go here")
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once, one thread each (default 2)")
    arguments = parser.parse_args(argv)
    if arguments.jobs < 1:
        parser.error("--jobs must be ≥ 1")
    task = TASKS[arguments.task]
    setting = task.full if arguments.setting == "full" else SMOKE
    workdir = arguments.workdir.resolve()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser.error(f"--workdir {workdir}: {error.strerror}")
    if not os.access(workdir, os.W_OK):
        parser.error(f"--workdir {workdir} is not writable")
    started = time.perf_counter()
    work = []
    try:
        for data_seed in arguments.data_seeds:
            data = dataset_folder(workdir, task, arguments.setting, data_seed, setting)
            for train_seed in arguments.train_seeds:
                for variant in VARIANTS:
                    run_dir = workdir / "runs" / f"data{data_seed}_train{train_seed}_{variant}"
                    work.append((task, setting, data, data_seed, train_seed, variant, run_dir))
    except ProtocolError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with ThreadPoolExecutor(arguments.jobs) as pool:  # every run goes ahead even when another fails
        futures = [pool.submit(train_and_score, *job) for job in work]
    results, failures = [], []
    for future in futures:
        try:
            results.append(future.result())
        except ProtocolError as error:
            failures.append(str(error))
    table, met = report(task, results)
    elapsed = time.perf_counter() - started
    header = (f"task {task.name}, setting {arguments.setting} ({setting}), data seeds {arguments.data_seeds}, "
              f"training seeds {arguments.train_seeds}, {arguments.jobs} jobs, {elapsed:.0f} s")
    (workdir / "table.md").write_text(header + "\n\n" + table + "\n")
    print(header, table, sep="\n\n")
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    if failures:
        return 2
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
