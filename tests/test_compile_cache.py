"""The compile cache: a warm entry loads without compiling, a changed model gets a new entry, a corrupt
entry is rebuilt (never a crash), and nothing half-written is left in the cache folder."""

from __future__ import annotations

import logging
import platform
import sys

import numpy as np
import pytest

from sdcore.compile import build


def _mlp(width: int):
    from tvm.relax.frontend import nn

    class MLP(nn.Module):
        def __init__(self):
            self.fc1 = nn.Linear(16, width)
            self.fc2 = nn.Linear(width, 8)

        def forward(self, x):
            return self.fc2(nn.op.silu(self.fc1(x)))

    spec = {"forward": {"x": nn.spec.Tensor([4, 16], "float32")}}
    return MLP(), spec


def _params(model, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal([int(s) for s in p.shape]).astype(np.float32) for n, p in model.named_parameters()}


def _expected(params, x):
    h = x @ params["fc1.weight"].T + params["fc1.bias"]
    h = h / (1 + np.exp(-h))
    return h @ params["fc2.weight"].T + params["fc2.bias"]


def _run(tmp_path, caplog, width=32):
    model, spec = _mlp(width)
    params = _params(model)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sdcore.compile"):
        cm = build(model, spec, name="mlp", cache_dir=tmp_path)
    cm.set_params(params)
    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    np.testing.assert_allclose(cm.forward(x), _expected(params, x), rtol=1e-5, atol=1e-5)
    return [r.getMessage() for r in caplog.records]


def test_warm_cache_loads_without_compiling(tmp_path, caplog):
    cold = _run(tmp_path, caplog)
    assert any(m.startswith("compiled mlp for llvm in") for m in cold), cold
    warm = _run(tmp_path, caplog)
    assert any(m.startswith("loaded mlp from cache") for m in warm), warm
    assert not any(m.startswith("compiled") for m in warm), warm
    assert len(list(tmp_path.glob("mlp-*.so"))) == 1
    assert not [p for p in tmp_path.iterdir() if p.suffix not in (".so", ".json")], "temporary files left behind"


def test_changed_model_gets_its_own_entry(tmp_path, caplog):
    _run(tmp_path, caplog, width=32)
    other = _run(tmp_path, caplog, width=48)
    assert any(m.startswith("compiled mlp") for m in other), other
    assert len(list(tmp_path.glob("mlp-*.so"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete-meta"])
def test_corrupt_entry_is_rebuilt(tmp_path, caplog, damage):
    _run(tmp_path, caplog)
    lib = next(tmp_path.glob("mlp-*.so"))
    # a new file in its place: this process still maps the old one, and writing into a mapped
    # library would crash the test itself (SIGBUS), not sdcore
    data = lib.read_bytes()
    if damage != "delete-meta":
        lib.unlink()
    if damage == "truncate":
        lib.write_bytes(data[:1000])
    elif damage == "garbage":
        lib.write_bytes(b"not a shared library")
    else:
        lib.with_suffix(".json").unlink()
    messages = _run(tmp_path, caplog)
    assert any(m.startswith("compiled mlp") for m in messages), messages
    if damage != "delete-meta":
        assert any("is corrupt" in m for m in messages), messages
    assert _run(tmp_path, caplog)[-1].startswith("loaded mlp from cache")


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's; elsewhere trim_heap does nothing")
def test_heap_trim_found_and_returns_freed_memory():
    """The pipeline trims the heap after binding weights: freed blocks below glibc's (raised) mmap
    threshold otherwise stay resident (534 MiB after binding SD1.5's UNet)."""
    import ctypes

    from sdcore.compile import runtime as compile_mod

    assert compile_mod._malloc_trim is not None

    def rss_kb():
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 64 << 20)  # 1 MiB blocks from the heap, as after a large free
    try:
        blocks = [libc.malloc(1 << 20) for _ in range(64)]
        for b in blocks:
            ctypes.memset(b, 1, 1 << 20)
        for b in blocks[:-1]:  # the last one keeps the heap's top in place: only a trim returns the rest
            libc.free(b)
        before = rss_kb()
        compile_mod.trim_heap()
        after = rss_kb()
        libc.free(blocks[-1])
    finally:
        libc.mallopt(m_mmap_threshold, 128 << 10)  # glibc's default
    assert before - after > 32 << 10, (before, after)  # 63 MiB freed; at least half given back


def test_compiling_the_demo_networks_prints_no_tvm_warning(tmp_path):
    """A compile writes nothing of TVM's own to the terminal: TOPI's "fast" take logged "Fast mode
    segfaults when there are out-of-bounds indices" at every build (CLIP's pooled-output take)."""
    import os
    import subprocess

    code = ("import sdcore, numpy as np; p = sdcore.StableDiffusion.load(); "
            "p.encode_prompt('a red circle', '', None); p.unet(2, 8, 8, 77); p.vae('decode', 64, 64)")
    env = dict(os.environ, SDCORE_CACHE=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert list(tmp_path.glob("*.so")), "nothing was compiled"
    assert "Warning" not in done.stderr and "warning" not in done.stderr.lower(), done.stderr


def test_target_names():
    """"cpu" is the name users type for the host CPU (TVM calls it llvm); an unknown name is a usage error."""
    from sdcore.compile import make_target
    from sdcore.errors import UsageError

    assert str(make_target("cpu")) == str(make_target("llvm"))
    assert make_target("cpu").kind.name == "llvm"
    with pytest.raises(UsageError, match="unknown target 'gpu'"):
        make_target("gpu")
