"""The training loop, with 🤗 Accelerate: one loop from a laptop CPU to many GPUs and nodes.

Distribution, mixed precision, gradient accumulation, checkpoint state and trackers are Accelerate's; the
task (`tasks.py`) says what the model, the loss and the metrics are.

What a run writes to `output_dir`:
    checkpoints/step_000200/  `accelerator.save_state` (model, optimizer, scheduler, RNG, progress);
                              written under a `.tmp` name and renamed when complete
    best/                     the best model by eval top-1 (segmentation: mean IoU; detection: AP50):
                              `save_pretrained` + image processor, loads with `AutoModelForImageClassification`
                              (or `AutoModelForSemanticSegmentation`, `AutoModelForObjectDetection`)
                              `.from_pretrained`
    metrics.jsonl             every logged metric, one JSON object per line
    train_config.yaml         the resolved settings
A run started again with the same `output_dir` resumes from the newest complete checkpoint, at the same
position in the data, and ends where an uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .arguments import TrainConfig
from .data import load_splits
from .tasks import load_model_and_processor, load_model_config, make_task, parameter_groups

logger = logging.getLogger("xt_hf.train")

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


class TrainingProgress:
    """Where the run is; saved with every checkpoint (`register_for_checkpointing`)."""

    def __init__(self):
        self.global_step = 0  # optimizer steps done
        self.epoch = 0
        self.batches_in_epoch = 0  # batches of `epoch` already consumed
        self.best_metric = -math.inf  # the task's best_metric (top-1, mean IoU, or AP50) of the best model so far
        self.best_step = -1

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        if "best_top1" in state:  # checkpoints written before segmentation training
            state["best_metric"] = state.pop("best_top1")
        vars(self).update(state)


class JsonLinesTracker(GeneralTracker):
    """An Accelerate tracker appending every logged dict to `path` (`metrics.jsonl`), one JSON object a line,
    so that every run leaves a machine-readable log whatever `report_to` says."""

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: Path):
        super().__init__(_blank=True)
        self.path = Path(path)

    @property
    def tracker(self):
        return self.path

    def start(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps({"step": step, **values}) + "\n")


def train(config: TrainConfig) -> dict[str, float]:
    """Run (or resume) a training run; returns the final eval metrics (empty without an eval split)."""
    output_dir = Path(config.output_dir)
    trackers = [name.strip() for name in config.report_to.split(",") if name.strip() and name.strip() != "none"]
    accelerator = Accelerator(
        cpu=config.cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=[*trackers, JsonLinesTracker(output_dir / "metrics.jsonl")],
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # The sampler reshuffles from (seed, epoch) alone, so a resumed run sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(config.seed)

    train_split, eval_split = load_splits(config, accelerator)
    model_config = load_model_config(config)
    task = make_task(config, model_config, train_split)
    model, processor = load_model_and_processor(config, model_config, task, train_split)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if config.compile:
        compile_model(model)
    train_dataset = task.prepare(train_split, processor, model.config)
    eval_dataset = task.prepare(eval_split, processor, model.config) if eval_split is not None else None
    collate = task.collator(processor, model.config)
    loader_options = dict(collate_fn=collate, num_workers=config.num_workers,
                          pin_memory=accelerator.device.type == "cuda", persistent_workers=config.num_workers > 0)
    train_loader = DataLoader(train_dataset, batch_size=config.batch_size, shuffle=True, drop_last=False,
                              **loader_options)
    eval_loader = (DataLoader(eval_dataset, batch_size=config.eval_batch_size or config.batch_size, shuffle=False,
                              **loader_options) if eval_dataset is not None else None)

    optimizer = torch.optim.AdamW(parameter_groups(model, config.optimization_arguments),
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon)
    _fsdp_wrap_present_layers(accelerator, model)
    num_labels = model.config.num_labels
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    max_steps = config.max_steps if config.max_steps is not None else math.ceil(config.num_epochs * steps_per_epoch)
    warmup_steps = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * max_steps)
    # The prepared scheduler steps once per process at every optimizer step, hence the factors.
    scheduler = get_scheduler(config.lr_scheduler, optimizer,
                              num_warmup_steps=warmup_steps * accelerator.num_processes,
                              num_training_steps=max_steps * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)

    checkpoint = _checkpoint_to_resume(config, output_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        logger.info("Resumed from %s (step %d, epoch %d, batch %d).", checkpoint, progress.global_step,
                    progress.epoch, progress.batches_in_epoch)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    accelerator.init_trackers(config.project_name, config=_flat_hparams(config))

    total_batch = config.batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    logger.info("%s: %d training images, %s eval images, %d classes; %d steps of %d images (%d per device × %d "
                "processes × %d accumulation), %d steps per epoch.", task.name, len(train_dataset),
                len(eval_dataset) if eval_dataset is not None else "no", num_labels, max_steps,
                total_batch, config.batch_size, accelerator.num_processes, config.gradient_accumulation_steps,
                steps_per_epoch)

    def evaluate_and_keep_best() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            metrics = task.evaluate(model, eval_loader, accelerator)
        model.train()
        accelerator.log(metrics, step=progress.global_step)
        logger.info("step %d: %s", progress.global_step,
                    ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
        if metrics[task.best_metric] > progress.best_metric:
            progress.best_metric, progress.best_step = metrics[task.best_metric], progress.global_step
            save_model(accelerator, model, processor, output_dir / "best",
                       {**metrics, "step": progress.global_step, "epoch": progress.epoch})
        return metrics

    model.train()
    bar = tqdm(total=max_steps, initial=progress.global_step, desc="train", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    running_loss = torch.zeros((), device=accelerator.device)
    running_batches = 0
    last_log_time, last_log_step = time.perf_counter(), progress.global_step
    metrics: dict[str, float] = {}
    evaluated_at = -1
    batches_per_epoch = len(train_loader)
    if progress.batches_in_epoch >= batches_per_epoch:
        progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0

    while progress.global_step < max_steps:
        train_loader.set_epoch(progress.epoch)
        skipped = progress.batches_in_epoch
        epoch_loader = accelerator.skip_first_batches(train_loader, skipped) if skipped else train_loader
        for batch in epoch_loader:
            # Every step draws from a generator seeded by (seed, step, rank), so that dropout and grad_ratio's
            # region choice do not depend on how many steps ran since the process started (resume-exact).
            micro_step = progress.epoch * batches_per_epoch + progress.batches_in_epoch
            torch.manual_seed((config.seed << 32) + micro_step * accelerator.num_processes
                              + accelerator.process_index)
            with accelerator.accumulate(model):
                loss = task.loss(model, batch)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and config.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            progress.batches_in_epoch += 1
            running_loss += loss.detach()
            running_batches += 1
            if not accelerator.sync_gradients:
                continue

            progress.global_step += 1
            bar.update(1)
            if progress.global_step % config.logging_steps == 0 or progress.global_step == max_steps:
                mean_loss = accelerator.reduce(running_loss / running_batches, reduction="mean").item()
                elapsed = time.perf_counter() - last_log_time
                steps = progress.global_step - last_log_step
                logged = {"train/loss": mean_loss, "train/epoch": progress.epoch + progress.batches_in_epoch
                          / batches_per_epoch, "train/images_per_second": steps * total_batch / max(elapsed, 1e-9)}
                for group in optimizer.param_groups:
                    if not group["name"].endswith("_no_decay"):
                        logged[f"train/lr_{group['name']}"] = group["lr"]
                if grad_norm is not None:
                    logged["train/grad_norm"] = float(grad_norm)
                if accelerator.device.type == "cuda":
                    logged["train/peak_memory_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
                accelerator.log(logged, step=progress.global_step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                running_loss.zero_()
                running_batches = 0
                last_log_time, last_log_step = time.perf_counter(), progress.global_step
            if eval_loader is not None and config.eval_steps and progress.global_step % config.eval_steps == 0:
                metrics, evaluated_at = evaluate_and_keep_best(), progress.global_step
            if config.checkpointing_steps and progress.global_step % config.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, progress.global_step, config.checkpoints_total_limit)
            if progress.global_step >= max_steps:
                break

        if progress.batches_in_epoch >= batches_per_epoch:
            if eval_loader is not None and not config.eval_steps and evaluated_at != progress.global_step:
                metrics, evaluated_at = evaluate_and_keep_best(), progress.global_step
            progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
    bar.close()

    if eval_loader is not None and evaluated_at != progress.global_step:
        metrics = evaluate_and_keep_best()
    if eval_loader is None and progress.global_step > 0:
        save_model(accelerator, model, processor, output_dir / "best", {"step": progress.global_step})
    if config.checkpointing_steps and not (output_dir / "checkpoints" / f"step_{progress.global_step:06d}").exists():
        save_checkpoint(accelerator, output_dir, progress.global_step, config.checkpoints_total_limit)
    if config.verify_replicas:
        _verify_replicas(accelerator, model, output_dir)
    accelerator.end_training()
    if metrics:
        best_key = "best/" + task.best_metric.split("/", 1)[1]  # best/top1, best/mean_iou or best/map_50
        metrics = {**metrics, best_key: progress.best_metric, "best/step": progress.best_step}
    return metrics


def compile_model(model: torch.nn.Module, **compile_options) -> torch.nn.Module:
    """`compile: true`: compiles, in place, the modules that do nearly all the arithmetic, the region encoder's
    backbone and the context encoder (`nn.Module.compile`: parameters and state-dict keys unchanged, so
    checkpoints, `save_pretrained` and Accelerate's wrapping see the same model). The region loop, stitching
    and the heads stay eager: they are cheap, and the loop's `grad_ratio` draw and chunking would break the
    graph anyway. `compile_options` go to `torch.compile` (e.g. `backend="aot_eager"`)."""
    xt = model.base_model  # XTModel under every task head
    xt.region_encoder.backbone.compile(**compile_options)
    if xt.context_encoder is not None:
        xt.context_encoder.compile(**compile_options)
    return model


def save_model(accelerator, model, processor, folder: Path, metrics: dict) -> None:
    """`save_pretrained` of the unwrapped model (full state dict, also under FSDP) and the image processor."""
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP: every process calls it
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(folder, state_dict=state_dict, save_function=accelerator.save)
        processor.save_pretrained(folder)
        (folder / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """`accelerator.save_state` into `checkpoints/step_N.tmp`, renamed to `step_N` once every process is done,
    so that a run killed mid-save never resumes from half a checkpoint."""
    folder = output_dir / "checkpoints" / f"step_{step:06d}"
    partial = folder.with_name(folder.name + ".tmp")
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
        if total_limit:
            for old in _complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return folder


def _complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    folder = output_dir / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step_*") if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found)]


def _checkpoint_to_resume(config: TrainConfig, output_dir: Path) -> Path | None:
    if config.resume == "none":
        return None
    if config.resume != "auto":
        path = Path(config.resume)
        if not path.is_dir():
            raise ValueError(f"`resume` checkpoint {path} does not exist.")
        return path
    checkpoints = _complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _fsdp_wrap_present_layers(accelerator, model) -> None:
    """Under FSDP's transformer-based wrap, name only the `_no_split_modules` classes this model contains
    (Accelerate fails on a listed class that is absent, e.g. `XTMambaBlock` in an attention model)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or getattr(plugin, "transformer_cls_names_to_wrap", None) is not None:
        return
    present = {type(module).__name__ for module in model.modules()}
    plugin.transformer_cls_names_to_wrap = [name for name in model._no_split_modules if name in present]


def _verify_replicas(accelerator, model, output_dir: Path) -> None:
    """Hash this process's weights to `weights_rank{R}.sha256`; fail if the processes disagree."""
    digest = hashlib.sha256()
    for name, tensor in sorted(accelerator.unwrap_model(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    hexdigest = digest.hexdigest()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"weights_rank{accelerator.process_index}.sha256").write_text(hexdigest + "\n")
    hashes = gather_object([hexdigest])
    if len(set(hashes)) != 1:
        raise RuntimeError(f"The processes ended with different weights: {hashes}.")
    logger.info("All %d processes hold identical weights (sha256 %s).", len(hashes), hexdigest[:16])


def _flat_hparams(config: TrainConfig) -> dict[str, Any]:
    """Tracker-friendly hyper-parameters: scalars only, dicts flattened to dotted keys."""
    flat = {}
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v if isinstance(v, int | float | str | bool) else str(v)
                         for k, v in value.items()})
        else:
            flat[key] = value
    return flat


__all__ = ["JsonLinesTracker", "TrainingProgress", "save_checkpoint", "save_model", "train"]
