"""Many inputs, one results table: expand inputs, skip the ones already done, share them between processes.

`expand_inputs` turns what a user names (files, glob patterns, folders, CSV/JSONL manifests with a `path`
column, a `datasets` dataset saved to disk with a `path` column) into one ordered list of images.
`run_batch` calls a function on each, catches whatever one input raises (its row gets an `error`, the batch
goes on) and writes one table with a row per input, in input order: `.parquet` or `.jsonl`.

Safe to kill at any moment, and resumable:

- every finished input is appended to a journal, `<output>.parts/rank<R>.jsonl`, one JSON line per input,
  flushed and fsync'd before the next input starts (a line torn by `kill -9` is skipped when read);
- the table itself is only ever replaced whole (`writers.atomic_write`: a temporary file, fsync'd, renamed): it is
  rewritten from the journal every `snapshot_seconds` and at the end, so it is always a complete table;
- a rerun reads the journal and skips every input whose key (resolved path, size, modification time) has a
  row without an error; failed inputs are tried again. Its final table equals an uninterrupted run's;
- only a table whose journal says it is ours, made by the same command, model and options, is resumed
  (`check_table_output`): any other existing file is refused unless replacing it is asked for (`fresh`).

Under `accelerate launch` / `torchrun` (`WORLD_SIZE` > 1) the pending inputs are split between the processes
(`PartialState.split_between_processes`), each rank appends to its own journal, and rank 0 gathers the rows
(`gather_object`, so no shared file system is needed) and writes the table in input order.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .sources import NUMPY_SUFFIXES, PIL_SUFFIXES, SLIDE_SUFFIXES, TIFF_SUFFIXES
from .writers import atomic_write, check_output_path

TABLE_SUFFIXES = (".parquet", ".jsonl")
MANIFEST_SUFFIXES = (".csv", ".jsonl")
IMAGE_SUFFIXES = (*TIFF_SUFFIXES, *SLIDE_SUFFIXES, *NUMPY_SUFFIXES, *PIL_SUFFIXES, ".zarr")
SNAPSHOT_SECONDS = 10.0
_GLOB_CHARACTERS = set("*?[")


# ----------------------------------------------------------------------------------------------------------
# Inputs


def _is_zarr_directory(path: Path) -> bool:
    return path.suffix.lower() == ".zarr" or any((path / name).exists() for name in (".zarray", "zarr.json"))


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _manifest_paths(path: Path) -> list[str]:
    """The `path` column of a CSV or JSONL manifest; relative paths are relative to the manifest's folder."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            if "path" not in (reader.fieldnames or []):
                raise ValueError(f"{path}: a manifest needs a 'path' column, found {reader.fieldnames}")
            values = [row["path"] for row in reader]
    else:
        values = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "path" not in record:
                raise ValueError(f"{path}, line {number}: a manifest needs a 'path' field in every line")
            values.append(record["path"])
    return [str(value if Path(value).is_absolute() else path.parent / value) for value in values]


def _dataset_paths(path: Path) -> list[str]:
    from datasets import load_from_disk

    dataset = load_from_disk(str(path))
    if hasattr(dataset, "keys"):  # a DatasetDict: its splits one after the other
        splits = [dataset[name] for name in dataset]
    else:
        splits = [dataset]
    values = []
    for split in splits:
        if "path" not in split.column_names:
            raise ValueError(f"{path}: a saved dataset needs a 'path' column, found {split.column_names}")
        values += [value if Path(value).is_absolute() else str(path / value) for value in split["path"]]
    return values


