"""Fused row-block attention for the CPU: softmax(q kᵀ · scale) v without the N x M score matrix.

The unfused graph materializes scores [B, H, N, M] (at 64x64 latents, 2 x 8 x 4096 x 4096 floats:
1 GiB per self-attention), writes them, reads them for the softmax's max, again for its exp and sum,
and once more for p·v. Here every task takes one (batch, head, block of BR queries) and keeps the
BR x M scores of its block in a private buffer (BR x 4096 floats = 256 KiB, inside the per-core L2):

1. scores = (q_block · scale) kᵀ: register tiles of 4 queries x 64 keys, the head dimension
   innermost; kᵀ is read as [D, Mp] rows (contiguous keys, so one vector load feeds 4 FMAs).
2. softmax over each row in place: vector max, vector exp (sdcore.schedule.fastmath's polynomial)
   and sum; the 1/sum is applied at the end.
3. out = p v: register tiles of R queries x D, the keys innermost; written straight into the
   [B, N, H*D] layout the output projection reads (no permute of q or of the output).

The function is written already scheduled (parallel over tasks, vectorized, unrolled tiles) and
marked `tirx.is_scheduled`, so the dlight rules leave it alone. It is fp32, non-causal, for the CPU
(the loops are `T.parallel`); `sdcore.ops.attention` chooses it where the key count makes the score
matrix worth avoiding. Shapes are static; a query block past the last row recomputes the last row
(identical values written twice), and keys are padded to a multiple of 64 with masked scores.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from .fastmath import fast_exp

BR = 32  # queries per task: two AVX-512 vectors of float32
KEYS = 12  # keys per register tile of the scores (12 x 2 accumulator vectors)


def _tile(d: int) -> int:
    """Head channels per register tile of p·v: the largest divisor of d up to 12."""
    return max(t for t in range(1, 13) if d % t == 0)


@functools.lru_cache(maxsize=None)
def attention_kernel(b: int, n: int, m: int, heads: int, d: int, scale: float) -> tirx.PrimFunc:
    """A PrimFunc (q [b, n, heads*d], k [b, m, heads*d], v [b, m, heads*d]) -> out [b, n, heads*d]."""
    c = heads * d
    mp = -(-m // KEYS) * KEYS
    blocks = -(-n // BR)
    tasks = b * heads * blocks
    dt = _tile(d)
    neg = T.float32(-3.0e38)
    scale_c = T.float32(scale)

    @T.prim_func(private=True)
    def fused_attention(q: T.Buffer((b, n, c), "float32"), k: T.Buffer((b, m, c), "float32"),
                        v: T.Buffer((b, m, c), "float32"), out: T.Buffer((b, n, c), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for task in T.parallel(tasks):
            qt = T.decl_buffer((d, BR), "float32")  # this block's queries, scaled and transposed
            st = T.decl_buffer((mp, BR), "float32")  # scores, then exp(scores - max), keys x queries
            mx = T.decl_buffer((BR,), "float32")
            inv = T.decl_buffer((BR,), "float32")  # 1 / row sum
            for dd in range(d):
                for i in T.vectorized(BR):
                    qt[dd, i] = q[task // (heads * blocks), T.min((task % blocks) * BR + i, n - 1),
                                  (task // blocks) % heads * d + dd] * scale_c
            # 1. scores: KEYS keys x BR queries per tile; a key's channel is broadcast into the FMA
            for jo in range(mp // KEYS):
                acc = T.decl_buffer((KEYS, BR), "float32", scope="local")
                for jj in T.unroll(KEYS):
                    for i in T.vectorized(BR):
                        acc[jj, i] = T.float32(0)
                for dd in range(d):
                    for jj in T.unroll(KEYS):
                        for i in T.vectorized(BR):
                            acc[jj, i] = acc[jj, i] + k[task // (heads * blocks), T.min(jo * KEYS + jj, m - 1),
                                                        (task // blocks) % heads * d + dd] * qt[dd, i]
                for jj in T.unroll(KEYS):
                    for i in T.vectorized(BR):
                        st[jo * KEYS + jj, i] = acc[jj, i]
            for j in range(mp - m):  # padded keys (static count)
                for i in T.vectorized(BR):
                    st[m + j, i] = neg
            # 2. softmax down the key axis, BR queries per vector: no horizontal reductions
            for i in T.vectorized(BR):
                mx[i] = neg
                inv[i] = T.float32(0)
            for j in range(mp):
                for i in T.vectorized(BR):
                    mx[i] = T.max(mx[i], st[j, i])
            for j in range(mp):
                for i in T.vectorized(BR):
                    st[j, i] = fast_exp(st[j, i] - mx[i])
                    inv[i] = inv[i] + st[j, i]
            for i in T.vectorized(BR):
                inv[i] = T.float32(1) / inv[i]
            # 3. outᵀ = vᵀ p: dt head channels x BR queries per tile, the keys innermost
            for do in range(d // dt):
                acc2 = T.decl_buffer((dt, BR), "float32", scope="local")
                for r in T.unroll(dt):
                    for i in T.vectorized(BR):
                        acc2[r, i] = T.float32(0)
                for j in range(m):
                    for r in T.unroll(dt):
                        for i in T.vectorized(BR):
                            acc2[r, i] = acc2[r, i] + v[task // (heads * blocks), j,
                                                        (task // blocks) % heads * d + do * dt + r] * st[j, i]
                for r in T.unroll(dt):
                    for i in range(BR):
                        out[task // (heads * blocks), T.min((task % blocks) * BR + i, n - 1),
                            (task // blocks) % heads * d + do * dt + r] = acc2[r, i] * inv[i]

    return fused_attention
