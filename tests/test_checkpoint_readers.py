"""Checkpoint readers (`sdcore.convert.checkpoint`, `sdcore.convert.torch_pickle`) against torch's
own `torch.load` and safetensors' own `load_file`, and against files built to attack them.

Every malicious pickle here carries a payload that would create a marker file; the tests check
the reader refuses it with the global named and that the marker does not exist, and then that
torch's unrestricted `torch.load` *does* run it, so the payload is known to be live.
"""

import copyreg
import io
import os
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the reference that writes and reads the checkpoints")
safetensors_torch = pytest.importorskip("safetensors.torch")

from sdcore.convert.checkpoint import detect_kind, read_state_dict, sha256_10  # noqa: E402
from sdcore.convert.torch_pickle import InertObject, load_torch_pickle  # noqa: E402
from sdcore.errors import SdcoreError  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.int8, torch.uint8, torch.bool, torch.uint16]
FORMATS = {"zip": {}, "legacy": {"_use_new_zipfile_serialization": False}}


def _random(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=torch.int64).to(dtype)


def _expected(t):
    """What the reader must return for a torch tensor: bf16 exactly as float32, the rest as is."""
    t = t.detach()
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _assert_same(ours: dict, reference: dict):
    ref = {k: v for k, v in reference.items() if isinstance(v, torch.Tensor)}
    assert sorted(ours) == sorted(ref)
    for key, tensor in ref.items():
        want = _expected(tensor)
        assert ours[key].dtype == want.dtype, key
        assert ours[key].shape == want.shape, key
        np.testing.assert_array_equal(ours[key], want, err_msg=key)


def _refused(path, pattern, marker=None):
    with pytest.raises(SdcoreError, match=pattern):
        read_state_dict(path)
    if marker is not None:
        assert not marker.exists()


def _rewrite_zip(src, dst, change):
    """Copy a zip, passing every (name, bytes) through `change`; None drops the entry."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = change(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)


def _torch_zip_with_pickle(path, data_pkl: bytes, records: dict[str, bytes] | None = None):
    """A zip laid out like torch.save's, holding a hand-written data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        for key, data in (records or {}).items():
            z.writestr(f"archive/data/{key}", data)


# --- tensors of every dtype, views and shared storages, both torch formats -------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_matches_torch_load(tmp_path, fmt):
    # torch's own legacy loader cannot read back the uint16 it writes (torch/serialization.py)
    dtypes = DTYPES if fmt == "zip" else [d for d in DTYPES if d != torch.uint16]
    state = {f"t.{str(d)[6:]}": _random(d, (3, 5), i) for i, d in enumerate(dtypes)}
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.zeros(0, 4, dtype=torch.float16)
    path = tmp_path / "model.pt"
    torch.save(state, path, **FORMATS[fmt])

    tensors, meta = read_state_dict(path)
    _assert_same(tensors, torch.load(path, weights_only=True))
    assert meta["kind"] == f"torch-{fmt}" and meta["state_dict_key"] == ""
    assert meta["tensor_dtypes"]["t.bfloat16"] == "bfloat16" and meta["tensor_dtypes"]["t.float16"] == "float16"
    assert set(meta["dtypes"]) == {str(d)[6:] for d in dtypes}
    assert all(a.flags.writeable and a.dtype.isnative for a in tensors.values())


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_and_shared_storage(tmp_path, fmt):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    half = torch.randn(5, 7).to(torch.bfloat16)
    state = {
        "base": base,
        "transposed": base.t(),
        "block": base[1:3, 2:5],
        "strided": base[:, ::2],
        "same_storage": base.view(6, 4),
        "tail": base.view(-1)[7:],
        "expanded": torch.arange(3.0).expand(4, 3),
        "bf16_transposed": half.t(),
        "bf16_column": half[:, 3],
        "int_slice": torch.arange(50, dtype=torch.int64)[10:40:3],
    }
    path = tmp_path / "views.ckpt"
    torch.save(state, path, **FORMATS[fmt])
    tensors, _ = read_state_dict(path)
    _assert_same(tensors, torch.load(path, weights_only=True))
    # arrays must not alias one another: writing one leaves the others as loaded
    tensors["base"][0, 0] = -1
    assert tensors["same_storage"][0, 0] == 0 and tensors["transposed"][0, 0] == 0


