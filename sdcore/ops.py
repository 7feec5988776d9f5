"""Operators shared by the networks. Attention lives here once, so a faster kernel replaces it in one place."""

from __future__ import annotations

import contextlib
import contextvars

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

# float32 lanes of the vector registers of the CPU the module being exported is for, which size the
# register tiles of sdcore's hand-written CPU kernels (sdcore/schedule); 0 while exporting for a GPU:
# those kernels are plain loops, with no thread bindings. compile.export sets it per target.
_CPU_LANES = contextvars.ContextVar("sdcore_cpu_lanes", default=16)


@contextlib.contextmanager
def kernels_for(target):
    """While a module is exported for `target` (a TVM Target): the CPU kernels only for llvm, tiled
    for its vector width."""
    from sdcore.schedule.common import vector_lanes

    token = _CPU_LANES.set(vector_lanes(target) if target.kind.name == "llvm" else 0)
    try:
        yield
    finally:
        _CPU_LANES.reset(token)


def cpu_kernels() -> bool:
    """True when the module being exported is for the CPU (the default outside compile.build)."""
    return _CPU_LANES.get() > 0


def cpu_vector_lanes() -> int:
    """float32 lanes of the export target's vector registers (16 outside compile.build)."""
    return _CPU_LANES.get()


def attention(q: nn.Tensor, k: nn.Tensor, v: nn.Tensor, num_heads: int, *, causal: bool = False,
              upcast: bool = False) -> nn.Tensor:
    """softmax(q kᵀ / sqrt(d)) v over `num_heads` heads; q [B, N, C], k and v [B, M, C] -> [B, N, C].

    `causal` masks keys after the query position (CLIP's text transformer). `upcast` computes the
    scores and softmax in float32 whatever the activations' dtype (diffusers' upcast_attention,
    needed by SD2.1-v in half precision).

    float32 attention with static shapes (every UNet and VAE attention, CLIP's causal one) is one
    fused kernel for the CPU (`sdcore.schedule.attention`): at 64x64 latents it never writes the
    2 x 8 x 4096 x 4096 score matrix, and CLIP's 77 x 77 scores no longer take a GEMM tiled for
    77 columns one scalar at a time (51 of the text encoder's 624 ms, batch 2, 1 thread). The rest
    (other dtypes, every CUDA build) is the plain graph below, which TVM's dlight rules schedule for
    the GPU.
    """
    b, n, c = q.shape
    m = k.shape[1]
    d = c // num_heads
    dtype = q.dtype
    if (cpu_kernels() and dtype == "float32" and all(isinstance(x, int) for x in (b, n, m, c))
            and (not causal or n == m)):
        # One fused CPU kernel, no [B, H, N, M] score matrix and no permutes (sdcore/schedule/attention.py).
        from sdcore.schedule.attention import attention_kernel

        func = attention_kernel(b, n, m, num_heads, d, 1.0 / d**0.5, cpu_vector_lanes(), causal)
        k_heads = op.permute_dims(op.reshape(k, (b, m, num_heads, d)), (0, 2, 1, 3))  # [B, H, M, D]
        v_heads = op.permute_dims(op.reshape(v, (b, m, num_heads, d)), (0, 2, 1, 3))  # [B, H, M, D]
        return op.tensor_ir_op(func, "fused_attention", [q, k_heads, v_heads],
                               out=nn.Tensor.placeholder((b, n, c), dtype))
    q = op.permute_dims(op.reshape(q, (b, n, num_heads, d)), (0, 2, 1, 3))  # [B, H, N, D]
    k = op.permute_dims(op.reshape(k, (b, m, num_heads, d)), (0, 2, 3, 1))  # [B, H, D, M]
    v = op.permute_dims(op.reshape(v, (b, m, num_heads, d)), (0, 2, 1, 3))  # [B, H, M, D]
    if upcast and dtype != "float32":
        q, k = q.astype("float32"), k.astype("float32")
    scores = op.matmul(q, k) * (1.0 / d**0.5)  # [B, H, N, M]
    if causal:
        mask = op.triu(op.full((n, m), -1e9 if scores.dtype == "float32" else -6e4, scores.dtype), 1)  # [N, M]
        scores = scores + mask
    probs = op.softmax(scores, axis=-1).astype(dtype)
    out = op.matmul(probs, v)  # [B, H, N, D]
    return op.reshape(op.permute_dims(out, (0, 2, 1, 3)), (b, n, c))  # [B, N, C]


