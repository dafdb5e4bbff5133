"""Token buffers kept in a file on disk instead of in the process's memory ("spilled").

An exact attention block needs its input tokens and the heads' outputs at once, two token-grid-sized
buffers (`context.update_attention_block`): 4 GiB for a 29,000 × 25,000 px scene in float32. Spilled,
each buffer is a tensor over a shared memory map of an unnamed temporary file, and the in-place context
encoder releases the pages of every chunk it has finished with. The process then holds only the chunks
in use; the rest lives in the file, cached by the kernel while memory is free and written back when it is
not. Releasing a page of a shared file mapping loses nothing: the next access maps the file's up-to-date
contents again. Releasing is a no-op for ordinary tensors, so model code calls it unconditionally.
"""

from __future__ import annotations

import math
import mmap
import os
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path

import torch

# Every live spill mapping: (first address, size in bytes, weak reference to the mmap, directory).
# A tensor keeps its mmap alive, so an address found here is always one of these file mappings.
_MAPPINGS: list[tuple[int, int, weakref.ref, Path]] = []


def spilled_empty(shape: tuple[int, ...], *, dtype: torch.dtype, directory: str | os.PathLike) -> torch.Tensor:
    """An uninitialised CPU tensor of `shape` whose storage is an unnamed file in `directory`.

    The file has no name from the start (deleted on creation), so nothing is left behind however the
    process ends; its disk space is reserved up front, so a full disk fails here with a clear error
    rather than later inside a forward pass.
    """
    if not hasattr(mmap, "MADV_DONTNEED"):
        raise ValueError("Spilling tokens to disk needs a Linux or other POSIX system with madvise.")
    directory = Path(directory)
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    ensure_free_space(directory, size)
    if size == 0:
        return torch.empty(shape, dtype=dtype)
    kind = filesystem_type(directory)
    if kind in _MEMORY_FILESYSTEMS:
        warnings.warn(
            f"The spill directory {str(directory)!r} is on a {kind} file system, which keeps "
            f"its files in memory: spilling there saves no memory. Choose a directory on a disk.", stacklevel=2,
        )
    with tempfile.TemporaryFile(dir=directory) as handle:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(handle.fileno(), 0, size)
            else:  # macOS: a sparse file of the right size (the free-space check above still applies)
                os.ftruncate(handle.fileno(), size)
        except OSError as error:
            raise ValueError(
                f"Could not reserve {size / 2**30:.2f} GiB in the spill directory {str(directory)!r}: {error}."
            ) from error
        mapping = mmap.mmap(handle.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    tensor = torch.frombuffer(mapping, dtype=dtype, count=math.prod(shape)).view(shape)
    _MAPPINGS[:] = [entry for entry in _MAPPINGS if entry[2]() is not None]
    _MAPPINGS.append((tensor.data_ptr(), size, weakref.ref(mapping), directory))
    return tensor


def ensure_free_space(directory: str | os.PathLike, size: int) -> None:
    """Fail, naming the problem, unless `directory` is a directory with `size` bytes free (checked before long
    work starts)."""
    if not Path(directory).is_dir():
        raise ValueError(f"The spill directory {str(directory)!r} does not exist or is not a directory.")
    free = shutil.disk_usage(directory).free
    if free < size:
        raise ValueError(
            f"The spill directory {str(directory)!r} has {free / 2**30:.2f} GiB free, but the token buffers need "
            f"{size / 2**30:.2f} GiB: choose a directory on a larger disk."
        )


_MEMORY_FILESYSTEMS = {"tmpfs", "ramfs", "devtmpfs"}


def filesystem_type(directory: Path) -> str | None:
    """The type of the file system `directory` is on (`/proc/mounts`, Linux), or None where unknown."""
    try:
        with open("/proc/mounts") as mounts:
            entries = [line.split()[1:3] for line in mounts]
    except OSError:
        return None
    path = str(directory.resolve())
    mounted = [(point, kind) for point, kind in entries
               if path == point or path.startswith(point.rstrip("/") + "/")]
    return max(mounted, key=lambda entry: len(entry[0]))[1] if mounted else None


def _mapping_of(tensor: torch.Tensor) -> tuple[int, int, mmap.mmap, Path] | None:
    if not _MAPPINGS or tensor.device.type != "cpu" or tensor.numel() == 0:
        return None
    address = tensor.data_ptr()
    for base, size, reference, directory in _MAPPINGS:
        mapping = reference()
        if mapping is not None and base <= address < base + size:
            return base, size, mapping, directory
    return None


def spill_directory(tensor: torch.Tensor) -> Path | None:
    """The directory of the file holding `tensor`, or None for a tensor in memory."""
    found = _mapping_of(tensor)
    return None if found is None else found[3]


def empty_beside(reference: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised tensor of `shape` kept where `reference` is: spilled into the same directory if it
    is spilled, in memory (its device and dtype) otherwise."""
    directory = spill_directory(reference)
    if directory is None:
        return reference.new_empty(shape)
    return spilled_empty(shape, dtype=reference.dtype, directory=directory)


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the process's resident pages under `tensor` (a view of a spilled buffer); its values stay in
    the file. Nothing happens for a tensor in memory."""
    found = _mapping_of(tensor)
    if found is None:
        return
    base, _, mapping, _ = found
    last_element = sum((length - 1) * stride for length, stride in zip(tensor.shape, tensor.stride()))
    first = tensor.data_ptr() - base
    drop_mapped_pages(mapping, first, first + (last_element + 1) * tensor.element_size())


def drop_mapped_pages(mapping: mmap.mmap, first: int, last: int) -> None:
    """Drop the process's resident pages of bytes `first:last` of a file mapping (from the page holding
    `first`, to the mapping's end at most). Only for mappings whose pages the file holds too: shared or
    read-only ones."""
    last = min(last, len(mapping))
    first -= first % mmap.PAGESIZE
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
