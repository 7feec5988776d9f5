"""Read PyTorch checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) without torch and without running code.

`torch.save` writes a pickle, and unpickling normally imports and calls whatever the file names:
that is how a checkpoint can run arbitrary code. Here the unpickler's `find_class` resolves only
an allow-list, and every entry is a stand-in written in this file, never the real torch, numpy or
Lightning object: tensor rebuild functions that only record storage/offset/size/stride, storage
and dtype tokens, numpy scalars rebuilt from raw bytes, and inert placeholders for the harmless
objects Stable Diffusion checkpoints carry (Lightning's `ModelCheckpoint` callback). Anything
else is refused with the global's name. Storages are read only when a wanted tensor needs them.

References: torch/serialization.py (`_save`, `_load`, `_legacy_save`, `_legacy_load`),
torch/_utils.py (`_rebuild_tensor_v2`/`_v3`, `_rebuild_parameter`), torch/_tensor.py
(`Tensor.__reduce_ex__`, `_rebuild_from_type_v2`), torch/storage.py (`_dtype_to_storage_type_map`).

Container formats:
  zip (torch >= 1.6): `<archive>/data.pkl`, one record per storage `<archive>/data/<key>`,
      `<archive>/byteorder` ("little" when absent), `<archive>/version`.
  legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): pickles in a row (magic
      number, protocol version, system info, the object, the storage keys), then per key an
      int64 little-endian element count and the little-endian data. Read, like zip.
  tar (the oldest torch releases): refused with a message that says so.
"""

import collections
import dataclasses
import io
import os
import pickle
import pickletools
import zipfile
from typing import Any, Callable

import numpy as np

from sdcore.errors import SdcoreError

# torch dtype name -> NumPy dtype of the stored elements (little-endian). bfloat16 is read as its
# raw 16 bits and upcast to float32 exactly; bool is read as bytes and compared with zero.
_NUMPY_DTYPES = {
    "float32": "<f4", "float64": "<f8", "float16": "<f2", "bfloat16": "<u2",
    "int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "u1",
    "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "complex64": "<c8", "complex128": "<c16",
}
# `torch.<Name>Storage` -> dtype (torch/storage.py). Quantized ones are listed so the error can
# name them. `UntypedStorage` (raw bytes, with the dtype passed to `_rebuild_tensor_v3`) is how
# torch 2.x saves the dtypes that have no storage class (uint16/32/64, float8).
_STORAGE_TYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8", "QInt32Storage": "qint32", "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4", "UntypedStorage": "uint8",
}
# `torch.<name>` dtype objects -> canonical name; the unreadable ones give a clear error later.
_TORCH_DTYPES = {name: name for name in _NUMPY_DTYPES} | {
    "float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
    "short": "int16", "cfloat": "complex64", "cdouble": "complex128",
} | {name: name for name in (
    "float8_e5m2", "float8_e4m3fn", "float8_e5m2fnuz", "float8_e4m3fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2", "complex32", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
    "qint8", "qint32", "quint8")}
# Classes real checkpoints pickle next to the weights, carrying nothing sdcore needs. They
# become inert placeholders that record their state; the real class is never imported.
_INERT_GLOBALS = (
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("torch.nn.modules.container", "ParameterDict"),
    ("argparse", "Namespace"),
)
# what `torch.save` writes first in the legacy format, then its protocol version
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_READ_CHUNK = 16 << 20


class _Refused(Exception):
    """Raised while unpickling; turned into an SdcoreError that names the file."""


