"""sdcore's CPU schedules (sdcore/schedule) give the numbers of TVM's unscheduled build.

Each case builds one small module twice, `schedule=True` (kernel dispatch, fast-exp rewrite, lifted
weight transposes, hand-written schedule rules) and `schedule=False` (TVM's default pipeline, which
legalizes attention and the convs itself), and compares: the same sums in another order, plus a
polynomial exp, so agreement is to ~1e-5 relative. Shapes are chosen to hit every branch of the
rules: batch 1 and 2, widths that are and are not multiples of the vector width, head sizes of 40
and 77 keys, 1x1/3x3/stride-2 convolutions. The dispatch tests count which kernels the pass puts
in a small exported module (sdcore/schedule/dispatch.py), for llvm and cuda.
"""

from __future__ import annotations

import collections
import math
import platform
from pathlib import Path

import numpy as np
import pytest
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from sdcore.compile import build, make_target
from sdcore.layers import attention
from sdcore.schedule.matmul import _PANEL_BYTES, _packed_row_tiles, matmul_tiles


class _Linear(nn.Module):
    def __init__(self, k, n):
        self.lin = nn.Linear(k, n)

    def forward(self, x):
        return op.gelu(self.lin(x))  # bias and GELU: an epilogue inlined into the write-back


class _Attention(nn.Module):
    def __init__(self, heads):
        self.heads = heads

    def forward(self, q, k, v):
        return attention(q, k, v, self.heads)


class _ConvBlock(nn.Module):
    def __init__(self, c, o, kernel, stride):
        self.norm = nn.GroupNorm(4, c)
        self.conv = nn.Conv2D(c, o, kernel, stride=stride, padding=kernel // 2)

    def forward(self, x):
        return self.conv(op.silu(self.norm(x)))


class _Softmax(nn.Module):
    def forward(self, x):
        return op.softmax(x * 3.0, axis=-1) + op.sigmoid(x)


class _Geglu(nn.Module):
    def forward(self, x):
        value, gate = op.chunk(x, 2, dim=-1)
        return value * op.gelu(gate)


def _both(module, spec: dict, tmp_path, inputs, seed=0, target="llvm"):
    """(scheduled output for `target`, unscheduled output for this CPU) with the same random weights."""
    outs, params = [], None
    for scheduled in (True, False):
        cm = build(module, spec, name="schedule-test", target=target if scheduled else "llvm", cache_dir=tmp_path,
                   use_cache=False, schedule=scheduled)
        if params is None:
            rng = np.random.default_rng(seed)
            params = {n: (rng.standard_normal(s) * 0.2).astype(d) for n, s, d in
                      zip(cm.param_names, cm.param_shapes, cm.param_dtypes)}
        cm.set_params(params)
        outs.append(cm.forward(*inputs))
    return outs


def _close(ours, ref, rtol=2e-5):
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    assert err <= rtol * max(scale, 1e-6), f"max abs error {err} at scale {scale}"


# (2, 24, 40, 192) and (1, 7, 16, 80): several column panels, so the weight is packed per task
@pytest.mark.parametrize("batch,m,k,n", [(2, 24, 40, 48), (1, 7, 16, 80), (2, 5, 33, 20), (2, 24, 40, 192)])
def test_linear_matches_unscheduled(tmp_path, batch, m, k, n):
    x = np.random.default_rng(1).standard_normal((batch, m, k)).astype("float32")
    spec = {"forward": {"x": nn.spec.Tensor(x.shape, "float32")}}
    ours, ref = _both(_Linear(k, n), spec, tmp_path, [x])
    _close(ours, ref)


def _attention_reference(q, k, v, heads, causal=False):
    """softmax(q kᵀ / sqrt(d)) v in float64 numpy; [B, N, C] in and out."""
    (b, n, c), m = q.shape, k.shape[1]
    d = c // heads
    qh, kh, vh = (a.astype(np.float64).reshape(b, -1, heads, d).transpose(0, 2, 1, 3) for a in (q, k, v))
    scores = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(d)  # [B, H, N, M]
    if causal:
        scores = scores + np.triu(np.full((n, m), -np.inf), 1)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ vh).transpose(0, 2, 1, 3).reshape(b, n, c)