# Winograd F(2x2, 3x3) on the CPU (sdcore/schedule/winograd.py) for convolutions with at least this
# many 2x2 output tiles (batch x tile rows x tiles per row; 16 since the sixth 12-01 session, 128
# before: at 12x12 and 10x10, SD2.1's 768x768 and a 640x640 image, the direct conv's rows are not
# whole vectors and 1280 -> 1280 took 569 and 405 ms against 93 and 56 with Winograd, PyTorch 165
# and 124; at 8x8 and 6x6 both ways within 15%; batch 2, 1 thread), and whose transformed input and output
# (V [16, tiles, C] and M [16, tiles, K], the extra workspace) take at most WINOGRAD_MAX_BYTES;
# others stay direct convolutions (sdcore.schedule.cpu.Conv2d). The cap bounds the memory peak of a
# txt2img run: it admits the VAE's 512 -> 512 convs at 128x128 (268 MB of V and M; 1154 -> 811 ms
# each, 1 thread, PyTorch 942), whose V and M storages the VAE's larger tensors later reuse (the
# txt2img peak measured 5460 MB with them and 5460-5491 without, SD1.5 512x512, 2 threads), and
# keeps the 256x256 and 512x512 stages direct (805 MB and up). SD1.5's largest UNet case, 960 -> 320
# at 64x64, takes 168 MB.
WINOGRAD_MIN_TILES = 16
WINOGRAD_MAX_BYTES = 288 << 20


class Conv2D(nn.Conv2D):
    """nn.Conv2D (same parameters) whose 3x3, stride-1, padding-1 float32 convolutions run as
    Winograd F(2x2, 3x3) on the CPU where the image is large enough (WINOGRAD_MIN_TILES)."""

    def winograd(self, x: nn.Tensor) -> bool:
        from sdcore.schedule.winograd import tiles

        lanes = cpu_vector_lanes()
        if not (cpu_kernels() and x.dtype == "float32" and self.bias is not None
                and list(self.kernel_size) == [3, 3] and self.stride == 1 and self.padding == 1
                and self.dilation == 1 and self.groups == 1 and all(isinstance(s, int) for s in x.shape)):
            return False
        n, c, h, w = x.shape
        t_all = tiles(n, h, w)[2]
        return (c % lanes == 0 and self.out_channels % lanes == 0 and t_all >= WINOGRAD_MIN_TILES
                and 16 * t_all * (c + self.out_channels) * 4 <= WINOGRAD_MAX_BYTES)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        if not self.winograd(x):
            return super().forward(x)
        from sdcore.schedule import winograd

        n, c, h, w = x.shape
        k = self.out_channels
        t_all = winograd.tiles(n, h, w)[2]
        lanes = cpu_vector_lanes()
        v = op.tensor_ir_op(winograd.input_transform(n, c, h, w, lanes), "winograd_input", [x],
                            out=nn.Tensor.placeholder((16, t_all, c), "float32"))  # [16, T, C]
        coef = nn.Tensor.from_const(winograd.u_coefficients())  # [16, 9]
        m = op.tensor_expr_op(winograd.gemm, "winograd_gemm", [v, self.weight, coef])  # [16, T, K]
        return op.tensor_ir_op(winograd.output_transform(n, k, h, w, lanes), "winograd_output", [m, self.bias],
                               out=nn.Tensor.placeholder((n, k, h, w), "float32"))