class _Token:
    """Base of the stand-ins `find_class` hands out. Their `__setstate__` refuses, so no BUILD
    opcode can set attributes on (or reach code of) anything sdcore did not write."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Refused(f"it applies object state (BUILD) to {self!r}, which no checkpoint does")


class _Named(_Token):
    """`torch.FloatStorage`, `torch.float16`, `torch.Tensor`: a name and, for storages/dtypes, a dtype."""

    __slots__ = ("kind", "name", "dtype")

    def __init__(self, kind: str, name: str, dtype: str | None = None):
        self.kind, self.name, self.dtype = kind, name, dtype

    def __repr__(self):
        return self.name


class _Storage(_Token):
    """`nbytes` raw bytes: read through `reader` on first use or, for a legacy storage view, a
    byte range of its root. `aliased` is set once a tensor has been handed the buffer itself."""

    __slots__ = ("key", "dtype", "nbytes", "reader", "data", "root", "root_offset", "aliased")

    def __init__(self, key, dtype, nbytes, reader=None, root=None, root_offset=0):
        self.key, self.dtype, self.nbytes, self.reader = key, dtype, nbytes, reader
        self.data, self.root, self.root_offset, self.aliased = None, root, root_offset, False

    def raw(self) -> np.ndarray:
        if self.root is not None:
            return self.root.raw()[self.root_offset:self.root_offset + self.nbytes]
        if self.data is None:
            if self.reader is None:
                raise _Refused(f"storage {self.key!r} has no data in the file")
            self.data = self.reader(self)
        return self.data

    def __repr__(self):
        return f"storage {self.key!r}"


class PendingTensor(_Token):
    """A tensor as the pickle describes it. Inside the part of the object that is read these
    become arrays; elsewhere (see `load_torch_pickle`'s `select`) they stay, unread."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype")

    def __init__(self, storage, offset, size, stride, dtype):
        if not isinstance(storage, _Storage):
            raise _Refused(f"a tensor is rebuilt from {type(storage).__name__}, not a storage")
        for what, value in (("size", size), ("stride", stride)):
            if not (isinstance(value, tuple) and all(type(v) is int and v >= 0 for v in value)):
                raise _Refused(f"a tensor has a malformed {what} {value!r}")
        if type(offset) is not int or offset < 0 or len(size) != len(stride):
            raise _Refused(f"a tensor has a malformed offset {offset!r} or size/stride {size}, {stride}")
        self.storage, self.offset, self.size, self.stride, self.dtype = storage, offset, size, stride, dtype

    def __repr__(self):
        return f"tensor{list(self.size)}"


class InertObject:
    """Placeholder for an allowed non-tensor object (e.g. Lightning's ModelCheckpoint).

    What the pickle passes (constructor arguments, `__setstate__` state) is recorded in `args`,
    `kwargs` and `state`; nothing else happens. `global_name` says what it stands for.
    """

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<inert {self.global_name}>"


class _FrozenClass(type):
    """Metaclass of the placeholder classes: nothing in a pickle can set attributes on them."""

    def __setattr__(cls, name, value):
        raise _Refused(f"it sets attribute {name!r} on {cls.global_name}, which no checkpoint does")


class _Function(_Token):
    """An allowed callable: the pickle may REDUCE it; it checks its own arguments."""

    __slots__ = ("name", "fn")

    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, *args):
        try:
            return self.fn(*args)
        except TypeError as e:
            raise _Refused(f"it calls {self.name} with arguments it does not take ({e})") from None

    def __repr__(self):
        return self.name


def _check_metadata(metadata):
    # conj/neg view bits: only views of complex tensors have them, never model weights
    if metadata and any(metadata.values() if isinstance(metadata, dict) else [True]):
        raise _Refused(f"a tensor carries view bits {metadata!r}, which sdcore does not read")


def _rebuild_tensor(storage, storage_offset, size, stride):
    return PendingTensor(storage, storage_offset, size, stride, getattr(storage, "dtype", None))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    _check_metadata(metadata)
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    _check_metadata(metadata)
    if not (isinstance(dtype, _Named) and dtype.kind == "dtype"):
        raise _Refused(f"a tensor is given the dtype {dtype!r}, which is not a torch dtype")
    return PendingTensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    # `_rebuild_parameter_with_state` passes Python attributes as `state`: dropped
    if not isinstance(data, PendingTensor):
        raise _Refused(f"a parameter wraps {type(data).__name__}, not a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # a tensor/parameter with Python attributes set; the attributes (`state`) are dropped
    if not (isinstance(func, _Function) and func.fn in _TENSOR_REBUILDERS
            and isinstance(new_type, _Named) and new_type.kind == "type" and isinstance(args, tuple)):
        raise _Refused(f"it rebuilds a {new_type!r} with {func!r}, which is not a tensor rebuild")
    return func(*args)


class _NumpyDtype(_Token):
    """`numpy.dtype(spec, align, copy)` followed by BUILD with (version, byteorder, ...)."""

    __slots__ = ("spec", "byteorder")

    def __init__(self, spec, align=False, copy=False):
        if not isinstance(spec, str):
            raise _Refused(f"it builds a numpy dtype from {spec!r}")
        self.spec, self.byteorder = spec, "="

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "=")):
            raise _Refused(f"a numpy dtype has malformed state {state!r}")
        self.byteorder = state[1]

    def resolve(self) -> np.dtype:
        try:
            dt = np.dtype(self.spec)
        except TypeError:
            raise _Refused(f"it asks for an unknown numpy dtype {self.spec!r}") from None
        if dt.kind not in "biufcSU":
            raise _Refused(f"a numpy scalar of dtype {dt} is not plain data")
        return dt.newbyteorder(self.byteorder) if self.byteorder in "<>" else dt

    def __repr__(self):
        return f"numpy.dtype({self.spec!r})"


