"""Checkpoint files, one tensor at a time: reading (safetensors, .bin) and streaming sharded writing.

The safetensors format is an 8-byte little-endian header length, a JSON header
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`) and the raw tensor bytes.
Because the header only needs names, dtypes and shapes, an output shard's header can be written before any
tensor is computed, and every tensor is then appended as soon as it exists: peak memory is one tensor, not one
shard. Reading uses plain positioned reads (no mmap), so a tensor that was processed leaves no resident pages.

Public API:
    parse_size("2GB") -> 2_000_000_000
    TensorRef: name, dtype, shape, nbytes, load()
    list_tensors(files) -> [TensorRef]          (all shards of a model, in file order)
    plan_shards(entries, max_bytes) -> [[(name, dtype, shape)]]
    ShardWriter(folder, plan, safe=True): write(name, tensor) in plan order, then finish() -> index or None
    save_sharded(tensors, folder, max_bytes, safe=True)
    weight_file_names(folder) / is_weight_file(name)
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tunesmith.errors import TunesmithError

# ------------------------------------------------------------------------------------------ sizes
_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'2GB' -> 2e9 bytes (Hugging Face's convention: GB = 10^9, GiB = 2^30); '500MB', '1.5GiB', 1000000."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(str(text))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _UNITS:
            raise TunesmithError(
                f"--max-shard-size {text!r} is not a size",
                "write a number with a unit, e.g. 2GB, 500MB or 1GiB",
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise TunesmithError(f"--max-shard-size {text!r} must be positive", "e.g. 2GB")
    return value


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


# ------------------------------------------------------------------------------------------ dtypes
_ST_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_TO_TORCH[_name] = getattr(torch, _attr)
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def nbytes_of(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return math.prod(shape) * dtype_bytes(dtype)


# ------------------------------------------------------------------------------------------ reading
def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, offset where the data block starts) of a .safetensors file; TunesmithError if corrupt."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than a header")
            (size,) = struct.unpack("<Q", raw)
            if size > 100 * 2**20:
                raise ValueError("header larger than 100 MB")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise TunesmithError(f"{path} is not a readable safetensors file ({exc})",
                             "the file is damaged or incomplete: copy or download it again") from None
    return header, 8 + size


@dataclass
class TensorRef:
    """One tensor of a checkpoint file, not read yet."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute byte offset (safetensors only)
    _bin: _BinFile | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)

    def load(self) -> torch.Tensor:
        """The tensor, freshly read into its own memory (CPU)."""
        if self._bin is not None:
            return self._bin.get(self.name)
        buf = torch.empty(self.nbytes, dtype=torch.uint8)
        if self.nbytes:
            with open(self.file, "rb") as f:
                f.seek(self.offset)
                got = f.readinto(buf.numpy())
            if got != self.nbytes:
                raise TunesmithError(f"{self.file} is truncated (tensor {self.name})",
                                     "the file is damaged or incomplete: copy or download it again")
        return buf.view(self.dtype).reshape(self.shape)


class _BinFile:
    """A pytorch_model*.bin shard, memory-mapped on first use and released with `close()`."""

    def __init__(self, path: Path):
        self.path = path
        self._state: dict | None = None

    def state(self) -> dict:
        if self._state is None:
            try:
                # weights_only: a file holding anything but tensors is refused instead of executed
                state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # noqa: BLE001 - pickle / zip errors of every kind
                first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise TunesmithError(f"cannot read {self.path} as plain tensors ({first})",
                                     "convert the model to safetensors, or re-download it") from None
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            if not isinstance(state, dict):
                raise TunesmithError(f"{self.path} does not hold a dict of tensors")
            self._state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return self._state

    def get(self, name: str) -> torch.Tensor:
        return self.state()[name].clone()

    def close(self) -> None:
        self._state = None


def list_tensors(files: Iterable[Path]) -> list[TensorRef]:
    """Every tensor of the given weight files (safetensors or .bin), in file order, without reading data."""
    refs: list[TensorRef] = []
    for file in files:
        file = Path(file)
        if file.suffix == ".safetensors":
            header, start = read_safetensors_header(file)
            items = [(k, v) for k, v in header.items() if k != "__metadata__"]
            items.sort(key=lambda kv: kv[1]["data_offsets"][0])
            for name, info in items:
                dtype = _ST_TO_TORCH.get(info["dtype"])
                if dtype is None:
                    raise TunesmithError(f"{file}: tensor {name} has dtype {info['dtype']}, unknown to this torch")
                refs.append(TensorRef(name, dtype, tuple(info["shape"]), file, start + info["data_offsets"][0]))
        else:
            holder = _BinFile(file)
            for name, tensor in holder.state().items():
                refs.append(TensorRef(name, tensor.dtype, tuple(tensor.shape), file, _bin=holder))
            holder.close()
    return refs


def release(refs: Iterable[TensorRef]) -> None:
    """Drop the memory maps of .bin shards (safetensors refs hold nothing)."""
    for ref in refs:
        if ref._bin is not None:
            ref._bin.close()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A whole (small) checkpoint file: adapters, training checkpoints."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise TunesmithError(f"{path} is not a readable safetensors file ({exc})",
                                 "the file is damaged or incomplete: write it again") from None
    holder = _BinFile(path)
    return dict(holder.state())


# ------------------------------------------------------------------------------------------ planning
Entry = tuple[str, torch.dtype, tuple[int, ...]]