def test_big_endian_zip(tmp_path):
    state = {"f": torch.randn(3, 4), "s": torch.arange(-5, 5, dtype=torch.int16), "h": torch.randn(6).bfloat16()}
    little = tmp_path / "little.pt"
    torch.save(state, little)
    itemsizes = {"0": 4, "1": 2, "2": 2}  # records are numbered in pickling order

    def to_big(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        key = name.rsplit("/", 1)[-1]
        if "/data/" in name:
            return np.frombuffer(data, f"<u{itemsizes[key]}").astype(f">u{itemsizes[key]}").tobytes()
        return data

    big = tmp_path / "big.pt"
    _rewrite_zip(little, big, to_big)
    tensors, _ = read_state_dict(big)
    _assert_same(tensors, state)


def test_parameters_and_tensor_subclass_state(tmp_path):
    tagged = torch.randn(3)
    tagged.note = "python attribute"  # saved through torch._tensor._rebuild_from_type_v2
    param = torch.nn.Parameter(torch.randn(2, 2))
    param.extra = 1  # saved through _rebuild_parameter_with_state
    state = {"p": torch.nn.Parameter(torch.randn(4)), "tagged": tagged, "param_state": param,
             "size": torch.Size([1, 2]), "dtype": torch.float16}
    path = tmp_path / "params.pt"
    torch.save(state, path)
    tensors, meta = read_state_dict(path)
    _assert_same(tensors, torch.load(path, weights_only=False))
    assert sorted(meta["dropped_keys"]) == ["dtype", "size"]
    assert load_torch_pickle(path).obj["size"] == (1, 2)


# --- Lightning checkpoints: callbacks, numpy scalars --------------------------------------------

@pytest.fixture
def fake_lightning(tmp_path, monkeypatch):
    """A `pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint` whose restore writes a file."""
    marker = tmp_path / "lightning_code_ran"
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self, monitor):
            self.monitor, self.best_model_score = monitor, torch.tensor(0.25)

        def __setstate__(self, state):
            marker.write_text("ran")
            self.__dict__.update(state)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return ModelCheckpoint, marker


def _lightning_checkpoint(model_checkpoint):
    weights = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3).half(),
               "model.diffusion_model.input_blocks.0.0.bias": torch.randn(8).half(),
               "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7, dtype=torch.int32)}
    return {
        "epoch": np.int64(6), "global_step": np.int64(470000), "pytorch-lightning_version": "1.4.2",
        # old Lightning keys callbacks by class; newer by name with the object as the value
        "callbacks": {model_checkpoint: {"best_model_score": None, "dirpath": "/ckpt"},
                      "ModelCheckpoint{'monitor': 'val/loss'}": model_checkpoint("val/loss")},
        "optimizer_states": [], "lr_schedulers": [], "state_dict": weights,
    }


