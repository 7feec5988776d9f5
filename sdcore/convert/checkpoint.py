"""Read a single-file checkpoint (`.safetensors`, `.ckpt`, `.pt`, `.pth`, `.bin`) into a flat
dict of NumPy arrays, whatever its extension says: the kind is told from the content.

safetensors files go through `sdcore.safetensors_file`, the reader model directories are loaded
with too. PyTorch pickles (zip or legacy) go through the allow-list
unpickler in `sdcore.convert.torch_pickle`, which runs no code from the file.

Where the weights sit in a pickle follows what diffusers' `convert_from_ckpt` and A1111 accept:
`state_dict` (Lightning checkpoints), the top level (diffusers `.bin`, plain `torch.save`),
or `model` / `module`.
"""

import os
import struct

import numpy as np

from sdcore import safetensors_file
from sdcore.convert.torch_pickle import InertObject, PendingTensor, load_torch_pickle
from sdcore.errors import SdcoreError
from sdcore.hashing import sha256_file

# containers that hold the weights in a pickle, in the order they are tried ("" is the top level)
_STATE_DICT_KEYS = ("state_dict", "", "model", "module")

# first bytes of files people mistake for checkpoints, to name them in the error
_KNOWN_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"RIFF", "a RIFF file (WebP image or WAV audio)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"GGUF", "a GGUF file (llama.cpp / stable-diffusion.cpp)"),
    (b"\x89HDF", "an HDF5 file (Keras weights?)"),
)


def sha256_10(path) -> str:
    """First 10 hex digits of the file's SHA-256: A1111's "model hash"."""
    path = os.fspath(path)
    try:
        return sha256_file(path)[:10]
    except FileNotFoundError:
        raise SdcoreError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise SdcoreError(f"{path} is a directory, not a checkpoint file") from None


def detect_kind(path) -> str:
    """"safetensors" or "torch" from the file's first bytes; a clear error for anything else."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(512)
    except FileNotFoundError:
        raise SdcoreError(f"checkpoint {path} does not exist") from None
    except IsADirectoryError:
        raise SdcoreError(f"{path} is a directory, not a checkpoint file (give the file, or convert a "
                          "diffusers folder as a folder)") from None
    if size == 0:
        raise SdcoreError(f"checkpoint {path} is empty (0 bytes): the download or copy did not finish")
    # safetensors first: a header length whose low byte is 0x80 must not read as a pickle
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= safetensors_file.MAX_HEADER:
        return "safetensors"
    # zip (torch >= 1.6), a legacy torch pickle, or the old torch tar format (refused by the reader)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06") or head[:1] == b"\x80" or head[257:262] == b"ustar":
        return "torch"
    for magic, what in _KNOWN_MAGIC:
        if head.startswith(magic):
            raise SdcoreError(f"{path} is {what}, not a model checkpoint")
    with open(path, "rb") as f:
        sample = f.read(4096)
    # text (ASCII or UTF-8) has no control bytes besides whitespace; binary formats all do
    if all(b >= 32 or b in b"\t\n\r" for b in sample):
        raise SdcoreError(f"{path} is a text file, not a model checkpoint (a Git LFS pointer or an error page?)")
    raise SdcoreError(f"{path} is not a model checkpoint: it is neither safetensors nor a PyTorch file "
                      f"(it starts with {head[:8].hex(' ')})")


def _read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict]:
    tensors, dtypes, metadata = safetensors_file.read_all(path)
    meta = {"kind": "safetensors", "safetensors_metadata": metadata, "state_dict_key": None}
    return tensors, _finish_meta(meta, dtypes)


def _is_tensor(value) -> bool:
    return isinstance(value, (np.ndarray, PendingTensor))


def _holds_tensors(value) -> bool:
    return isinstance(value, dict) and any(_is_tensor(v) for v in value.values())


def _flatten(container: dict, prefix: str, tensors: dict, dropped: list) -> None:
    """Tensors of `container` by dotted key; nested dicts are joined with "."."""
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, np.ndarray):
            tensors[name] = value
        elif isinstance(value, dict):
            _flatten(value, f"{name}.", tensors, dropped)
        else:
            dropped.append(name)


def _is_inert(value) -> bool:
    return isinstance(value, InertObject) or (isinstance(value, type) and issubclass(value, InertObject))


def _as_int(value) -> int | None:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return None


def _read_torch(path: str) -> tuple[dict[str, np.ndarray], dict]:
    chosen = {}

    def select(top):
        # only the state dict's storages are read: optimizer states and the like stay on disk
        if isinstance(top, dict):
            for key in _STATE_DICT_KEYS:
                container = top if key == "" else top.get(key)
                if _holds_tensors(container):
                    chosen["key"] = key
                    return container
        return None

    loaded = load_torch_pickle(path, select)
    top = loaded.obj
    if not isinstance(top, dict):
        what = "tensor" if _is_tensor(top) else type(top).__name__
        raise SdcoreError(f"{path} holds a single {what}, not a dict of tensors")
    if "key" not in chosen:
        keys = ", ".join(repr(k) for k in list(top)[:8])
        raise SdcoreError(f"{path} holds no tensors where a state dict is expected (state_dict, the top level, "
                          f"model or module); its top-level keys are: {keys or 'none'}")
    key = chosen["key"]
    tensors, dropped = {}, []
    _flatten(top if key == "" else top[key], "", tensors, dropped)
    dtypes = {name: loaded.source_dtype(a) or str(a.dtype) for name, a in tensors.items()}
    callbacks = top.get("callbacks") if isinstance(top.get("callbacks"), dict) else {}
    meta = {
        "kind": f"torch-{loaded.format}",
        "safetensors_metadata": None,
        "state_dict_key": key,
        "global_step": _as_int(top.get("global_step")),
        "epoch": _as_int(top.get("epoch")),
        "dropped_keys": dropped,
        "globals": loaded.globals,
        # old Lightning keys callbacks by class, newer by name with the object as the value
        "lightning_callbacks": sorted({c.global_name for c in [*callbacks, *callbacks.values()] if _is_inert(c)}),
    }
    return tensors, _finish_meta(meta, dtypes)


def _finish_meta(meta: dict, dtypes: dict[str, str]) -> dict:
    meta["tensor_dtypes"] = dtypes
    meta["dtypes"] = sorted(set(dtypes.values()))
    return meta


def read_state_dict(path) -> tuple[dict[str, np.ndarray], dict]:
    """Read every tensor of a checkpoint file as a NumPy array, with what is known about it.

    Returns `(tensors, meta)`. `tensors` maps checkpoint keys to arrays in native byte order
    (bfloat16 sources upcast exactly to float32, bool as bool, the rest in their own dtype).
    `meta` always has "kind" ("safetensors", "torch-zip" or "torch-legacy"), "path", "dtypes"
    (sorted source dtype names, torch spelling), "tensor_dtypes" (key -> source dtype name),
    "safetensors_metadata" (the `__metadata__` dict, or None) and "state_dict_key" (pickles:
    "state_dict", "" for the top level, "model" or "module"; None for safetensors). Pickles add
    "global_step" and "epoch" (int or None), "dropped_keys" (non-tensor entries skipped),
    "globals" (the allowed globals the pickle used) and "lightning_callbacks".
    """
    path = os.fspath(path)
    kind = detect_kind(path)
    tensors, meta = _read_safetensors(path) if kind == "safetensors" else _read_torch(path)
    meta["path"] = path
    return tensors, meta