def plan_shards(entries: Sequence[Entry], max_bytes: int) -> list[list[Entry]]:
    """Greedy split into shards of at most max_bytes, in order (a larger tensor gets a shard of its own)."""
    shards: list[list[Entry]] = []
    current: list[Entry] = []
    size = 0
    for entry in entries:
        n = nbytes_of(entry[1], entry[2])
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += n
    if current or not shards:
        shards.append(current)
    return shards


def shard_file_names(count: int, safe: bool) -> list[str]:
    stem, ext = ("model", "safetensors") if safe else ("pytorch_model", "bin")
    if count == 1:
        return [f"{stem}.{ext}"]
    return [f"{stem}-{i:05d}-of-{count:05d}.{ext}" for i in range(1, count + 1)]


def index_file_name(safe: bool) -> str:
    return "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"


_WEIGHT_FILE = re.compile(
    r"^(model|pytorch_model|adapter_model|consolidated)(-\d+-of-\d+|\.\d+)?\.(safetensors|bin|pt|pth)(\.index\.json)?$"
    r"|^(model\.safetensors|pytorch_model\.bin)\.index\.json$"
)


def is_weight_file(name: str) -> bool:
    """True for model weight shards and their index files (what a merge or split rewrites)."""
    return bool(_WEIGHT_FILE.match(name)) or name.endswith(".safetensors")


# ------------------------------------------------------------------------------------------ writing
def _header_bytes(entries: Sequence[Entry], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in entries:
        if dtype not in _TORCH_TO_ST:
            raise TunesmithError(f"tensor {name} has dtype {dtype}, which safetensors cannot store")
        n = nbytes_of(dtype, shape)
        header[name] = {"dtype": _TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data block starts 8-byte aligned, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class ShardWriter:
    """Writes the planned shards into `folder`, tensor by tensor, in plan order; `finish()` writes the index.

    safetensors shards are streamed (header first, then each tensor as it comes). With safe=False a .bin
    shard has to be pickled whole by torch.save, so it is held until complete.
    """

    def __init__(self, folder: Path, plan: list[list[Entry]], *, safe: bool = True,
                 on_bytes: Callable[[int], None] | None = None):
        self.folder = Path(folder)
        self.plan = plan
        self.safe = safe
        self.names = shard_file_names(len(plan), safe)
        self.on_bytes = on_bytes
        self._shard = -1
        self._pos = 0  # next entry within the current shard
        self._file = None
        self._pending: dict[str, torch.Tensor] = {}
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def _open_next(self) -> None:
        self._close_current()
        self._shard += 1
        self._pos = 0
        if self._shard >= len(self.plan):
            raise ValueError("more tensors written than planned")
        if self.safe:
            self._file = open(self.folder / self.names[self._shard], "wb")  # noqa: SIM115 - closed in _close_current
            self._file.write(_header_bytes(self.plan[self._shard], {"format": "pt"}))

    def _close_current(self) -> None:
        if self._shard < 0 or self._shard >= len(self.plan):
            return
        if self._pos != len(self.plan[self._shard]):
            raise ValueError(f"shard {self.names[self._shard]} is missing tensors")
        if self.safe and self._file is not None:
            self._file.close()
            self._file = None
        elif not self.safe:
            torch.save(self._pending, self.folder / self.names[self._shard])
            self._pending = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._shard < 0 or self._pos >= len(self.plan[self._shard]):
            self._open_next()
        exp_name, exp_dtype, exp_shape = self.plan[self._shard][self._pos]
        if name != exp_name or tensor.dtype != exp_dtype or tuple(tensor.shape) != tuple(exp_shape):
            raise ValueError(f"writer got {name} {tensor.dtype} {tuple(tensor.shape)}, "
                             f"planned {exp_name} {exp_dtype} {tuple(exp_shape)}")
        if self.safe:
            self._file.write(_tensor_bytes(tensor))
        else:
            self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pos += 1
        n = tensor.numel() * tensor.element_size()
        self.total_size += n
        self.weight_map[name] = self.names[self._shard]
        if self.on_bytes is not None:
            self.on_bytes(n)

    def finish(self) -> Path | None:
        """Close the last shard; write the index when there is more than one shard."""
        if self._shard < 0:  # nothing written: the one planned shard is empty
            self._open_next()
        if self._shard != len(self.plan) - 1:
            raise ValueError("fewer tensors written than planned")
        self._close_current()
        self._shard = len(self.plan)  # closed
        if len(self.plan) == 1:
            return None
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        path = self.folder / index_file_name(self.safe)
        path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return path

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def save_sharded(tensors: dict[str, torch.Tensor], folder: Path, max_bytes: int, *, safe: bool = True,
                 on_bytes: Callable[[int], None] | None = None) -> list[str]:
    """Write a state dict as HF-style shards (+ index when more than one); returns the shard file names."""
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    plan = plan_shards(entries, max_bytes)
    Path(folder).mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(Path(folder), plan, safe=safe, on_bytes=on_bytes)
    try:
        for shard in plan:
            for name, _, _ in shard:
                writer.write(name, tensors[name])
        writer.finish()
    finally:
        writer.abort()
    return writer.names


def byte_progress(total: int, progress: Callable[[int, int], None] | None) -> Callable[[int], None]:
    """An `on_bytes` callback for ShardWriter that reports (bytes written so far, total) to `progress`."""
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    return on_bytes
