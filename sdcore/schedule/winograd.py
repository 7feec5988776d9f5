"""Winograd F(2x2, 3x3) convolution for the CPU: a 3x3, stride-1, padding-1 convolution in 2.25x
fewer multiplies.

Each 2x2 block of outputs ("tile") is computed from the 4x4 input patch around it (Lavin & Gray 2016):

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A     for every (input channel, output channel), summed over input channels

so a convolution becomes three steps, which sdcore.schedule.dispatch puts in its place (`takes` says
where):

1. `input_transform`: V[p, t, c] = (Bᵀ d B)[p] for the 16 positions p of every tile t and channel c.
2. `gemm`: one GEMM per position, M[p] = V[p] @ U[p] ([T, C] @ [C, K]; 16 x T x C x K multiply-adds
   instead of 36 x T x C x K), scheduled by sdcore's Matmul rule. U = G g Gᵀ is computed inside it,
   per task, for the task's panel of output channels: a stored U would take 16/9 of the weight's
   memory (+0.85 GB for SD1.5's UNet); a panel costs 9 FMAs per U value, against the >= 128 rows
   of V that use it.
3. `output_transform`: y = Aᵀ M A + bias, written back as NCHW.

Layouts: V and M keep channels innermost (a GEMM row is contiguous); the image is NCHW. The two
transform kernels therefore transpose through a small per-task buffer with channels innermost
(`lanes` channels per task), so every transform is vector arithmetic on contiguous channel vectors.
Both are written already scheduled (parallel over tile rows x channel blocks, vectorized over the
channel block) and marked `tirx.is_scheduled`, like sdcore.schedule.attention.

Transforms (F(2, 3), cross-correlation as in PyTorch):
    Bᵀ = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
    G  = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
    Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]]
"""

from __future__ import annotations

import functools

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from sdcore.schedule.matmul import WINOGRAD_U

# Where F(2x2, 3x3) pays: from this many 2x2 output tiles (batch x tile rows x tiles per row; below,
# the transforms cost what the GEMM saves), while V [16, T, C] and M [16, T, K], the workspace it
# adds, take at most WINOGRAD_MAX_BYTES (a bound on the txt2img memory peak: it admits the VAE's
# 512 -> 512 convs at 128x128, not its 256x256 and 512x512 stages), and with both channel counts
# at least WINOGRAD_MIN_CHANNELS (a network's first and last convs, 3 to 8 channels on one side,
# have little GEMM for the transforms to save). 16, not more: it tells a network's first and last
# convs from its inner ones, and small models' inner convs (the demo model's 16 and 32 channels)
# keep Winograd, whose rounding their tests and parity figures were taken with. Measurements:
# docs/performance.md, "Winograd".
WINOGRAD_MIN_TILES = 16
WINOGRAD_MAX_BYTES = 288 << 20
WINOGRAD_MIN_CHANNELS = 16


