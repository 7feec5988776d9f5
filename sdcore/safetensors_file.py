"""The one safetensors reader: a checked header, then each tensor by plain file reads.

Format (https://github.com/huggingface/safetensors, its README): an 8-byte little-endian header
length, a JSON header (dtype, shape, data_offsets relative to the end of the header, per tensor;
an optional `__metadata__` of strings), then the raw little-endian data. The header is checked
against the file's size before any tensor is read, so a truncated or corrupt file is one clear
error. Reads are plain `readinto`, never a memory map (its pages would stay resident until the file
is closed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import numpy as np

from sdcore.errors import SdcoreError

# safetensors dtype -> (torch-style name, NumPy dtype of the stored elements). NumPy has no bfloat16:
# its 16-bit words are read as uint16 and widened to float32 exactly (`read_tensor`).
DTYPES = {
    "F64": ("float64", "<f8"),
    "F32": ("float32", "<f4"),
    "F16": ("float16", "<f2"),
    "BF16": ("bfloat16", "<u2"),
    "I64": ("int64", "<i8"),
    "I32": ("int32", "<i4"),
    "I16": ("int16", "<i2"),
    "I8": ("int8", "i1"),
    "U64": ("uint64", "<u8"),
    "U32": ("uint32", "<u4"),
    "U16": ("uint16", "<u2"),
    "U8": ("uint8", "u1"),
    "BOOL": ("bool", "?"),
}
# a header larger than this is not a safetensors header (the format itself caps it at 100 MB)
MAX_HEADER = 100_000_000


@dataclasses.dataclass(frozen=True)
class Entry:
    """A tensor of a safetensors file, not yet read: dtype code, shape, and absolute byte range."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def stored_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.dtype][1])

    @property
    def source_dtype(self) -> str:
        """The dtype's torch-style name ("bfloat16", "float16", ...)."""
        return DTYPES[self.dtype][0]


def read_header(path: str | os.PathLike) -> tuple[dict[str, Entry], dict | None]:
    """(name -> Entry in file order, `__metadata__` or None), checked against the file's size."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SdcoreError(f"{path} is a truncated safetensors file: it has {size} bytes, fewer than the "
                                  f"8 of its header length")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER:
                raise SdcoreError(f"{path} is not a valid safetensors file (header length {length})")
            if 8 + length > size:
                raise SdcoreError(f"{path} is a truncated safetensors file: its header needs {8 + length} bytes, "
                                  f"the file has {size}")
            raw = f.read(length)
    except FileNotFoundError:
        raise SdcoreError(f"{path} does not exist") from None
    except OSError as err:
        raise SdcoreError(f"{path} cannot be read ({err})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SdcoreError(f"{path} is a corrupt safetensors file: its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise SdcoreError(f"{path} is a corrupt safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    data_start = 8 + length
    entries = {}
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            dtype, shape = info["dtype"], info["shape"]
        except (TypeError, KeyError, ValueError):
            raise SdcoreError(f"{path} is a corrupt safetensors file: bad header entry for {name!r}") from None
        if dtype not in DTYPES:
            raise SdcoreError(f"{path}: tensor {name!r} has dtype {dtype}, which sdcore cannot read")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise SdcoreError(f"{path} is a corrupt safetensors file: tensor {name!r} has shape {shape!r}")
        nbytes = int(np.prod(shape, dtype=object)) * np.dtype(DTYPES[dtype][1]).itemsize
        if not (type(begin) is int and type(end) is int and 0 <= begin <= end and end - begin == nbytes):
            raise SdcoreError(f"{path} is a corrupt safetensors file: tensor {name!r} has offsets {begin}..{end} "
                              f"for {nbytes} bytes of {dtype} {shape}")
        if data_start + end > size:
            raise SdcoreError(f"{path} is a truncated safetensors file: tensor {name!r} ends at byte "
                              f"{data_start + end}, the file has {size}")
        entries[name] = Entry(dtype, tuple(shape), data_start + begin, data_start + end)
    return entries, metadata


def read_tensor(f, entry: Entry, buf: np.ndarray | None = None, path: str = "") -> np.ndarray:
    """One tensor of the open file `f` in native byte order (bfloat16 widened to float32).

    With `buf` (uint8, at least entry.nbytes) the data is read into it and the result may be a view
    of it: the caller copies before reusing the buffer. Without, the result owns its memory.
    """
    buf = np.empty(entry.nbytes, np.uint8) if buf is None else buf[:entry.nbytes]
    f.seek(entry.begin)
    if f.readinto(buf) != entry.nbytes:
        raise SdcoreError(f"{path or f.name} is a truncated safetensors file: tensor data is cut short")
    array = buf.view(entry.stored_dtype).reshape(entry.shape)
    if entry.dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(array.dtype.newbyteorder("="), copy=False)


def read_all(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str], dict | None]:
    """(name -> array, name -> source dtype name, `__metadata__`) of every tensor of a file."""
    entries, metadata = read_header(path)
    with open(path, "rb") as f:
        tensors = {name: read_tensor(f, e, path=os.fspath(path)) for name, e in entries.items()}
    return tensors, {name: e.source_dtype for name, e in entries.items()}, metadata