class _CausalAttention(nn.Module):
    def forward(self, q, k, v):
        return attention(q, k, v, 2, causal=True)


# The fused kernel (sdcore/schedule/attention.py) in the scheduled build, TVM's legalized attention
# op in the other, each checked against numpy:
# query counts that are and are not multiples of its 32-query block, key counts that are and are not
# multiples of its 12-key tile (77: cross-attention), head widths 40/64/80/160 (SD1.5's and SD2.1's)
# and 16; and CLIP's causal attention (77 tokens, keys after the query masked).
@pytest.mark.parametrize("n,m,heads,d", [(64, 64, 2, 40), (48, 77, 1, 16), (37, 70, 3, 80), (32, 24, 1, 64),
                                         (5, 100, 2, 160), (96, 96, 1, 40)])
def test_attention_matches_numpy(tmp_path, n, m, heads, d):
    rng = np.random.default_rng(2)
    q = rng.standard_normal((2, n, heads * d)).astype("float32")
    k = rng.standard_normal((2, m, heads * d)).astype("float32")
    v = rng.standard_normal((2, m, heads * d)).astype("float32")
    spec = {"forward": {name: nn.spec.Tensor(a.shape, "float32") for name, a in (("q", q), ("k", k), ("v", v))}}
    ours, unscheduled = _both(_Attention(heads), spec, tmp_path, [q, k, v])
    ref = _attention_reference(q, k, v, heads)
    _close(ours, ref)
    _close(unscheduled, ref)


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("n,m,heads,d,causal", [(37, 77, 2, 40, False), (16, 30, 1, 80, False),
                                                (40, 300, 1, 16, False), (77, 77, 2, 64, True),
                                                (20, 20, 1, 8, True), (150, 150, 2, 8, True)])
def test_attention_kernel_for_each_vector_width(n, m, heads, d, causal, lanes):
    """The kernel's tiles for AVX2 (8 lanes: 16 queries x 6 keys) and AVX-512 (16: 32 x 12), each
    built on its own whatever this machine has, against numpy; causal as CLIP's (77 tokens: the
    last query block is partly past the end) and with fewer tokens than one query block; 300 and
    150 keys are three and two blocks of p·v (KEY_BLOCK = 128), the last one partly zero."""
    import tvm

    from sdcore.schedule.attention import attention_kernel

    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, n, heads * d)).astype("float32")
    k = rng.standard_normal((2, m, heads * d)).astype("float32")
    v = rng.standard_normal((2, m, heads * d)).astype("float32")
    k_heads = np.ascontiguousarray(k.reshape(2, m, heads, d).transpose(0, 2, 1, 3))
    v_heads = np.ascontiguousarray(v.reshape(2, m, heads, d).transpose(0, 2, 1, 3))
    func = attention_kernel(2, n, m, heads, d, 1.0 / d**0.5, lanes, causal).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((2, n, heads, d), "float32"), dev)
    lib["main"](*(tvm.runtime.tensor(a, dev) for a in (q.reshape(2, n, heads, d), k_heads, v_heads)), out)
    _close(out.numpy().reshape(q.shape), _attention_reference(q, k, v, heads, causal=causal))


def test_causal_attention_matches_numpy(tmp_path):
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 77, 32)).astype("float32") for _ in range(3))
    spec = {"forward": {name: nn.spec.Tensor(a.shape, "float32") for name, a in (("q", q), ("k", k), ("v", v))}}
    ours, unscheduled = _both(_CausalAttention(), spec, tmp_path, [q, k, v])
    ref = _attention_reference(q, k, v, 2, causal=True)
    _close(ours, ref)
    _close(unscheduled, ref)