def _numpy_scalar(dtype, data=None):
    # numpy.core.multiarray.scalar(dtype, raw bytes): how `np.int64(5)` pickles
    if not isinstance(dtype, _NumpyDtype):
        raise _Refused(f"it builds a numpy scalar from {dtype!r}")
    dt = dtype.resolve()
    if not isinstance(data, bytes) or len(data) != dt.itemsize:
        raise _Refused(f"a numpy {dt} scalar is given {type(data).__name__} data of the wrong size")
    return np.frombuffer(data, dt).astype(dt.newbyteorder("="))[0]


def _codecs_encode(text, encoding="utf-8"):
    # protocol-2 pickles write `bytes` as _codecs.encode(latin-1 text, "latin1")
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"it calls _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


def _plain(items):
    if not isinstance(items, (list, tuple)):
        raise _Refused(f"it builds a container from {type(items).__name__}")
    return items


_TENSOR_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3)
_FUNCTIONS = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": lambda items=(): collections.OrderedDict(_plain(items)),
    "torch.Size": lambda dims=(): tuple(_plain(dims)),
    "numpy.core.multiarray.scalar": _numpy_scalar,  # NumPy 1.x, what SD 1.x checkpoints use
    "numpy._core.multiarray.scalar": _numpy_scalar,  # NumPy 2.x
    "_codecs.encode": _codecs_encode,
    "builtins.set": lambda items=(): set(_plain(items)),
    "builtins.frozenset": lambda items=(): frozenset(_plain(items)),
    "builtins.bytes": lambda: b"",  # protocol 2 writes b"" as bytes()
}
_ALLOWED: dict[tuple[str, str], Any] = {tuple(k.rsplit(".", 1)): _Function(k, f) for k, f in _FUNCTIONS.items()}
_ALLOWED[("numpy", "dtype")] = _NumpyDtype  # a class: REDUCE builds the token, BUILD sets byte order
for _full in ("torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter", "torch.nn.Parameter"):
    _ALLOWED[tuple(_full.rsplit(".", 1))] = _Named("type", _full)
for _name, _dtype in _STORAGE_TYPES.items():
    for _module in ("torch", "torch.cuda", "torch.storage"):  # torch.cuda.*: CUDA tensors saved by older torch
        _ALLOWED[(_module, _name)] = _Named("storage", f"{_module}.{_name}", _dtype)
for _name, _dtype in _TORCH_DTYPES.items():
    _ALLOWED[("torch", _name)] = _Named("dtype", f"torch.{_name}", _dtype)
for _module, _name in _INERT_GLOBALS:
    _ALLOWED[(_module, _name)] = _FrozenClass(
        _name, (InertObject,), {"global_name": f"{_module}.{_name}", "__module__": _module}
    )
# Python 2 module names in protocol-2 pickles; the stock find_class maps them the same way
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, persistent_load, globals_seen: list[str]):
        super().__init__(file, encoding="latin1")
        self._persistent, self._globals_seen = persistent_load, globals_seen

    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        full = f"{module}.{name}"
        if full not in self._globals_seen:
            self._globals_seen.append(full)
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise _Refused(
                f"it asks for {full}, which is not a tensor type (only tensor data is read from pickles)"
            ) from None

    def persistent_load(self, pid):
        return self._persistent(pid)


def _prescan(file):
    """Walk the opcodes before unpickling: refuse the extension registry (EXT1/2/4 can resolve
    through copyreg's process-wide cache without asking `find_class`) and out-of-band buffers."""
    try:
        for opcode, _, _ in pickletools.genops(file):
            if opcode.name.startswith("EXT") or opcode.name in ("NEXT_BUFFER", "READONLY_BUFFER"):
                raise _Refused(f"it uses the {opcode.name} opcode, which no checkpoint does")
    except ValueError as e:
        raise _Refused(f"its pickle is truncated or corrupt ({e})") from None


