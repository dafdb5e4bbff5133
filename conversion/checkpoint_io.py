"""Read released xT checkpoints safely: tensors only, any device, with or without the trainer payload."""

from __future__ import annotations

import _compat_pickle
import codecs
import io
import pickle
import pickletools
import re
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason in words."""


# A pickled global is `module.name`, both Python identifiers: anything else found in a file is noise.
_GLOBAL_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
# How torch's weights_only unpickler names the global it refused, across torch releases.
_REFUSED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([A-Za-z_][\w.]*)")


def first_line(error: BaseException) -> str:
    """The first non-blank line of an exception's message, or its type when the message is empty."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def file_kind(path: str | Path) -> str | None:
    """'JSON', 'safetensors', 'zip' or 'text' when a file's first bytes say so, else None (binary or pickle)."""
    with open(path, "rb") as file:
        head = file.read(4096)
        size = file.seek(0, io.SEEK_END)
    if len(head) >= 10 and head[8:10] in (b'{"', b"{}") and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"  # 8-byte little-endian header length, then the JSON header
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a cut-off last character is fine
    except UnicodeDecodeError:
        return None
    if not text or not all(c.isprintable() or c in "\t\r\n" for c in text):
        return None
    return "JSON" if text.lstrip()[:1] in ("{", "[") else "text"


KIND_NAMES = {"zip": "a zip file (a PyTorch checkpoint?)", "safetensors": "a safetensors file", "JSON": "a JSON file",
              "text": "a text file", None: "a binary file"}


def describe_file(path: str | Path) -> str:
    """'a JSON file', 'a safetensors file', ... for messages about a file of the wrong kind."""
    return KIND_NAMES[file_kind(path)]


def unsafe_globals(path: str | Path, error: BaseException) -> list[str]:
    """The pickled globals (`module.name`) that made `torch.load(weights_only=True)` refuse a file.

    Asks torch first (`get_unsafe_globals_in_checkpoint`, for `torch.save` zip files), then scans the
    pickle opcodes of legacy or plain pickle files, then reads the name from torch's error message.
    """
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    if finder is not None:
        try:
            found = [name for name in finder(str(path)) if _GLOBAL_NAME.match(name)]
        except Exception:  # noqa: BLE001 - not a zip checkpoint: fall back below
            found = []
        if found:
            return sorted(found)
    found = _globals_in_pickles(Path(path).read_bytes()) - _allowed_globals()  # legacy torch.save, plain pickle
    if found:
        return sorted(found)
    return sorted(set(name.rstrip(".") for name in _REFUSED_GLOBAL.findall(str(error))))


def _allowed_globals() -> set[str]:
    """The globals that weights_only loading accepts (torch's own list when it exposes one)."""
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals()) | set(
            _weights_only_unpickler._get_user_allowed_globals()
        )
    except Exception:  # noqa: BLE001 - private API: without it, trust torch's and the standard containers
        return {"collections.OrderedDict", "builtins.set", "builtins.frozenset"}


def _globals_in_pickles(data: bytes, max_pickles: int = 8) -> set[str]:
    """Every GLOBAL / STACK_GLOBAL in the consecutive pickles at the start of `data` (legacy torch files hold 4)."""
    found: set[str] = set()
    position = 0
    for _ in range(max_pickles):
        if position >= len(data) or (position and data[position] != 0x80):  # later pickles open with PROTO
            break
        strings: list[str] = []  # string operands pushed so far (STACK_GLOBAL takes the last two)
        memo: dict[int, str] = {}
        memo_size, pushed_string = 0, False
        try:
            for opcode, argument, offset in pickletools.genops(io.BytesIO(data[position:])):
                name, was_string, pushed_string = opcode.name, pushed_string, False
                if name == "GLOBAL":  # "module name", Python 2 names as written by protocols 0-2
                    module, _, attribute = argument.partition(" ")
                    module, attribute = _compat_pickle.NAME_MAPPING.get(
                        (module, attribute), (_compat_pickle.IMPORT_MAPPING.get(module, module), attribute))
                    found.add(f"{module}.{attribute}")
                elif name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.add(f"{strings[-2]}.{strings[-1]}")
                elif name.endswith(("UNICODE", "UNICODE8", "STRING")) and isinstance(argument, (str, bytes)):
                    strings.append(argument if isinstance(argument, str) else argument.decode("latin-1"))
                    pushed_string = True
                elif name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                    index = memo_size if name == "MEMOIZE" else argument
                    memo_size += name == "MEMOIZE"
                    if was_string:
                        memo[index] = strings[-1]
                    pushed_string = was_string
                elif name in ("GET", "BINGET", "LONG_BINGET") and argument in memo:
                    strings.append(memo[argument])
                    pushed_string = True
                elif name == "STOP":
                    position += offset + 1
                    break
            else:
                break
        except Exception:  # noqa: BLE001 - not (or no longer) a pickle
            break
    return {name for name in found if _GLOBAL_NAME.match(name)}