@pytest.mark.parametrize("batch,c,o,hw,kernel,stride", [
    (2, 8, 16, 16, 3, 1),   # 16 columns: one vector per row
    (1, 8, 12, 8, 3, 1),    # 8 columns: rows stacked in the register tile
    (1, 8, 8, 12, 1, 1),    # 1x1: no padding copy
    (2, 16, 8, 32, 1, 1),   # 1x1 with its input copied to [N, H, C, W]
    (1, 8, 12, 32, 3, 1),   # 3x3: 4 rows x 4 channels x one vector, two column tiles
    (2, 8, 8, 10, 3, 2),    # stride 2, odd output width
])
def test_conv_matches_unscheduled(tmp_path, batch, c, o, hw, kernel, stride):
    x = np.random.default_rng(3).standard_normal((batch, c, hw, hw)).astype("float32")
    spec = {"forward": {"x": nn.spec.Tensor(x.shape, "float32")}}
    ours, ref = _both(_ConvBlock(c, o, kernel, stride), spec, tmp_path, [x])
    _close(ours, ref)


_HASWELL = {"kind": "llvm", "mcpu": "haswell", "num-cores": 2}
_X86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="builds for an x86 AVX2 CPU")


def _haswell_vs_unscheduled(module, x, tmp_path, kernel: str, marker: str):
    """Build `module` for an AVX2 CPU (haswell), whatever this x86 machine has, check that the
    scheduled `kernel` PrimFunc contains `marker` (the AVX2 rule took it), and compare its output
    with TVM's unscheduled build."""
    import tvm
    from tvm import relax
    from tvm.target import Target

    from sdcore.compile import scheduling_passes

    haswell = Target(_HASWELL)
    spec = {"forward": {"x": nn.spec.Tensor(x.shape, "float32")}}
    ir_mod, _ = module.export_tvm(spec=spec)
    ir_mod = relax.transform.LiftTransformParams()(ir_mod)
    with haswell:
        ir_mod = tvm.transform.Sequential(scheduling_passes(haswell))(ir_mod)
    funcs = [f.script() for gv, f in ir_mod.functions.items() if kernel in gv.name_hint]
    assert len(funcs) == 1 and marker in funcs[0], f"the AVX2 rule did not apply to {kernel}"
    _close(*_both(module, spec, tmp_path, [x], target=haswell))


@_X86
@pytest.mark.parametrize("batch,c,o,hw,stride", [
    (1, 16, 8, 32, 1),     # 2 input-channel blocks, 2 channel tiles, one 32-column strip
    (2, 24, 20, 128, 1),   # 3 blocks, 5 channel tiles (1 per task), two 64-column strips per row
    (1, 16, 8, 64, 2),     # stride 2 to a 32-column output
])
def test_conv_avx2_channel_blocked(tmp_path, batch, c, o, hw, stride):
    """The AVX2 3x3 rule that blocks the reduction by 8 input channels."""
    x = np.random.default_rng(5).standard_normal((batch, c, hw, hw)).astype("float32")
    _haswell_vs_unscheduled(_ConvBlock(c, o, 3, stride), x, tmp_path, "conv2d", "rc_0")


@_X86
@pytest.mark.parametrize("batch,m,k,n", [
    (2, 77, 24, 64),   # text-encoder rows: padded to 78, 2 column panels (packed, batch inside the task)
    (1, 77, 16, 32),   # one panel: not packed
])
def test_linear_avx2_rows_padded(tmp_path, batch, m, k, n):
    """The AVX2 GEMM on rows padded from 77 to 78 (4 vectors x 3 rows), the padded rows dropped by a
    copy that also applies the bias and GELU."""
    x = np.random.default_rng(6).standard_normal((batch, m, k)).astype("float32")
    _haswell_vs_unscheduled(_Linear(k, n), x, tmp_path, "matmul", "_pad")


