"""Token buffers kept in a file on disk instead of in the process's memory ("spilled").

An exact attention block needs its input tokens and the heads' outputs at once, two token-grid-sized
buffers (`context.update_attention_block`): 4 GiB for a 29,000 × 25,000 px scene in float32. Spilled,
each buffer is a tensor over a shared memory map of an unnamed temporary file, and the in-place context
encoder releases the pages of every chunk it has finished with. The process then holds only the chunks
in use; the rest lives in the file, cached by the kernel while memory is free and written back when it is
not. Releasing a page of a shared file mapping loses nothing: the next access maps the file's up-to-date
contents again.

Where buffers live is an object the engine makes once per scene and passes along: `InMemory` (the default:
ordinary tensors, releasing does nothing) or `Spill` (files in one directory, and the mappings it made).
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


class InMemory:
    """Token buffers in the process's memory (or the device's): ordinary tensors, nothing to release."""

    def empty(self, shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str = "cpu",
              buffers: int = 1) -> torch.Tensor:
        """An uninitialised tensor of `shape` (`buffers`: how many of this size will be made, for `Spill`'s disk check)."""
        return torch.empty(shape, dtype=dtype, device=device)

    def empty_beside(self, reference: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised tensor of `shape` kept where `reference` is (its device and dtype)."""
        return reference.new_empty(shape)

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the process's resident pages under `tensor`: nothing to do in memory."""


IN_MEMORY = InMemory()


class Spill(InMemory):
    """Token buffers in unnamed files in `directory`, each a tensor over a shared memory map of its file.

    The directory is checked when the object is made, before long work starts; the object remembers the
    mappings it made (weakly: a file goes when its last tensor does) to release pages of their tensors.
    """

    def __init__(self, directory: str | os.PathLike):
        if not hasattr(mmap, "MADV_DONTNEED"):
            raise ValueError("Spilling tokens to disk needs a Linux or other POSIX system with madvise.")
        self.directory = Path(directory)
        ensure_free_space(self.directory, 0)
        kind = filesystem_type(self.directory)
        if kind in _MEMORY_FILESYSTEMS:
            warnings.warn(
                f"The spill directory {str(directory)!r} is on a {kind} file system, which keeps "
                f"its files in memory: spilling there saves no memory. Choose a directory on a disk.", stacklevel=2,
            )
        # (first address, size in bytes, weak reference to the mmap) of every mapping made here.
        self._mappings: list[tuple[int, int, weakref.ref]] = []

    def empty(self, shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device | str = "cpu",
              buffers: int = 1) -> torch.Tensor:
        """An uninitialised CPU tensor of `shape` whose storage is an unnamed file in the directory.

        The file has no name from the start (deleted on creation), so nothing is left behind however the
        process ends. Room for `buffers` tensors of this size is checked and this one's space reserved up
        front, so a full disk fails here with a clear error rather than later inside a forward pass.
        """
        if torch.device(device).type != "cpu":
            raise ValueError(f"Spilling tokens to disk is for CPU inference; the model runs on {device}.")
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        ensure_free_space(self.directory, buffers * size)
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        with tempfile.TemporaryFile(dir=self.directory) as handle:
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(handle.fileno(), 0, size)
                else:  # macOS: a sparse file of the right size (the free-space check above still applies)
                    os.ftruncate(handle.fileno(), size)
            except OSError as error:
                raise ValueError(f"Could not reserve {size / 2**30:.2f} GiB in the spill directory "
                                 f"{str(self.directory)!r}: {error}.") from error
            mapping = mmap.mmap(handle.fileno(), size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        tensor = torch.frombuffer(mapping, dtype=dtype, count=math.prod(shape)).view(shape)
        self._mappings = [entry for entry in self._mappings if entry[2]() is not None]
        self._mappings.append((tensor.data_ptr(), size, weakref.ref(mapping)))
        return tensor

    def empty_beside(self, reference: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised tensor of `shape` and `reference`'s dtype, spilled into the directory too."""
        return self.empty(shape, dtype=reference.dtype)

    def mapping_of(self, tensor: torch.Tensor) -> tuple[int, mmap.mmap] | None:
        """`(first address, mapping)` of the file mapping made here that holds `tensor`, or None."""
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            return None
        address = tensor.data_ptr()
        for base, size, reference in self._mappings:
            mapping = reference()
            if mapping is not None and base <= address < base + size:
                return base, mapping
        return None

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the process's resident pages under `tensor` (a view of a buffer spilled here); its values stay
        in the file. Nothing happens for a tensor this object did not make."""
        found = self.mapping_of(tensor)
        if found is None:
            return
        base, mapping = found
        last_element = sum((length - 1) * stride for length, stride in zip(tensor.shape, tensor.stride()))
        first = tensor.data_ptr() - base
        drop_mapped_pages(mapping, first, first + (last_element + 1) * tensor.element_size())


def token_storage(spill_directory: str | os.PathLike | None) -> InMemory:
    """Where an entry point's token buffers live: `Spill(spill_directory)`, or in memory for None."""
    return IN_MEMORY if spill_directory is None else Spill(spill_directory)


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


def drop_mapped_pages(mapping: mmap.mmap, first: int, last: int) -> None:
    """Drop the process's resident pages of bytes `first:last` of a file mapping (from the page holding
    `first`, to the mapping's end at most). Only for mappings whose pages the file holds too: shared or
    read-only ones."""
    last = min(last, len(mapping))
    first -= first % mmap.PAGESIZE
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)