@dataclasses.dataclass
class TorchPickle:
    """What `load_torch_pickle` returns.

    `obj`: the unpickled object, tensors as NumPy arrays (native byte order; bfloat16 upcast to
    float32). `format`: "zip" or "legacy". `globals`: every global the pickle asked for (all on
    the allow-list). `version`: the zip's format version record, if any.
    """

    obj: Any
    format: str
    globals: list[str]
    version: str | None
    _source_dtypes: dict[int, tuple[np.ndarray, str]]

    def source_dtype(self, array: np.ndarray) -> str | None:
        """The torch dtype name ("bfloat16", "float16", ...) `array` was stored in."""
        entry = self._source_dtypes.get(id(array))
        return entry[1] if entry is not None and entry[0] is array else None


class _Loader:
    """One load: storages by key, how to read them, and the arrays made from pending tensors."""

    def __init__(self, reader: Callable[[_Storage], np.ndarray] | None = None, byteorder: str = "little"):
        self.reader, self.byteorder = reader, byteorder
        self.storages: dict[str, _Storage] = {}
        self.globals_seen: list[str] = []
        self.source_dtypes: dict[int, tuple[np.ndarray, str]] = {}

    def unpickle(self, file) -> Any:
        """Unpickle the next pickle in `file` (opcodes scanned first, then read from the same place)."""
        start = file.tell()
        _prescan(file)
        file.seek(start)
        return _RestrictedUnpickler(file, self.storage_from_pid, self.globals_seen).load()

    def storage_from_pid(self, pid):
        # ('storage', storage type, key, location, numel[, legacy view (key, offset, numel)])
        if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage") and len(pid) in (5, 6)):
            raise _Refused(f"it refers to a persistent object {pid!r:.80}, not a storage (a pickled module?)")
        storage_type, key, _location, numel = pid[1:5]
        key = key.decode("ascii", "replace") if isinstance(key, bytes) else key
        if not (isinstance(storage_type, _Named) and storage_type.kind == "storage"
                and isinstance(key, str) and type(numel) is int and numel >= 0):
            raise _Refused(f"it has a malformed storage reference {pid!r:.120}")
        if storage_type.dtype not in _NUMPY_DTYPES:
            raise _Refused(f"it holds a {storage_type!r}, which sdcore cannot read (quantized tensors)")
        itemsize = np.dtype(_NUMPY_DTYPES[storage_type.dtype]).itemsize
        storage = self.storages.get(key)
        if storage is None:
            storage = self.storages[key] = _Storage(key, storage_type.dtype, numel * itemsize, self.reader)
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return storage
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str)
                and all(type(v) is int and v >= 0 for v in view[1:])):
            raise _Refused(f"it has a malformed storage view {view!r:.80}")
        view_key, offset, count = view
        if (offset + count) * itemsize > storage.nbytes:
            raise _Refused(f"a storage view {view!r} lies outside storage {key!r}")
        if view_key not in self.storages:
            self.storages[view_key] = _Storage(view_key, storage.dtype, count * itemsize,
                                               root=storage, root_offset=offset * itemsize)
        return self.storages[view_key]

    def to_array(self, p: PendingTensor) -> np.ndarray:
        if p.dtype not in _NUMPY_DTYPES:
            raise _Refused(f"a tensor has dtype {p.dtype}, which sdcore cannot read")
        stored = np.dtype(_NUMPY_DTYPES[p.dtype])
        if self.byteorder == "big":
            stored = stored.newbyteorder(">")
        raw = p.storage.raw()
        count = raw.size // stored.itemsize
        elements = raw[:count * stored.itemsize].view(stored)
        numel = int(np.prod(p.size, dtype=object))
        if numel == 0:
            out = np.zeros(p.size, stored)
        else:
            last = p.offset + sum((n - 1) * s for n, s in zip(p.size, p.stride))
            if last >= count:  # as_strided would read past the buffer
                raise _Refused(f"a tensor {list(p.size)} reaches element {last} of {p.storage!r}, which has {count}")
            row_major = all(s == int(np.prod(p.size[i + 1:], dtype=object))
                            for i, s in enumerate(p.stride) if p.size[i] > 1)
            if row_major and p.offset == 0 and numel == count and not p.storage.aliased:
                # the whole storage in order: hand out the buffer itself rather than a copy
                p.storage.aliased = True
                out = elements.reshape(p.size)
            else:
                # a view (transpose, slice, expand) of a storage, maybe shared: bounds checked above
                out = np.lib.stride_tricks.as_strided(
                    elements[p.offset:], shape=p.size, strides=[s * stored.itemsize for s in p.stride],
                    writeable=False,
                ).copy()
        if not out.dtype.isnative:
            out = out.astype(out.dtype.newbyteorder("="))
        if p.dtype == "bfloat16":
            # bf16 is the top half of a float32: shifting the bits up is an exact upcast
            out = (out.astype(np.uint32) << 16).view(np.float32)
        elif p.dtype == "bool":
            out = out != 0
        self.source_dtypes[id(out)] = (out, p.dtype)
        return out

    def resolve(self, obj):
        """Replace every pending tensor under `obj` by its array (containers in place)."""
        arrays: dict[int, np.ndarray] = {}
        seen: set[int] = set()

        def visit(value):
            if isinstance(value, PendingTensor):
                if id(value) not in arrays:  # one tensor pickled twice stays one array
                    arrays[id(value)] = self.to_array(value)
                return arrays[id(value)]
            if isinstance(value, tuple):
                return tuple(visit(v) for v in value)
            if id(value) in seen:
                return value
            seen.add(id(value))
            if isinstance(value, dict):
                for k in list(value):
                    value[k] = visit(value[k])
            elif isinstance(value, list):
                value[:] = [visit(v) for v in value]
            elif isinstance(value, InertObject):
                value.args, value.kwargs, value.state = visit(value.args), visit(value.kwargs), visit(value.state)
            return value

        return visit(obj)