class _Conv3x3(nn.Module):
    def __init__(self, c, o):
        self.conv = nn.Conv2D(c, o, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def _conv3x3_float64(x, w, b):
    """3x3 cross-correlation with zero padding 1 in float64 numpy; x [N, C, H, W], w [O, C, 3, 3]."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # [N, C, H, W, 3, 3]
    return np.einsum("nchwrs,ocrs->nohw", patches, w.astype(np.float64)) + b[None, :, None, None]


@pytest.mark.parametrize("batch,c,o,h,w,cpu", [
    (2, 16, 32, 16, 16, "host"),     # 2 x 8 x 8 tiles
    (1, 16, 32, 9, 13, "host"),      # odd sizes: the last tile row and column half outside
    (1, 256, 256, 8, 8, "host"),     # 256 channels: several panels of U, a 256-long reduction
    (2, 16, 24, 10, 12, "haswell"),  # AVX2's 8-channel blocks (24 channels: 3 of them)
    (2, 32, 48, 16, 16, "avx512"),   # AVX-512's 16-channel blocks: run only on such a CPU
])
def test_winograd_conv_against_float64(tmp_path, monkeypatch, batch, c, o, h, w, cpu):
    """The dispatch pass's Winograd F(2x2, 3x3) path (forced on for small images and channel counts)
    against a float64 convolution: input transform, GEMM with U computed per task from the weight,
    output transform."""
    from tvm.target import Target

    from sdcore.schedule import winograd

    if cpu != "host" and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("builds for an x86 CPU")
    monkeypatch.setattr(winograd, "WINOGRAD_MIN_TILES", 1)
    monkeypatch.setattr(winograd, "WINOGRAD_MIN_CHANNELS", 1)
    used = []
    real = winograd.input_transform
    monkeypatch.setattr(winograd, "input_transform", lambda *a: used.append(a) or real(*a))
    target = {"host": "llvm", "haswell": Target(_HASWELL),
              "avx512": Target({"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2})}[cpu]
    x = np.random.default_rng(7).standard_normal((batch, c, h, w)).astype("float32")
    cm = build(_Conv3x3(c, o), {"forward": {"x": nn.spec.Tensor(x.shape, "float32")}}, name="winograd-test",
               target=target, cache_dir=tmp_path, use_cache=False)
    assert used, "the Winograd path was not taken"
    cpuinfo = Path("/proc/cpuinfo")
    if cpu == "avx512" and "avx512f" not in (cpuinfo.read_text() if cpuinfo.exists() else ""):
        pytest.skip("built for AVX-512 (every kernel scheduled and compiled); this CPU cannot run it")
    rng = np.random.default_rng(8)
    weight = (rng.standard_normal((o, c, 3, 3)) / np.sqrt(9 * c)).astype("float32")
    bias = rng.standard_normal(o).astype("float32")
    cm.set_params({"conv.weight": weight, "conv.bias": bias})
    _close(cm.forward(x), _conv3x3_float64(x, weight, bias), rtol=1e-5)


def _dispatched(module, spec: dict, target="llvm") -> collections.Counter:
    """Export `module` and run the dispatch pass for `target`: -> how often each PrimFunc (call_tir,
    by name without its numbered suffix) and each Relax op is called."""
    import tvm
    from tvm import relax

    from sdcore.schedule.dispatch import DispatchKernels

    target = make_target(target) if target == "llvm" else make_target("cuda", arch="sm_90")
    ir_mod, _ = module.export_tvm(spec=spec)
    with target:
        ir_mod = DispatchKernels(target)(ir_mod)
    counts = collections.Counter()

    def count(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            name = expr.op.name
            counts[expr.args[0].name_hint.rstrip("0123456789") if name == "relax.call_tir" else name] += 1

    relax.analysis.post_order_visit(ir_mod["forward"], count)
    return counts


def test_winograd_only_where_it_applies():
    """Direct convolution for what F(2x2, 3x3) does not cover or does not pay for."""

    def takes(c, o, shape, kernel=3, padding=1, stride=1, bias=True):
        conv = nn.Conv2D(c, o, kernel, padding=padding, stride=stride, bias=bias)
        counts = _dispatched(conv, {"forward": {"x": nn.spec.Tensor(shape, "float32")}})
        assert counts["winograd_input"] == counts["winograd_gemm"] == counts["winograd_output"]
        assert counts["relax.nn.conv2d"] == 1 - counts["winograd_input"]
        return counts["winograd_input"] == 1

    assert takes(320, 320, (2, 320, 64, 64))
    assert takes(1280, 1280, (2, 1280, 16, 16))             # 128 tiles
    assert takes(1280, 1280, (2, 1280, 12, 12))             # 72 tiles (SD2.1 at 768x768)
    assert not takes(1280, 1280, (1, 1280, 6, 6))           # 9 tiles: the transforms do not pay
    assert not takes(128, 128, (1, 128, 512, 512))          # V and M would take 1 GiB
    assert takes(512, 512, (1, 512, 128, 128))              # 256 MiB (the VAE's 128x128 stage)
    assert not takes(256, 256, (1, 256, 256, 256))          # 512 MiB (the VAE's 256x256 stage)
    assert not takes(960, 320, (2, 960, 96, 96))            # 360 MiB (SD2.1's UNet at 768x768)
    assert takes(960, 320, (2, 960, 64, 64))                # 160 MiB
    assert not takes(320, 320, (2, 320, 64, 64), stride=2)
    assert not takes(320, 320, (2, 320, 64, 64), kernel=1, padding=0)
    assert not takes(320, 320, (2, 320, 64, 64), bias=False)
    assert not takes(4, 320, (2, 4, 64, 64))                # channels not a multiple of the vector
    assert not takes(512, 8, (1, 512, 64, 64))              # the VAE encoder's conv_out: 8 channels
    assert takes(32, 32, (2, 32, 8, 8))                     # the demo UNet's resnets (as before the dispatch pass)
    assert takes(16, 16, (1, 16, 64, 64))                   # the demo VAE's last stage


class _VAEStage(nn.Module):
    """A VAE resnet (norm-SiLU-conv twice) and its attention, at a given size."""

    def __init__(self, channels):
        from sdcore.vae.blocks import Attention, ResnetBlock2D

        self.resnet = ResnetBlock2D(in_channels=channels, out_channels=channels, groups=8)
        self.attention = Attention(channels=channels, groups=8)

    def forward(self, x):
        return self.attention(self.resnet(x))


def test_dispatch_picks_the_cpu_kernels():
    """On llvm the VAE's accurate GroupNorms become the fused kernel (with the SiLU after them in
    the resnet), its 3x3 convs Winograd and its attention the fused kernel; rows that are not a
    multiple of 16 keep the GroupNorm graph."""
    counts = _dispatched(_VAEStage(64), {"forward": {"x": nn.spec.Tensor((1, 64, 32, 32), "float32")}})
    assert counts["group_norm"] == 3 and counts["relax.nn.silu"] == 0 and counts["relax.sum"] == 0
    assert counts["winograd_input"] == 2 and counts["relax.nn.conv2d"] == 0
    assert counts["fused_attention"] == 1 and counts["relax.nn.attention"] == 0
    counts = _dispatched(_VAEStage(64), {"forward": {"x": nn.spec.Tensor((1, 64, 12, 12), "float32")}})
    assert counts["group_norm"] == 0 and counts["relax.sum"] == 12 and counts["relax.nn.silu"] == 2


def test_dispatch_leaves_the_unet_group_norm():
    """TVM's own group_norm (the UNet's nn.GroupNorm) is not the accurate graph: no kernel for it."""
    counts = _dispatched(_ConvBlock(64, 64, 1, 1), {"forward": {"x": nn.spec.Tensor((1, 64, 32, 32), "float32")}})
    assert counts["relax.nn.group_norm"] == 1 and counts["group_norm"] == 0


@pytest.mark.parametrize("causal", [False, True])
def test_dispatch_attention_per_target(causal):
    """float32 attention is the fused kernel on llvm; on cuda, and for float16 on llvm, the graph of
    matmuls and a softmax (with the causal mask) that dlight's GPU rules schedule."""

    class _Self(nn.Module):
        def forward(self, q):
            return attention(q, q, q, 2, causal=causal)

    for target, dtype, fused in [("llvm", "float32", 1), ("cuda", "float32", 0), ("llvm", "float16", 0)]:
        counts = _dispatched(_Self(), {"forward": {"q": nn.spec.Tensor((2, 77, 64), dtype)}}, target)
        assert counts["fused_attention"] == fused and counts["relax.nn.attention"] == 0
        assert counts["relax.nn.softmax"] == counts["relax.matmul"] / 2 == 1 - fused
        assert counts["relax.triu"] == (1 - fused) * causal