def tiles(n: int, h: int, w: int) -> tuple[int, int, int]:
    """(tile rows per image, tiles per row, tiles in all): 2x2 output tiles, the last row/column
    of an odd size half used."""
    th, tw = -(-h // 2), -(-w // 2)
    return th, tw, n * th * tw


def takes(n: int, c: int, k: int, h: int, w: int, lanes: int) -> bool:
    """Whether a 3x3, stride-1, padding-1 float32 conv of x [n, c, h, w] to k channels runs as
    Winograd for `lanes` float32 lanes per vector (the transforms work on blocks of `lanes` channels)."""
    t_all = tiles(n, h, w)[2]
    return (c % lanes == 0 and k % lanes == 0 and min(c, k) >= WINOGRAD_MIN_CHANNELS
            and t_all >= WINOGRAD_MIN_TILES and 16 * t_all * (c + k) * 4 <= WINOGRAD_MAX_BYTES)


def u_coefficients() -> np.ndarray:
    """[16, 9] float32: U[4a + b] = sum over (r, s) of G[a, r] G[b, s] g[r, s], by row 4a + b and column 3r + s."""
    g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    return np.einsum("ar,bs->abrs", g, g).reshape(16, 9).astype("float32")


def gemm(v, weight, coef):
    """TE: M[p, t, k] = sum_c V[p, t, c] U[p, c, k] for V [16, T, C],
    the conv weight [K, C, 3, 3] and `u_coefficients()`. U = G g Gᵀ is computed in the same kernel:
    sdcore's Matmul rule computes each task's K panel of U from the weight where a Linear's weight
    panel is copied, so U (16/9 of the weight) is never stored, and the weight is not transposed at
    load time either (the transposed copies would sit next to the originals while the load-time
    transform runs). The coefficients are an input, not constants selected by p: a select chain per
    value is slow in the panels. Figures: docs/performance.md, "Winograd".
    """
    from tvm import te

    _, t_all, c = v.shape
    k = weight.shape[0]

    def u_value(p, ci, ko):
        terms = [coef[p, 3 * r + s] * weight[ko, ci, r, s] for r in range(3) for s in range(3)]
        return functools.reduce(lambda x, y: x + y, terms)

    u = te.compute((16, c, k), u_value, name=WINOGRAD_U)
    rc = te.reduce_axis((0, c), name="rc")
    return te.compute((16, t_all, k), lambda p, t, ko: te.sum(v[p, t, rc] * u[p, rc, ko], axis=rc), name="matmul")


@functools.lru_cache(maxsize=None)
def gemm_kernel(t_all: int, c: int, k: int) -> tirx.PrimFunc:
    """`gemm` as a PrimFunc: (V [16, t_all, c], weight [k, c, 3, 3], coefficients [16, 9]) -> M [16, t_all, k]."""
    from tvm import te

    v = te.placeholder((16, t_all, c), "float32", "v")
    weight = te.placeholder((k, c, 3, 3), "float32", "weight")
    coef = te.placeholder((16, 9), "float32", "coef")
    return te.create_prim_func([v, weight, coef, gemm(v, weight, coef)], "int64").without_attr("global_symbol")


@functools.lru_cache(maxsize=None)
def input_transform(n: int, c: int, h: int, w: int, lanes: int) -> tirx.PrimFunc:
    """x [n, c, h, w] -> V [16, T, c], V[4a + b, t, ci] = (Bᵀ d B)[a, b] for the 4x4 patch d of
    channel ci around tile t (rows 2ty-1 .. 2ty+2, zero outside the image). `c % lanes == 0`."""
    th, tw, t_all = tiles(n, h, w)
    cb = lanes
    blocks = c // cb
    wp = 2 * tw + 2  # the patch columns of a tile row: one zero column left, one or two right

    @T.prim_func(private=True, check_well_formed=False)  # (the root block)
    def winograd_input(x: T.Buffer((n, c, h, w), "float32"), v: T.Buffer((16, t_all, c), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        with T.sblock("root"):  # (a root block: relax reads a one-input PrimFunc for a reshape pattern)
            for task in T.parallel(n * th * blocks):
                row = T.meta_var(task // blocks)  # tile row over all images
                img = T.meta_var(row // th)
                ty = T.meta_var(row % th)
                ch = T.meta_var((task % blocks) * cb)
                d = T.decl_buffer((4, wp, cb), "float32")  # the 4 input rows, channels innermost
                e = T.decl_buffer((4, wp, cb), "float32")  # Bᵀ d: the rows combined
                for a in range(4):
                    for j in range(wp):
                        for ci in T.vectorized(cb):
                            d[a, j, ci] = T.float32(0)
                    y = T.meta_var(2 * ty - 1 + a)
                    if 0 <= y and y < h:
                        for ci in range(cb):
                            for j in range(w):
                                d[a, j + 1, ci] = x[img, ch + ci, y, j]
                for j in range(wp):
                    for ci in T.vectorized(cb):
                        e[0, j, ci] = d[0, j, ci] - d[2, j, ci]
                        e[1, j, ci] = d[1, j, ci] + d[2, j, ci]
                        e[2, j, ci] = d[2, j, ci] - d[1, j, ci]
                        e[3, j, ci] = d[1, j, ci] - d[3, j, ci]
                for tx in range(tw):
                    t = T.meta_var(row * tw + tx)
                    for a in range(4):
                        for ci in T.vectorized(cb):
                            v[4 * a + 0, t, ch + ci] = e[a, 2 * tx, ci] - e[a, 2 * tx + 2, ci]
                            v[4 * a + 1, t, ch + ci] = e[a, 2 * tx + 1, ci] + e[a, 2 * tx + 2, ci]
                            v[4 * a + 2, t, ch + ci] = e[a, 2 * tx + 2, ci] - e[a, 2 * tx + 1, ci]
                            v[4 * a + 3, t, ch + ci] = e[a, 2 * tx + 1, ci] - e[a, 2 * tx + 3, ci]

    return winograd_input


@functools.lru_cache(maxsize=None)
def output_transform(n: int, k: int, h: int, w: int, lanes: int) -> tirx.PrimFunc:
    """M [16, T, k], bias [1, k, 1, 1] (as the conv's bias add broadcasts it) -> y [n, k, h, w] =
    Aᵀ M A + bias per tile. `k % lanes == 0`."""
    th, tw, t_all = tiles(n, h, w)
    kb = lanes
    blocks = k // kb

    @T.prim_func(private=True, check_well_formed=False)  # (the root block)
    def winograd_output(m: T.Buffer((16, t_all, k), "float32"), bias: T.Buffer((1, k, 1, 1), "float32"),
                        y: T.Buffer((n, k, h, w), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        with T.sblock("root"):  # (a root block: relax reads a one-input PrimFunc for a reshape pattern)
            for task in T.parallel(n * th * blocks):
                row = T.meta_var(task // blocks)
                img = T.meta_var(row // th)
                ty = T.meta_var(row % th)
                ch = T.meta_var((task % blocks) * kb)
                s = T.decl_buffer((2, 4, kb), "float32", scope="local")  # Aᵀ M: 2 rows x 4
                o = T.decl_buffer((2, 2 * tw, kb), "float32")  # the tile row's 2 output rows, channels innermost
                for tx in range(tw):
                    t = T.meta_var(row * tw + tx)
                    for b in T.unroll(4):
                        for ki in T.vectorized(kb):
                            s[0, b, ki] = m[b, t, ch + ki] + m[4 + b, t, ch + ki] + m[8 + b, t, ch + ki]
                            s[1, b, ki] = m[4 + b, t, ch + ki] - m[8 + b, t, ch + ki] - m[12 + b, t, ch + ki]
                    for a in T.unroll(2):
                        for ki in T.vectorized(kb):
                            o[a, 2 * tx, ki] = s[a, 0, ki] + s[a, 1, ki] + s[a, 2, ki] + bias[0, ch + ki, 0, 0]
                            o[a, 2 * tx + 1, ki] = s[a, 1, ki] - s[a, 2, ki] - s[a, 3, ki] + bias[0, ch + ki, 0, 0]
                for a in range(2):
                    if 2 * ty + a < h:
                        for ki in range(kb):
                            for j in range(w):
                                y[img, ch + ki, 2 * ty + a, j] = o[a, j, ki]

    return winograd_output