def expand_inputs(specs: Sequence[str | os.PathLike]) -> list[str]:
    """One ordered list of images from files, glob patterns, folders, manifests and saved datasets.

    A folder is a zarr array (one image), a dataset saved with `save_to_disk` (its `path` column), or else the
    images directly inside it, sorted by name. A `.csv`/`.jsonl` file is a manifest (its `path` column). A
    pattern with `*`, `?` or `[` is expanded (sorted; `**` recurses). Anything else is an image, existing or
    not: a missing file gets an error row, it does not stop the batch. Duplicates keep their first place.
    A pattern, folder or manifest that names no image raises `ValueError`.
    """
    images: list[str] = []
    for spec in map(str, specs):
        path = Path(spec).expanduser()
        if _GLOB_CHARACTERS & set(spec) and not path.exists():
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise ValueError(f"{spec}: the pattern matches no file")
            images += matches
        elif path.is_dir() and _is_saved_dataset(path):
            found = _dataset_paths(path)
            if not found:
                raise ValueError(f"{spec}: the saved dataset has no rows")
            images += found
        elif path.is_dir() and not _is_zarr_directory(path):
            found = sorted(str(child) for child in path.iterdir()
                           if child.suffix.lower() in IMAGE_SUFFIXES and not child.name.startswith("."))
            if not found:
                raise ValueError(f"{spec}: the folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
            images += found
        elif path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file():
            found = _manifest_paths(path)
            if not found:
                raise ValueError(f"{spec}: the manifest lists no image")
            images += found
        else:
            images.append(str(path))
    seen, unique = set(), []
    for image in images:
        resolved = os.path.realpath(image)
        if resolved not in seen:
            seen.add(resolved)
            unique.append(image)
    return unique


def input_key(path: str | os.PathLike) -> str:
    """What makes an input 'the same' on a rerun: its resolved path, size and modification time (ns)."""
    resolved = os.path.realpath(path)
    try:
        status = os.stat(resolved)
    except OSError:
        return f"{resolved}|missing"
    return f"{resolved}|{status.st_size}|{status.st_mtime_ns}"


def output_names(images: Sequence[str], suffix: str) -> dict[str, str]:
    """A file name per input for its per-input output (a mask, a token grid): the input's stem plus `suffix`;
    inputs whose stems collide get the first 8 hex digits of their resolved path's SHA-1 appended."""
    stems = [Path(image).name.split(".")[0] if Path(image).name.lower().endswith((".ome.tif", ".ome.tiff"))
             else Path(image).stem for image in images]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    names = {}
    for image, stem in zip(images, stems):
        if counts[stem] > 1:
            stem += "-" + hashlib.sha1(os.path.realpath(image).encode()).hexdigest()[:8]
        names[image] = stem + suffix
    return names


# ----------------------------------------------------------------------------------------------------------
# The table


def _arrow_type(spec: str):
    import pyarrow as pa

    if spec.startswith("list<") and spec.endswith(">"):
        return pa.list_(_arrow_type(spec[5:-1]))
    return {"string": pa.string(), "float64": pa.float64(), "float32": pa.float32(), "int64": pa.int64()}[spec]


def write_table(path: str | os.PathLike, rows: list[dict], columns: dict[str, str]) -> None:
    """Replace `path` (`.parquet` or `.jsonl`) by a table of `rows` whole (`atomic_write`), so a reader (or a kill)
    never sees half a table."""
    path = Path(path)
    with atomic_write(path) as temporary:
        if path.suffix.lower() == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([(name, _arrow_type(spec)) for name, spec in columns.items()])
            table = pa.Table.from_pylist([{name: row.get(name) for name in columns} for row in rows], schema=schema)
            pq.write_table(table, temporary)
        else:
            with open(temporary, "w") as handle:
                for row in rows:
                    handle.write(json.dumps({name: row.get(name) for name in columns}) + "\n")


def read_table(path: str | os.PathLike) -> list[dict]:
    """The rows of a results table (`.parquet` or `.jsonl`) as dictionaries."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Journal:
    """`<output>.parts/`: `run.json` (what produced the rows) and `rank<R>.jsonl` (one line per finished input,
    `{"key": ..., "row": {...}}`, appended, flushed and fsync'd)."""

    def __init__(self, output: str | os.PathLike):
        output = Path(output)
        self.directory = output.with_name(output.name + ".parts")
        self.run_file = self.directory / "run.json"

    def recorded_signature(self) -> dict | None:
        """What produced the rows (command, model, options), or `None` where no run of ours left a journal."""
        if not self.run_file.is_file():
            return None
        try:
            return json.loads(self.run_file.read_text())
        except ValueError:
            raise ValueError(f"its journal {self.run_file} is not JSON: delete it, or give a new --output") from None

    def check_signature(self, signature: dict) -> None:
        """Rows of another command, model or settings must not be mixed in: refuse them (`ValueError`), naming
        each setting that differs with its recorded and its new value."""
        recorded = self.recorded_signature()
        if recorded is None or recorded == signature:
            return
        changed = sorted(k for k in set(recorded) | set(signature) if recorded.get(k) != signature.get(k))
        values = "; ".join(f"{k} was {recorded.get(k)!r}, now {signature.get(k)!r}" for k in changed)
        raise ValueError(f"holds results of another run (different {', '.join(changed)}): {values}. Give a new "
                         f"--output, or --overwrite to replace it and its journal {self.directory}")

    def clear(self, rank: int) -> None:
        """Forget an earlier run: rank 0 removes what produced the rows and every journal file it sees; each other
        rank its own file (which may lie on a disk rank 0 does not share). Only unlinks, so ranks never race."""
        if not self.directory.is_dir():
            return
        if rank == 0:
            self.run_file.unlink(missing_ok=True)
            parts = sorted(self.directory.glob("rank*.jsonl"))
        else:
            parts = [self.directory / f"rank{rank}.jsonl"]
        for part in parts:
            part.unlink(missing_ok=True)

    def start(self, signature: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.run_file
        if not path.is_file():
            with atomic_write(path) as temporary:
                temporary.write_text(json.dumps(signature, sort_keys=True))

    def read(self) -> dict[str, dict]:
        """Every row in the journal files this process can see, by key; a row without an error wins over one
        with, a later line over an earlier one. Lines that do not parse (torn by a kill) are skipped."""
        rows: dict[str, dict] = {}
        for part in sorted(self.directory.glob("rank*.jsonl")) if self.directory.is_dir() else ():
            for line in part.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                    key, row = record["key"], record["row"]
                except (ValueError, KeyError, TypeError):
                    continue
                if key in rows and rows[key].get("error") is None and row.get("error") is not None:
                    continue
                rows[key] = row
        return rows

    def appender(self, rank: int):
        self.directory.mkdir(parents=True, exist_ok=True)  # another node's rank may not share rank 0's disk
        path = self.directory / f"rank{rank}.jsonl"
        handle = open(path, "a")
        if handle.tell() > 0:
            with open(path, "rb") as reader:
                reader.seek(-1, os.SEEK_END)
                if reader.read(1) != b"\n":  # a line torn by a kill: end it, so that it stays one bad line
                    handle.write("\n")
        return handle


def check_table_output(output: str | os.PathLike, signature: dict, *, overwrite: bool) -> Path:
    """Before any work, whether a run with `signature` may write the results table `output` (`ValueError`, naming
    the file and what differs, if not).

    A table is resumed only where its journal says a run of ours made it with the same command, model and
    options; a table of another run, or any other file at that path (the user's own table, say), is never
    silently replaced: `overwrite` replaces it, and `run_batch(..., fresh=True)` then forgets its journal.
    """
    output, journal = Path(output), Journal(output)
    resumable = False
    if not overwrite:
        journal.check_signature(signature)
        resumable = journal.recorded_signature() is not None
    try:
        return check_output_path(output, suffixes=TABLE_SUFFIXES, overwrite=overwrite or resumable)
    except ValueError as error:
        if output.exists() and not (overwrite or resumable):
            raise ValueError(f"{error} It is not a results table of an earlier run to resume: it has no journal "
                             f"{journal.run_file}.") from None
        raise


# ----------------------------------------------------------------------------------------------------------
# The run


@dataclass
class BatchSummary:
    total: int
    failed: int
    skipped: int
    output: Path

    @property
    def succeeded(self) -> int:
        return self.total - self.failed

    def line(self, command: str) -> str:
        return (f"{command}: {self.succeeded} of {self.total} inputs succeeded, {self.failed} failed"
                f" ({self.skipped} already done, skipped); results in {self.output}")


def distributed_state(cpu: bool = False):
    """Accelerate's `PartialState` when this process is one of several (`WORLD_SIZE` > 1, as set by
    `accelerate launch` and `torchrun`), else `None`. `cpu=True` joins the processes over gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def run_batch(
    images: Sequence[str],
    work: Callable[[str], dict],
    output: str | os.PathLike,
    *,
    columns: dict[str, str],
    signature: dict,
    state=None,
    snapshot_seconds: float = SNAPSHOT_SECONDS,
    progress: bool = True,
    fresh: bool = False,
) -> BatchSummary:
    """Call `work(image)` for each image not already done and write one table to `output`.

    `work` returns the row's result columns; whatever it raises (except `KeyboardInterrupt`) becomes the row's
    `error` (`"ValueError: ..."`), and the batch goes on. Every row has `path`, the result columns, `seconds`
    and `error` (`columns` names them all, with types: `string`, `float64`, `list<float32>`, ...).
    `state`: `distributed_state()`; with several processes every one must call this with the same inputs.
    `fresh`: forget the journal of an earlier run first (the replacing run of `check_table_output(overwrite=True)`).
    """
    output = Path(output)
    journal = Journal(output)
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    if fresh:
        journal.clear(rank)
    if rank == 0:
        journal.start(signature)
    if state is not None:
        state.wait_for_everyone()
    done = journal.read()
    if state is not None:  # the journals other ranks can see (no shared file system needed)
        from accelerate.utils import gather_object

        for seen in gather_object([done]):
            for key, row in seen.items():
                if key not in done or (done[key].get("error") is not None and row.get("error") is None):
                    done[key] = row
    keys = {image: input_key(image) for image in images}
    pending = [image for image in images if keys[image] not in done or done[keys[image]].get("error") is not None]
    mine = pending
    if state is not None:
        with state.split_between_processes(pending) as share:
            mine = list(share)
    wanted = set(keys.values())
    rows = {key: row for key, row in done.items() if key in wanted}
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), unit="image", desc=f"{len(pending)} inputs" + (f" on {world} processes"
                                                                                  if world > 1 else ""))
    last_snapshot = time.monotonic()
    with journal.appender(rank) as handle:
        for image in mine:
            start = time.perf_counter()
            try:
                row, error = dict(work(image)), None
            except Exception as exception:  # noqa: BLE001  (one bad input never stops the batch)
                row, error = {}, f"{type(exception).__name__}: {exception}".strip()
                if os.environ.get("XT_HF_BATCH_TRACEBACKS"):
                    traceback.print_exc()
            row.update(path=str(image), seconds=time.perf_counter() - start, error=error)
            rows[keys[image]] = row
            handle.write(json.dumps({"key": keys[image], "row": row}) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
            if bar is not None:
                bar.update()
            if world == 1 and time.monotonic() - last_snapshot > snapshot_seconds:
                write_table(output, _in_order(images, keys, rows), columns)
                last_snapshot = time.monotonic()
    if bar is not None:
        bar.close()
    if state is not None:
        from accelerate.utils import gather_object

        mine_keys = {keys[image] for image in mine}
        for finished in gather_object([{key: rows[key] for key in mine_keys}]):
            rows.update(finished)
    table = _in_order(images, keys, rows)
    if rank == 0:
        write_table(output, table, columns)
    if state is not None:
        state.wait_for_everyone()
    failed = sum(row.get("error") is not None for row in table)
    return BatchSummary(total=len(images), failed=failed, skipped=len(images) - len(pending), output=output)


def _in_order(images: Sequence[str], keys: dict[str, str], rows: dict[str, dict]) -> list[dict]:
    """The rows present, in input order, each with the path as this run names it."""
    return [{**rows[keys[image]], "path": str(image)} for image in images if keys[image] in rows]


__all__ = [
    "IMAGE_SUFFIXES",
    "MANIFEST_SUFFIXES",
    "TABLE_SUFFIXES",
    "BatchSummary",
    "Journal",
    "check_table_output",
    "distributed_state",
    "expand_inputs",
    "input_key",
    "output_names",
    "read_table",
    "run_batch",
    "write_table",
]