def test_cuda_half_upcast_attention_as_today():
    """With upcast (CLIP, SD2.1-v) in float16, the scores and softmax are float32 and p·v float16."""
    from tvm import relax

    class _Self(nn.Module):
        def forward(self, q):
            return attention(q, q, q, 2, causal=True, upcast=True)

    counts = _dispatched(_Self(), {"forward": {"q": nn.spec.Tensor((2, 77, 64), "float16")}}, "cuda")
    assert counts["relax.astype"] == 3 and counts["relax.nn.softmax"] == 1
    ir_mod, _ = _Self().export_tvm(spec={"forward": {"q": nn.spec.Tensor((2, 77, 64), "float16")}})
    softmax = [b.value for b in ir_mod["forward"].body.blocks[0].bindings
               if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.nn.softmax"]
    assert [s.ty.dtype for s in softmax] == ["float32"]


def test_softmax_sigmoid_fast_exp(tmp_path):
    x = (np.random.default_rng(4).standard_normal((2, 3, 40)) * 10).astype("float32")
    spec = {"forward": {"x": nn.spec.Tensor(x.shape, "float32")}}
    ours, ref = _both(_Softmax(), spec, tmp_path, [x])
    _close(ours, ref, rtol=1e-5)


def test_gelu_fast_erf_against_float64(tmp_path):
    # gates over [-9, 9]: the rational erf's whole range and its clamp at |x/sqrt(2)| = 4
    gate = np.linspace(-9.0, 9.0, 2 * 3 * 64).reshape(2, 3, 64)
    value = np.random.default_rng(5).standard_normal((2, 3, 64))
    x = np.concatenate([value, gate], axis=-1).astype("float32")
    spec = {"forward": {"x": nn.spec.Tensor(x.shape, "float32")}}
    cm = build(_Geglu(), spec, name="schedule-test", cache_dir=tmp_path, use_cache=False)
    cm.set_params({})
    ours = cm.forward(x)
    g = x[..., 64:].astype(np.float64)
    erf = np.vectorize(math.erf)(g / math.sqrt(2.0))
    ref = x[..., :64].astype(np.float64) * 0.5 * g * (1.0 + erf)
    assert float(np.abs(ours - ref).max()) <= 2e-6 * float(np.abs(ref).max())


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("batch,c,h,w", [(1, 64, 6, 32), (2, 32, 3, 16), (1, 16, 4, 12)])  # 12 wide: the graph
def test_group_norm_kernel_against_float64(tmp_path, silu, batch, c, h, w):
    from sdcore.layers import GroupNorm

    class _Norm(nn.Module):
        def __init__(self):
            self.norm = GroupNorm(8, c, 1e-6, "float32")

        def forward(self, x):
            return op.silu(self.norm(x)) if silu else self.norm(x)

    rng = np.random.default_rng(6)
    x = (rng.standard_normal((batch, c, h, w)) * 3 + 20).astype("float32")  # a mean far from 0
    weight, bias = rng.standard_normal(c).astype("float32"), rng.standard_normal(c).astype("float32")
    cm = build(_Norm(), {"forward": {"x": nn.spec.Tensor(x.shape, "float32")}}, name="schedule-test",
               cache_dir=tmp_path, use_cache=False)
    cm.set_params({"norm.weight": weight, "norm.bias": bias})
    ours = cm.forward(x)
    g = x.astype(np.float64).reshape(batch, 8, -1)
    ref = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)).reshape(x.shape)
    ref = ref * weight[:, None, None] + bias[:, None, None]
    if silu:
        ref = ref / (1 + np.exp(-ref))
    _close(ours, ref, rtol=1e-5)