def test_lightning_checkpoint(tmp_path, fake_lightning):
    model_checkpoint, marker = fake_lightning
    checkpoint = _lightning_checkpoint(model_checkpoint)
    saved = tmp_path / "sd-v1-x.ckpt"
    torch.save(checkpoint, saved)
    # NumPy 1.x (what the SD 1.x checkpoints were written with) named the module numpy.core
    path = tmp_path / "old-numpy.ckpt"
    _rewrite_zip(saved, path,
                 lambda n, d: d.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"))

    tensors, meta = read_state_dict(path)
    assert not marker.exists()
    _assert_same(tensors, checkpoint["state_dict"])
    assert meta["state_dict_key"] == "state_dict" and meta["global_step"] == 470000 and meta["epoch"] == 6
    assert "numpy.core.multiarray.scalar" in meta["globals"]
    assert meta["lightning_callbacks"] == ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"]
    callbacks = load_torch_pickle(path).obj["callbacks"]
    placeholder = callbacks["ModelCheckpoint{'monitor': 'val/loss'}"]
    assert isinstance(placeholder, InertObject) and not isinstance(placeholder, model_checkpoint)
    assert placeholder.state["monitor"] == "val/loss" and float(placeholder.state["best_model_score"]) == 0.25
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the real class does run its code
    assert marker.exists()


# --- refusing code -------------------------------------------------------------------------------

class _Payload:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


def _payload_cases(marker):
    return {
        "os.system": (os.system, f"touch {marker}"),
        "builtins.eval": (eval, f"open({str(marker)!r}, 'w').write('x')"),
        "builtins.exec": (exec, f"open({str(marker)!r}, 'w').write('x')"),
    }


@pytest.mark.parametrize("case", ["os.system", "builtins.eval", "builtins.exec"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_reduce_payload_is_refused(tmp_path, case, fmt):
    marker = tmp_path / "pwned"
    fn, arg = _payload_cases(marker)[case]
    path = tmp_path / "model.ckpt"
    torch.save({"weight": torch.ones(2), "x": _Payload(fn, arg)}, path, **FORMATS[fmt])
    global_name = f"{fn.__module__}.{fn.__name__}"  # os.system pickles as posix.system
    message = rf"refusing to unpickle .*model\.ckpt: it asks for {global_name}, which is not a tensor type"
    _refused(path, message, marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_inst_obj_and_stack_global_opcodes_are_refused(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    shell = f"touch {marker}".encode()
    code = f"open({str(marker)!r}, 'w')".encode()
    cases = {
        # protocol 0: MARK, args, INST module name
        "os.system": b"(S'" + shell + b"'\nios\nsystem\n.",
        # protocol 1: MARK, class, args, OBJ
        "builtins.exec": b"(cbuiltins\nexec\nS'" + code + b"'\no.",
        # protocol 4: module and name pushed as strings, then STACK_GLOBAL
        "builtins.eval": b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c" + bytes([len(code)]) + code + b"\x85R.",
    }
    for global_name, data in cases.items():
        path = tmp_path / "model.ckpt"
        _torch_zip_with_pickle(path, data)
        _refused(path, f"asks for {global_name}", marker)
        pickle.loads(data)  # the stock unpickler runs the payload
        assert marker.exists()
        marker.unlink()


def test_extension_opcodes_are_refused(tmp_path):
    import pickle

    marker = tmp_path / "pwned"
    shell = f"touch {marker}".encode()
    data = b"\x80\x02\x82\xf1X" + len(shell).to_bytes(4, "little") + shell + b"\x85R."  # EXT1 0xF1
    copyreg.add_extension("os", "system", 0xF1)
    try:
        _torch_zip_with_pickle(tmp_path / "ext.ckpt", data)
        _refused(tmp_path / "ext.ckpt", "EXT1 opcode", marker)
        pickle.loads(data)
        assert marker.exists()
    finally:
        copyreg.remove_extension("os", "system", 0xF1)


def test_misuse_of_allowed_globals_is_refused(tmp_path):
    cases = {
        # BUILD on an allowed function tries to set attributes on it
        "build.ckpt": (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x01\x00\x00\x00aK\x01sb.", "BUILD"),
        # _codecs.encode with an encoding other than latin-1
        "codec.ckpt": (b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.", "rot13"),
        # a persistent id that is not a storage (how whole nn.Modules are referenced)
        "module.ckpt": (b"\x80\x02X\x06\x00\x00\x00module\x85Q.", "not a storage"),
        # a numpy scalar of object dtype
        "object.ckpt": (b"\x80\x02cnumpy.core.multiarray\nscalar\ncnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R"
                        b"K\x03X\x01\x00\x00\x00|\x86bC\x08AAAAAAAA\x86R.", "not plain data"),
    }
    for name, (data, pattern) in cases.items():
        _torch_zip_with_pickle(tmp_path / name, data)
        _refused(tmp_path / name, pattern)


def _tensor_pickle(numel: int, size: int, offset: int = 0) -> bytes:
    """{'a': _rebuild_tensor_v2(FloatStorage '0' of `numel`, offset, (size,), (1,), ...)}"""
    return (b"\x80\x02}X\x01\x00\x00\x00actorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage"
            b"ctorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ" + numel.to_bytes(4, "little")
            + b"tQJ" + offset.to_bytes(4, "little") + b"J" + size.to_bytes(4, "little")
            + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs.")


def test_tensor_outside_its_storage_is_refused(tmp_path):
    ok = tmp_path / "ok.pt"
    _torch_zip_with_pickle(ok, _tensor_pickle(4, 3, 1), {"0": np.arange(4, dtype="<f4").tobytes()})
    np.testing.assert_array_equal(read_state_dict(ok)[0]["a"], [1, 2, 3])
    beyond = tmp_path / "beyond.pt"  # would read past the buffer with as_strided
    _torch_zip_with_pickle(beyond, _tensor_pickle(4, 10), {"0": np.arange(4, dtype="<f4").tobytes()})
    _refused(beyond, "reaches element 9")
    short = tmp_path / "short.pt"  # the record holds fewer bytes than the pickle declares
    _torch_zip_with_pickle(short, _tensor_pickle(100, 10), {"0": np.arange(4, dtype="<f4").tobytes()})
    _refused(short, "holds 16 bytes, the pickle needs 400")
    missing = tmp_path / "missing.pt"
    _torch_zip_with_pickle(missing, _tensor_pickle(4, 4))
    _refused(missing, "not in the archive")


# --- where the state dict sits, other writers -------------------------------------------------

def test_state_dict_locations(tmp_path):
    weights = {"w": torch.randn(2, 3), "b": torch.randn(3)}
    for key in ("model", "module"):
        torch.save({key: weights, "step": 3}, tmp_path / f"{key}.pt")
        tensors, meta = read_state_dict(tmp_path / f"{key}.pt")
        _assert_same(tensors, weights)
        assert meta["state_dict_key"] == key
    torch.save({"w": torch.ones(1), "sub": {"x": torch.zeros(2)}, "name": "n"}, tmp_path / "nested.pt")
    tensors, meta = read_state_dict(tmp_path / "nested.pt")
    assert sorted(tensors) == ["sub.x", "w"] and meta["dropped_keys"] == ["name"]
    torch.save({"global_step": 5, "config": {"lr": 1e-4}}, tmp_path / "no_tensors.ckpt")
    _refused(tmp_path / "no_tensors.ckpt", "holds no tensors.*'global_step', 'config'")
    torch.save(torch.ones(3), tmp_path / "bare.pt")
    _refused(tmp_path / "bare.pt", "holds a single tensor, not a dict of tensors")


def test_only_the_state_dict_is_read(tmp_path):
    weights = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    # the optimizer's storage is pickled last, so it is record "2"; dropping it proves it is never read
    checkpoint = {"state_dict": weights, "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(4, 4)}}}]}
    torch.save(checkpoint, tmp_path / "full.ckpt")
    _rewrite_zip(tmp_path / "full.ckpt", tmp_path / "pruned.ckpt", lambda n, d: None if n.endswith("/data/2") else d)
    tensors, meta = read_state_dict(tmp_path / "pruned.ckpt")
    _assert_same(tensors, weights)
    assert meta["dropped_keys"] == []
    with pytest.raises(SdcoreError, match="refers to storage '2', which is not in the archive"):
        load_torch_pickle(tmp_path / "pruned.ckpt")


def test_diffusers_bin(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                        layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae", safe_serialization=False)
    path = tmp_path / "vae" / "diffusion_pytorch_model.bin"
    tensors, meta = read_state_dict(path)
    _assert_same(tensors, vae.state_dict())
    assert meta["kind"] == "torch-zip" and meta["state_dict_key"] == ""


# --- safetensors -----------------------------------------------------------------------------------

def test_safetensors_dtypes(tmp_path):
    state = {f"t.{str(d)[6:]}": _random(d, (4, 3), i) for i, d in enumerate(DTYPES)}
    state["scalar"] = torch.tensor(1.5, dtype=torch.bfloat16)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(state, path, metadata={"format": "pt", "note": "sdcore"})
    tensors, meta = read_state_dict(path)
    _assert_same(tensors, safetensors_torch.load_file(path))
    assert meta["kind"] == "safetensors" and meta["safetensors_metadata"] == {"format": "pt", "note": "sdcore"}
    assert meta["tensor_dtypes"]["t.bfloat16"] == "bfloat16" and "bfloat16" in meta["dtypes"]


def test_kind_comes_from_content_not_extension(tmp_path):
    state = {"a": torch.randn(2, 2).half()}
    as_ckpt = tmp_path / "really_safetensors.ckpt"
    safetensors_torch.save_file(state, as_ckpt)
    tensors, meta = read_state_dict(as_ckpt)
    assert meta["kind"] == "safetensors"
    _assert_same(tensors, state)
    as_safetensors = tmp_path / "really_torch.safetensors"
    torch.save(state, as_safetensors)
    assert detect_kind(as_safetensors) == "torch" and read_state_dict(as_safetensors)[1]["kind"] == "torch-zip"


# --- broken and wrong files -----------------------------------------------------------------------

def test_truncated_files(tmp_path):
    state = {"a": torch.randn(64, 64), "b": torch.randn(64)}
    for fmt in FORMATS:
        full = tmp_path / f"{fmt}.ckpt"
        torch.save(state, full, **FORMATS[fmt])
        data = full.read_bytes()
        for cut in (len(data) // 2, len(data) - 10):
            (tmp_path / "cut.ckpt").write_bytes(data[:cut])
            _refused(tmp_path / "cut.ckpt", "truncated|corrupt")
    full = tmp_path / "model.safetensors"
    safetensors_torch.save_file(state, full)
    data = full.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    _refused(tmp_path / "cut.safetensors", "truncated safetensors file: tensor 'b' ends at byte")
    (tmp_path / "cut.safetensors").write_bytes(data[:40])
    _refused(tmp_path / "cut.safetensors", "truncated safetensors file: its header needs")


def test_corrupt_safetensors_headers(tmp_path):
    import json
    import struct

    def write(header: dict, data: bytes = b"\0" * 8):
        raw = json.dumps(header).encode()
        (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        return tmp_path / "bad.safetensors"

    _refused(write({"a": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}}), "F8_E4M3, which sdcore cannot")
    _refused(write({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}), "offsets 0..8 for 16 bytes")
    _refused(write({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}), "has shape \\[-2\\]")
    _refused(write({"a": {"dtype": "F32", "shape": [2]}}), "bad header entry for 'a'")
    raw = b'{"a": nope}'
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    _refused(tmp_path / "bad.safetensors", "header is not JSON")
    good = {"__metadata__": {"k": "v"}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    tensors, meta = read_state_dict(write(good))
    assert tensors["a"].tolist() == [0.0, 0.0] and meta["safetensors_metadata"] == {"k": "v"}


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_wrong_files(tmp_path):
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "image.png")
    os.rename(tmp_path / "image.png", tmp_path / "model.ckpt")
    _refused(tmp_path / "model.ckpt", "is a PNG image, not a model checkpoint")
    (tmp_path / "lfs.ckpt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 42\n")
    _refused(tmp_path / "lfs.ckpt", "is a text file")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _refused(tmp_path / "empty.safetensors", "is empty")
    _refused(tmp_path / "missing.ckpt", "does not exist")
    _refused(tmp_path, "is a directory")
    with zipfile.ZipFile(tmp_path / "notes.ckpt", "w") as z:
        z.writestr("notes/readme.txt", "hello")
    _refused(tmp_path / "notes.ckpt", "is a zip archive but not a PyTorch checkpoint")
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(scripted, tmp_path / "scripted.pt")
    _refused(tmp_path / "scripted.pt", "TorchScript")
    import pickle
    import tarfile

    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": [1, 2]}, protocol=2))
    _refused(tmp_path / "plain.pkl", "not a PyTorch checkpoint")
    with tarfile.open(tmp_path / "ancient.pt", "w", format=tarfile.PAX_FORMAT) as tar:  # torch's oldest format
        for name in ("sys_info", "pickle", "storages", "tensors"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"\x80\x02N."))
    _refused(tmp_path / "ancient.pt", "tar format of the oldest torch releases")
    (tmp_path / "random.ckpt").write_bytes(bytes(range(256)) * 4)
    _refused(tmp_path / "random.ckpt", "neither safetensors nor a PyTorch file")


def test_sha256_10(tmp_path):
    import hashlib

    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(3 << 20))
    assert sha256_10(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    with pytest.raises(SdcoreError, match="does not exist"):
        sha256_10(tmp_path / "nope.ckpt")


def test_reading_does_not_import_torch():
    code = ("import sys, sdcore.convert.checkpoint, sdcore.convert.torch_pickle; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'pytorch_lightning') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_torch_pickle_reports_source_dtypes(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"h": torch.ones(2).bfloat16(), "f": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    loaded = load_torch_pickle(path)
    assert loaded.format == "legacy"
    assert loaded.source_dtype(loaded.obj["h"]) == "bfloat16" and loaded.obj["h"].dtype == np.float32
    assert loaded.source_dtype(np.ones(2)) is None
