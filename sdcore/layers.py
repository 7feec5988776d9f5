"""What the networks share, as plain Relax math for any target: attention, the accurate GroupNorm,
Downsample2D.

Which kernel computes them is not decided here: sdcore.schedule.dispatch rewrites the graph per
target before legalization (on the CPU: one fused attention kernel, one fused GroupNorm(+SiLU)
kernel), and recognizes exactly what these functions emit.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op
from tvm.relax.frontend.nn.core import wrap_nested


def attention(q: nn.Tensor, k: nn.Tensor, v: nn.Tensor, num_heads: int, *, causal: bool = False,
              upcast: bool = False) -> nn.Tensor:
    """softmax(q kᵀ / sqrt(d)) v over `num_heads` heads; q [B, N, C], k and v [B, M, C] -> [B, N, C].

    `causal` masks the keys after each query (CLIP's text transformer). `upcast` computes the scores
    and the softmax in float32 whatever the activations' dtype, and p·v in that dtype (diffusers'
    upcast_attention, needed by SD2.1-v in half precision).
    """
    b, n, c = q.shape
    m = k.shape[1]
    d = c // num_heads
    q = op.reshape(q, (b, n, num_heads, d))  # [B, N, H, D]
    k = op.reshape(k, (b, m, num_heads, d))  # [B, M, H, D]
    v = op.reshape(v, (b, m, num_heads, d))  # [B, M, H, D]
    if upcast and q.dtype != "float32":
        # Relax's attention op computes in one dtype: this mix of two is written out.
        out = wrap_nested(attention_graph(q._expr, k._expr, v._expr, causal=causal, upcast=True), "attention")
    else:
        out = op.scaled_dot_product_attention(q, k, v, is_causal=causal, name="attention")  # [B, N, H, D]
    return op.reshape(out, (b, n, c))  # [B, N, C]


def attention_graph(q: relax.Expr, k: relax.Expr, v: relax.Expr, *, causal: bool, upcast: bool,
                    scale: float | None = None) -> relax.Expr:
    """`R.nn.attention(q, k, v)` as matmuls and a softmax (q [B, N, H, D], k and v [B, M, H, D] ->
    [B, N, H, D]): what dlight's GPU rules schedule, and the CPU's path for what its fused kernel
    does not take. `scale` defaults to 1 / sqrt(D); `upcast` as in `attention`."""
    b, n, heads, d = q.ty.shape.values
    m = k.ty.shape.values[1]
    dtype = q.ty.dtype
    q = relax.op.permute_dims(q, (0, 2, 1, 3))  # [B, H, N, D]
    k = relax.op.permute_dims(k, (0, 2, 3, 1))  # [B, H, D, M]
    v = relax.op.permute_dims(v, (0, 2, 1, 3))  # [B, H, M, D]
    score_dtype = "float32" if upcast else dtype
    if score_dtype != dtype:
        q, k = relax.op.astype(q, score_dtype), relax.op.astype(k, score_dtype)
    scale = 1.0 / int(d) ** 0.5 if scale is None else scale
    scores = relax.op.multiply(relax.op.matmul(q, k), relax.const(scale, score_dtype))  # [B, H, N, M]
    if causal:
        fill = -1e9 if score_dtype == "float32" else -6e4
        mask = relax.op.triu(relax.op.full((n, m), relax.const(fill, score_dtype), score_dtype), 1)  # [N, M]
        scores = relax.op.add(scores, mask)
    probs = relax.op.nn.softmax(scores, axis=-1)
    if score_dtype != dtype:
        probs = relax.op.astype(probs, dtype)
    out = relax.op.matmul(probs, v)  # [B, H, N, D]
    return relax.op.permute_dims(out, (0, 2, 1, 3))  # [B, N, H, D]


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over [B, C, H, W] (same `weight`/`bias`), with accurate float32 statistics.

    TVM's group_norm sums each group in one serial float32 pass: at the VAE's 512x512 stages (up
    to 1M values per group) its output is off by ~6e-4 relative, which the decoder then amplifies.
    Here each row of W values is summed first, then the row sums, and the variance is taken about
    the mean (two passes): ~1e-7 relative, like PyTorch. Half-precision inputs are upcast.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, dtype: str = "float32"):
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter((num_channels,), dtype)
        self.bias = nn.Parameter((num_channels,), dtype)

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        b, c, h, w = x.shape
        g = self.num_groups
        n = (c // g) * h * w
        dtype = x.dtype
        if dtype != "float32":
            x = x.astype("float32")
        # The channels of a group are contiguous.
        grouped = op.reshape(x, (b, g, (c // g) * h, w))  # [B, G, C/G * H, W]
        mean = op.sum(op.sum(grouped, axis=3), axis=2) * (1.0 / n)  # [B, G]
        centered = grouped - op.reshape(mean, (b, g, 1, 1))  # [B, G, C/G * H, W]
        var = op.sum(op.sum(centered * centered, axis=3), axis=2) * (1.0 / n)  # [B, G]
        inv_std = op.divide(op.ones((b, g), "float32"), op.sqrt(var + self.eps))  # [B, G]
        normed = op.reshape(centered * op.reshape(inv_std, (b, g, 1, 1)), (b, c, h, w))  # [B, C, H, W]
        if dtype != "float32":
            normed = normed.astype(dtype)
        return normed * op.reshape(self.weight, (c, 1, 1)) + op.reshape(self.bias, (c, 1, 1))  # [C, 1, 1] broadcast


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution (diffusers `Downsample2D(use_conv=True, name="op")`: weights at `conv`).

    With padding=0 (the VAE encoder's, and UNets built with downsample_padding=0) diffusers pads one
    zero row at the bottom and one column at the right, as the original LDM code did: even sizes
    are halved, and output pixel (i, j) sees input rows 2i..2i+2. Here that is the conv's own
    (top, left, bottom, right) = (0, 0, 1, 1) padding, not a pad op: a separate pad is fused into
    the previous conv's epilogue, which dlight's GPU Matmul rule cannot schedule (its fallback
    needs 256 KB of shared memory, over the 48 KB limit).
    """

    def __init__(self, channels: int, padding: int = 1, dtype: str = "float32"):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2D(channels, channels, 3, stride=2, padding=padding, dtype=dtype)

    def forward(self, hidden_states: nn.Tensor) -> nn.Tensor:
        if self.padding == 0:
            conv = self.conv
            return op.conv2d(hidden_states, conv.weight, conv.bias, stride=2, padding=(0, 0, 1, 1))
        return self.conv(hidden_states)