def load_original_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The original model's state dict from a `.ckpt`, CPU, contiguous, `module.` prefix stripped.

    Accepts the trainer payload (`{"state_dict": ..., "optimizer_state_dict": ..., ...}`) and a bare
    state dict. Never unpickles arbitrary objects (`weights_only=True`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist or is not a file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes): download or copy it again.")
    if torch_save_format(path) is None and file_kind(path) is None:  # text, JSON, safetensors: named below
        raise CheckpointError(_not_a_checkpoint(path))
    if file_kind(path) == "safetensors":  # named here: whether torch.load reads one depends on the torch release
        raise CheckpointError(_safetensors_is_not_a_checkpoint(path))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = unsafe_globals(path, error)
        if refused:
            raise CheckpointError(
                f"Refused {path}: unpickling it needs code ({', '.join(refused)}), so weights_only loading "
                f"rejected it. Only tensor checkpoints are accepted: re-save its state dict as plain tensors."
            ) from error
        raise CheckpointError(_unreadable(path, error)) from error
    except Exception as error:  # noqa: BLE001 - garbage bytes surface as KeyError, IndexError, EOFError, ...
        raise CheckpointError(_unreadable(path, error)) from error

    state_dict = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError(f"{path} holds no state dict (found {type(payload).__name__}).")
    if {"pixel_values", "logits"} <= state_dict.keys():
        raise CheckpointError(_holds_verify_outputs(path))
    tensors = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor.")
        # Released weights were saved on GPU and in channels_last; safetensors needs contiguous storage.
        tensors[key.removeprefix("module.")] = value.detach().to("cpu").contiguous()
    return tensors


def torch_save_format(path: str | Path) -> str | None:
    """'zip' (what `torch.save` writes since PyTorch 1.6) or 'pickle' (older `torch.save`, a pickle of protocol 2 or
    later) when a file's first bytes say so, else None: then it is no PyTorch checkpoint, whatever its name."""
    with open(path, "rb") as file:
        head = file.read(2)
    if head == b"PK":
        return "zip"
    if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= pickle.HIGHEST_PROTOCOL:
        return "pickle"
    return None


def _not_a_checkpoint(path: Path) -> str:
    """Why the binary file `path` is no PyTorch checkpoint, from what it is: its size and its first bytes (torch's
    own error for it would be an unpickling error that advises retrying with `weights_only=False`)."""
    with open(path, "rb") as file:
        head = file.read(8)
    return (f"{path} is not a readable PyTorch checkpoint, nor a PyTorch checkpoint at all: its "
            f"{path.stat().st_size:,} bytes are {describe_file(path)} starting with {head.hex(' ')}, where torch.save "
            f"writes a zip archive (50 4b 03 04) or, before PyTorch 1.6, a pickle (80 02). Pass the original xT "
            f".ckpt as --checkpoint.")


def _holds_verify_outputs(path: Path) -> str:
    return f"{path} holds `pixel_values` and `logits`: it is a --verify file, not a checkpoint."


def _safetensors_is_not_a_checkpoint(path: Path) -> str:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            names = set(file.keys())
    except Exception:  # noqa: BLE001 - a damaged header: still a safetensors file, not a checkpoint
        names = set()
    if {"pixel_values", "logits"} <= names:
        return _holds_verify_outputs(path)
    return f"{path} is {describe_file(path)}, not a PyTorch checkpoint: pass the original .ckpt as --checkpoint."


def _unreadable(path: Path, error: BaseException) -> str:
    if file_kind(path) in ("JSON", "text"):
        return f"{path} is {describe_file(path)}, not a PyTorch checkpoint: pass the original .ckpt as --checkpoint."
    return f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {_torch_reason(error)}"


def _torch_reason(error: BaseException) -> str:
    """What torch found wrong, without its advice to retry with `weights_only=False` (never right for a file that
    failed to load as tensors: it would run whatever code the file holds)."""
    message = str(error)
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1]
    reason = next((line.strip() for line in message.splitlines() if line.strip()), type(error).__name__)
    if "weights_only" in reason:
        return f"{type(error).__name__} while unpickling it"
    return reason


def non_finite_entries(tensors: dict[str, torch.Tensor]) -> list[str]:
    """`'key (n NaN, m inf)'` for every floating tensor holding NaN or ±inf."""
    entries = []
    for key, tensor in tensors.items():
        if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.device.type == "meta":
            continue
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        if nan or inf:
            counts = [f"{count} {name}" for count, name in ((nan, "NaN"), (inf, "inf")) if count]
            entries.append(f"{key} ({', '.join(counts)})")
    return entries


def check_finite(tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Raise `CheckpointError` naming every tensor of `source` that holds NaN or ±inf."""
    bad = non_finite_entries(tensors)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise CheckpointError(f"{source} has non-finite weights: {shown}. A model with them cannot be converted.")