def _read_exactly(file, nbytes: int) -> np.ndarray | None:
    buffer = np.empty(nbytes, np.uint8)
    view, got = memoryview(buffer), 0
    while got < nbytes:
        n = file.readinto(view[got:got + _READ_CHUNK])
        if not n:
            return None
        got += n
    return buffer


def _archive_prefix(path: str, names: list[str]) -> str:
    """The record folder of a torch zip (`archive/`, or the saved file's stem)."""
    pickles = [n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise SdcoreError(f"{path} is a zip archive but not a PyTorch checkpoint (no <archive>/data.pkl inside)")
    prefix = pickles[0]
    if f"{prefix}constants.pkl" in names or any(n.startswith(f"{prefix}code/") for n in names):
        raise SdcoreError(f"{path} is a TorchScript archive (torch.jit.save), not a checkpoint of weights")
    return prefix


def _load_zip(path: str, select) -> TorchPickle:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        prefix = _archive_prefix(path, names)

        def record(name: str) -> str | None:
            if f"{prefix}{name}" not in names:
                return None
            return archive.read(f"{prefix}{name}").decode("ascii", "replace").strip()

        def read_storage(storage: _Storage) -> np.ndarray:
            try:
                info = archive.getinfo(f"{prefix}data/{storage.key}")
            except KeyError:
                raise _Refused(f"it refers to storage {storage.key!r}, which is not in the archive") from None
            if info.file_size < storage.nbytes:
                raise _Refused(f"storage {storage.key!r} holds {info.file_size} bytes, "
                               f"the pickle needs {storage.nbytes}")
            with archive.open(info) as f:
                data = _read_exactly(f, storage.nbytes)
            if data is None:
                raise _Refused(f"storage {storage.key!r} is cut short")
            return data

        byteorder = record("byteorder") or "little"
        if byteorder not in ("little", "big"):
            raise SdcoreError(f"{path} has an unknown byte order {byteorder!r}")
        loader = _Loader(read_storage, byteorder)
        obj = loader.unpickle(io.BytesIO(archive.read(f"{prefix}data.pkl")))
        obj = _resolve_selected(loader, obj, select)
        return TorchPickle(obj, "zip", loader.globals_seen, record("version"), loader.source_dtypes)


def _resolve_selected(loader: _Loader, obj, select):
    if select is None:
        return loader.resolve(obj)
    part = select(obj)
    if part is not None:
        loader.resolve(part)
    return obj


def _load_legacy(path: str, select) -> TorchPickle:
    size = os.path.getsize(path)
    offsets: dict[str, int] = {}
    with open(path, "rb") as f:

        def read_storage(storage: _Storage) -> np.ndarray:
            if storage.key not in offsets:
                raise _Refused(f"storage {storage.key!r} has no data in the file")
            f.seek(offsets[storage.key])
            data = _read_exactly(f, storage.nbytes)
            if data is None:
                raise _Refused(f"storage {storage.key!r} is cut short")
            return data

        loader = _Loader(read_storage)
        if loader.unpickle(f) != _LEGACY_MAGIC:
            raise SdcoreError(f"{path} is a Python pickle but not a PyTorch checkpoint (no torch.save magic number)")
        if (protocol := loader.unpickle(f)) != _LEGACY_PROTOCOL:
            raise SdcoreError(f"{path} is a legacy PyTorch checkpoint of unknown protocol {protocol!r}")
        sys_info = loader.unpickle(f)
        if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
            raise SdcoreError(f"{path} is a legacy PyTorch checkpoint from a big-endian machine, "
                              "which sdcore does not read")
        obj = loader.unpickle(f)
        keys = loader.unpickle(f)
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise _Refused("its list of storage keys is malformed")
        # the data follows in key order: note where each storage starts, read only what is wanted
        for key in keys:
            storage = loader.storages.get(key)
            if storage is None or storage.root is not None:
                raise _Refused(f"it lists storage {key!r}, which the pickle never uses")
            header = f.read(8)
            itemsize = np.dtype(_NUMPY_DTYPES[storage.dtype]).itemsize
            if len(header) < 8 or f.tell() + storage.nbytes > size:
                raise SdcoreError(f"{path} is truncated: the data of storage {key!r} is cut short")
            if int.from_bytes(header, "little") * itemsize != storage.nbytes:
                raise _Refused(f"storage {key!r} has {int.from_bytes(header, 'little')} elements on disk, "
                               f"the pickle says {storage.nbytes // itemsize}")
            offsets[key] = f.tell()
            f.seek(storage.nbytes, os.SEEK_CUR)
        obj = _resolve_selected(loader, obj, select)
    return TorchPickle(obj, "legacy", loader.globals_seen, None, loader.source_dtypes)


def _guarded(path: str, action):
    """Run one load, turning refusals and every way a corrupt file fails into one SdcoreError."""
    try:
        return action()
    except SdcoreError:
        raise
    except _Refused as e:
        raise SdcoreError(f"refusing to unpickle {path}: {e}") from None
    except zipfile.BadZipFile as e:
        raise SdcoreError(f"{path} is a corrupt or truncated zip archive ({e})") from None
    except MemoryError:
        raise SdcoreError(f"not enough memory to read {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, RecursionError, UnicodeDecodeError) as e:
        raise SdcoreError(f"{path} is not a readable PyTorch checkpoint: its pickle is corrupt or truncated "
                          f"({type(e).__name__}: {e})") from None


def _head(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(512)
    except FileNotFoundError:
        raise SdcoreError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise SdcoreError(f"{path} is a directory, not a checkpoint file") from None


def _is_zip(head: bytes) -> bool:
    return head[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def load_torch_pickle(path, select: Callable[[Any], Any] | None = None) -> TorchPickle:
    """Read a `torch.save` file of either format (told from its first bytes), executing nothing.

    `select(obj)`, if given, picks the part of the unpickled object whose tensors are wanted
    (e.g. a Lightning checkpoint's "state_dict"); only the storages it uses are read, and tensors
    elsewhere stay `PendingTensor`. Returning None reads nothing.
    """
    path = os.fspath(path)
    head = _head(path)
    if _is_zip(head):
        return _guarded(path, lambda: _load_zip(path, select))
    if len(head) > 262 and head[257:262] == b"ustar":
        raise SdcoreError(f"{path} is a PyTorch checkpoint in the tar format of the oldest torch releases, which "
                          "sdcore does not read; re-save it with a recent torch or convert it to .safetensors")
    if head[:1] == b"\x80":
        return _guarded(path, lambda: _load_legacy(path, select))
    raise SdcoreError(f"{path} is not a PyTorch checkpoint (neither a zip archive nor a legacy torch pickle)")