def test_matmul_tiles_fit_the_registers():
    for m, n in [(8192, 320), (154, 320), (2048, 40), (1024, 77), (128, 10240), (3, 5)]:
        nr, vw, mr, mc = matmul_tiles(m, n, 16)
        assert nr % vw == 0 and n % nr == 0
        vectors = -(-nr // 16) if vw == 16 else nr // vw
        assert mr * vectors <= 24 or mr == 1
        assert mc >= 1
        tiles = -(-m // mr)
        packed = _packed_row_tiles(tiles, mr, n // nr)
        assert tiles % packed == 0 and (packed * mr <= 512 or packed == 1)
    # a long reduction (the feed-forward output, K = 5120) narrows the panel to fit the L2
    nr, *_ = matmul_tiles(512, 1280, 16, k=5120)
    assert 1280 % nr == 0 and 5120 * nr * 4 <= _PANEL_BYTES
    assert matmul_tiles(512, 1280, 16, k=320)[0] == 80


def test_build_keeps_no_caller_frame_alive(tmp_path):
    """TVMScript's parser (run while the dispatch pass builds the attention kernel) keeps inspect.stack() records in
    reference cycles that hold every caller's frame; build() collects them, so a caller's locals (the
    pipeline's loaded weights, a test's models) are freed when it returns, not at some later GC."""
    import gc
    import weakref

    class Payload:
        pass

    def caller():
        payload = Payload()
        spec = {"forward": {n: nn.spec.Tensor((1, 16, 32), "float32") for n in ("q", "k", "v")}}
        build(_Attention(2), spec, name="frames", cache_dir=tmp_path)
        return weakref.ref(payload)

    gc.disable()  # only build()'s own collection may run
    try:
        ref = caller()
        assert ref() is None, "the caller's frame outlived the call"
    finally:
        gc.enable()


def test_bench_ops_tool_runs():
    """tools/bench_ops.py builds each variant, checks it against PyTorch and prints one row per op
    (in a subprocess: it sets the process's thread counts)."""
    import subprocess
    import sys

    pytest.importorskip("torch")
    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_ops.py"
    out = subprocess.run([sys.executable, str(tool), "--conv", "8,8,8", "--linear", "1,5,8,16", "--runs", "1",
                          "--variant", "one_tile:_RC_TILES=1"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| conv", "| Linear"))]
    assert len(rows) == 2 and all(row.count("x)") == 2 for row in rows)


@pytest.mark.parametrize("args,message", [
    (["--conv", "8,8"], "--conv 8,8: expected 3 or 4 positive integer(s)"),
    (["--linear", "1,5,8,0"], "--linear 1,5,8,0: expected 4 positive integer(s)"),
    (["--conv", "8,8,8", "--variant", "v:_RC_TILES=two"], "--variant v:_RC_TILES=two: expected 1 positive"),
    (["--conv", "8,8,8", "--variant", "v:_NO_SUCH=1"], "no module of sdcore.schedule has _NO_SUCH"),
])
def test_bench_ops_tool_bad_input(args, message):
    """A malformed shape or variant is one line on stderr and exit 2, before anything is built."""
    import subprocess
    import sys

    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_ops.py"
    out = subprocess.run([sys.executable, str(tool), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert message in out.stderr.strip().splitlines()[-1] and "Traceback" not in out.stderr, out.stderr

