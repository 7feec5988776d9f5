"""GroupNorm (+ SiLU) for the CPU in one kernel: the VAE's norms at 256x256 and 512x512.

Written as a graph (sdcore.layers.GroupNorm: row sums, then the sum of the rows, then the variance
about the mean), a GroupNorm becomes five kernels, each a pass over the tensor (a reshape copy, two
reductions, the centring and the scaling), and the SiLU after it a sixth. Here one parallel task
per (sample, group) makes three passes over its group: the sum (each row of W summed in 16 lanes,
the lanes added into the row's total, the rows into the group's), the sum of squares about the mean
(the same way), and the write of (x - mean) * (inv_std * weight) + bias, SiLU applied in the same
loop (fastmath's polynomial exp). The sums are the same two-level float32 sums as the graph's, so
the statistics agree to ~1e-7. Timings: docs/performance.md.

The row width must be a multiple of 16 (the vector width); sdcore.schedule.dispatch leaves the
graph otherwise.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from .fastmath import fast_exp

LANES = 16


def _identity(v):
    return v


def _silu(v):
    return v / (T.float32(1) + fast_exp(-v))


@functools.lru_cache(maxsize=None)
def group_norm_kernel(b: int, c: int, h: int, w: int, groups: int, eps: float, silu: bool) -> tirx.PrimFunc:
    """A PrimFunc (x [b, c, h, w], weight [c, 1, 1], bias [c, 1, 1]: as the graph broadcasts them)
    -> out [b, c, h, w], float32."""
    if w % LANES or c % groups:
        raise ValueError(f"group_norm_kernel: width {w} must be a multiple of {LANES}, channels {c} of groups {groups}")
    cg = c // groups
    inv_n = T.float32(1.0 / (cg * h * w))
    eps_c = T.float32(eps)
    wo = w // LANES
    act = _silu if silu else _identity

    @T.prim_func(private=True)
    def group_norm(x: T.Buffer((b, c, h, w), "float32"), weight: T.Buffer((c, 1, 1), "float32"),
                   bias: T.Buffer((c, 1, 1), "float32"), out: T.Buffer((b, c, h, w), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for task in T.parallel(b * groups):
            n = T.meta_var(task // groups)
            c0 = T.meta_var(task % groups * cg)  # the group's first channel
            lane = T.decl_buffer((LANES,), "float32", scope="local")
            stat = T.decl_buffer((4,), "float32", scope="local")  # sum, row sum, mean, inv_std
            # 1. mean
            stat[0] = T.float32(0)
            for cc, y in T.grid(cg, h):
                for i in T.vectorized(LANES):
                    lane[i] = T.float32(0)
                for xo in range(wo):
                    for i in T.vectorized(LANES):
                        lane[i] = lane[i] + x[n, c0 + cc, y, xo * LANES + i]
                stat[1] = T.float32(0)
                for i in range(LANES):
                    stat[1] = stat[1] + lane[i]
                stat[0] = stat[0] + stat[1]
            stat[2] = stat[0] * inv_n
            # 2. variance about the mean
            stat[0] = T.float32(0)
            for cc, y in T.grid(cg, h):
                for i in T.vectorized(LANES):
                    lane[i] = T.float32(0)
                for xo in range(wo):
                    for i in T.vectorized(LANES):
                        lane[i] = lane[i] + (x[n, c0 + cc, y, xo * LANES + i] - stat[2]) * (
                            x[n, c0 + cc, y, xo * LANES + i] - stat[2])
                stat[1] = T.float32(0)
                for i in range(LANES):
                    stat[1] = stat[1] + lane[i]
                stat[0] = stat[0] + stat[1]
            stat[3] = T.float32(1) / T.sqrt(stat[0] * inv_n + eps_c)
            # 3. normalize, scale and shift (and SiLU)
            for cc in range(cg):
                stat[1] = stat[3] * weight[c0 + cc, 0, 0]  # this channel's scale
                for y, xo in T.grid(h, wo):
                    for i in T.vectorized(LANES):
                        out[n, c0 + cc, y, xo * LANES + i] = act(
                            (x[n, c0 + cc, y, xo * LANES + i] - stat[2]) * stat[1] + bias[c0 + cc, 0, 0])

    return group_norm
