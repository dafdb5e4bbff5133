"""Turning a deterministic sample generator into `datasets` splits, shared by the synthetic tasks."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

# Every split draws from its own stream: no sample of one split can reappear in another.
SPLIT_IDS = {"train": 0, "test": 1, "validation": 2, "demo": 3}


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of sample `index` of `split`: any sample can be regenerated on its own."""
    if split not in SPLIT_IDS:
        raise ValueError(f"Unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}.")
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def generated_splits(
    task: str,
    generator_file: str | Path,
    sizes: dict[str, int],
    features,
    make_row: Callable[[np.random.Generator], dict],
    *,
    seed: int,
    settings: Iterable,
):
    """A `datasets.DatasetDict` with `sizes[name]` rows per split (empty splits left out), each row
    `make_row(sample_rng(seed, name, index))`.

    Rows stream to Arrow (no split is held in memory). `datasets` reuses a cached split whose fingerprint
    matches, so the fingerprint holds the task, the split, its size, the seed, `settings` and a hash of
    `generator_file`: a changed generator writes new data instead of returning what the old one made.
    """
    from datasets import Dataset, DatasetDict

    code = hashlib.sha256(Path(generator_file).read_bytes()).hexdigest()[:16]
    settings = "-".join(str(value) for value in settings)

    def split(name: str, size: int) -> Dataset:
        def rows():
            for index in range(size):
                yield make_row(sample_rng(seed, name, index))

        return Dataset.from_generator(rows, features=features, keep_in_memory=False,
                                      fingerprint=f"xt-{task}-{code}-{name}-{size}-{seed}-{settings}")

    return DatasetDict({name: split(name, size) for name, size in sizes.items() if size})


__all__ = ["SPLIT_IDS", "generated_splits", "sample_rng"]
