"""Fused attention for the CPU: softmax(q kᵀ · scale) v without the N x M score matrix.

The unfused graph materializes scores [B, H, N, M] (at 64x64 latents, 2 x 8 x 4096 x 4096 floats:
1 GiB per self-attention), writes them, reads them for the softmax's max, again for its exp and sum,
and once more for p·v. Here every parallel task takes one (batch, head, block of BR = 32 queries)
and keeps its block's scores transposed, keys x queries (4096 x 32 floats = 512 KiB, in the per-core
L2), so the BR queries are the vector lanes throughout:

1. scores: register tiles of KEYS = 12 keys x 32 queries (AVX2: 6 x 16, see block_sizes); per head
   channel one vector load of the (scaled, transposed) queries and 12 key values broadcast into the
   FMAs. Keys past the last are padded up to a multiple of KEYS (their index clamped) and masked to
   -3e38. Each query's running max is kept as the tiles are written.
2. softmax down the key axis, per query lane: vector exp (fastmath's polynomial), vector sum; no
   horizontal reductions. The 1/sum is applied at the write-back.
3. outᵀ = vᵀ p: register tiles of up to 12 head channels x 32 queries, the keys innermost, in
   blocks of KEY_BLOCK = 128 keys (the block's v rows and p rows stay in the L1/L2 while every
   channel tile walks them; over all keys at once, every channel tile re-read v from beyond the
   L2), summed into a d x 32 buffer and written straight into the [B, N, H, D] layout, which the
   output projection reads as [B, N, H*D].

q and out are in the layout of Relax's attention op, [B, tokens, H, D] (the projections' [B,
tokens, H*D]); k and v come in per head, [B, H, M, D] (sdcore.schedule.dispatch permutes them, one
pass over each): read in place, a head's keys would be 160-byte pieces 1280 bytes apart over 5 MiB
(8 heads of 40 at 4096 tokens). Vector extents are kept at powers of two (16/32): a 40- or 48-lane
vector is far slower. Figures for both: docs/performance.md. A query block past the last row
recomputes the last row (identical values written twice). The function is written already
scheduled (parallel, vectorized, unrolled) and marked `tirx.is_scheduled`, so the schedule rules
leave it alone; it is fp32 and CPU-only (`T.parallel`). sdcore.schedule.dispatch uses it for every
float32 attention with static shapes: the UNet's and VAE's, and CLIP's causal self-attention (keys
after the query masked like the padding).
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from .fastmath import fast_exp

KEY_BLOCK = 128  # keys per block of p·v (see the kernel's step 3)


def block_sizes(lanes: int) -> tuple[int, int]:
    """(BR queries per task: two vectors, KEYS keys per register tile of the scores): 32 and 12 on
    AVX-512 (12 x 2 of its 32 registers accumulate), 16 and 6 on AVX2 (6 x 2 of 16). With AVX-512's
    sizes on AVX2 a tile was 48 accumulators in 16 registers, spilled."""
    return 2 * lanes, (12 if lanes >= 16 else 6)


def _tile(d: int, most: int) -> int:
    """Head channels per register tile of p·v: the largest divisor of d up to `most`."""
    return max(t for t in range(1, most + 1) if d % t == 0)


@functools.lru_cache(maxsize=None)
def attention_kernel(b: int, n: int, m: int, heads: int, d: int, scale: float, lanes: int = 16,
                     causal: bool = False, key_block: int = KEY_BLOCK) -> tirx.PrimFunc:
    """A PrimFunc (q [b, n, heads, d], k [b, heads, m, d], v [b, heads, m, d]) -> out [b, n, heads, d],
    tiled for `lanes` float32 lanes per vector register (16: AVX-512, 8: AVX2). `causal` (self-
    attention, n == m) masks the keys after each query, as the padded keys are masked."""
    if causal and n != m:
        raise ValueError(f"causal attention needs as many queries as keys, got {n} and {m}")
    BR, KEYS = block_sizes(lanes)  # noqa: N806 (constants of this kernel)
    mp = -(-m // KEYS) * KEYS
    kb = min(key_block, mp)  # keys per block of p·v
    mb = -(-mp // kb) * kb  # st's rows: whole key blocks (those past mp hold p = 0)
    blocks = -(-n // BR)
    tasks = b * heads * blocks
    dt = _tile(d, KEYS)
    neg = T.float32(-3.0e38)
    scale_c = T.float32(scale)

    @T.prim_func(private=True)
    def fused_attention(q: T.Buffer((b, n, heads, d), "float32"), k: T.Buffer((b, heads, m, d), "float32"),
                        v: T.Buffer((b, heads, m, d), "float32"), out: T.Buffer((b, n, heads, d), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for task in T.parallel(tasks):
            batch = T.meta_var(task // (heads * blocks))
            head = T.meta_var((task // blocks) % heads)
            row0 = T.meta_var((task % blocks) * BR)  # the block's first query
            qt = T.decl_buffer((d, BR), "float32")  # this block's queries, scaled and transposed
            st = T.decl_buffer((mb, BR), "float32")  # scores, then exp(scores - max), keys x queries
            ot = T.decl_buffer((d, BR), "float32")  # outᵀ, summed over the key blocks
            mx = T.decl_buffer((BR,), "float32")
            inv = T.decl_buffer((BR,), "float32")  # 1 / row sum
            for dd in range(d):
                for i in T.vectorized(BR):
                    qt[dd, i] = q[batch, T.min(row0 + i, n - 1), head, dd] * scale_c
            for i in T.vectorized(BR):
                mx[i] = neg
                inv[i] = T.float32(0)
            # 1. scores: KEYS keys x BR queries per tile; a key's channel is broadcast into the FMA
            for jo in range(mp // KEYS):
                acc = T.decl_buffer((KEYS, BR), "float32", scope="local")
                for jj in T.unroll(KEYS):
                    for i in T.vectorized(BR):
                        acc[jj, i] = T.float32(0)
                for dd in range(d):
                    for jj in T.unroll(KEYS):
                        for i in T.vectorized(BR):
                            acc[jj, i] = acc[jj, i] + k[batch, head, T.min(jo * KEYS + jj, m - 1), dd] * qt[dd, i]
                for jj in T.unroll(KEYS):
                    for i in T.vectorized(BR):
                        if causal:  # (decided when the kernel is built) keys after the query masked
                            st[jo * KEYS + jj, i] = T.if_then_else(
                                jo * KEYS + jj > T.min(row0 + i, n - 1), neg, acc[jj, i])
                        else:
                            st[jo * KEYS + jj, i] = acc[jj, i]
                        mx[i] = T.max(mx[i], st[jo * KEYS + jj, i])  # the row max as the scores come
            for j in range(mp - m):  # padded keys (static count)
                for i in T.vectorized(BR):
                    st[m + j, i] = neg
            # 2. softmax down the key axis, BR queries per vector: no horizontal reductions
            for j in range(mp):
                for i in T.vectorized(BR):
                    st[j, i] = fast_exp(st[j, i] - mx[i])
                    inv[i] = inv[i] + st[j, i]
            for i in T.vectorized(BR):
                inv[i] = T.float32(1) / inv[i]
            for j in range(mb - mp):  # rows of the last key block past the padded keys
                for i in T.vectorized(BR):
                    st[mp + j, i] = T.float32(0)
            # 3. outᵀ = vᵀ p: dt head channels x BR queries per tile, the keys innermost, in blocks
            # of kb keys (each block's v rows stay cached while the d / dt channel tiles walk them)
            for r in range(d):
                for i in T.vectorized(BR):
                    ot[r, i] = T.float32(0)
            for jb in range(mb // kb):
                for do in range(d // dt):
                    acc2 = T.decl_buffer((dt, BR), "float32", scope="local")
                    for r in T.unroll(dt):
                        for i in T.vectorized(BR):
                            acc2[r, i] = ot[do * dt + r, i]
                    for j in range(kb):
                        for r in T.unroll(dt):
                            for i in T.vectorized(BR):
                                acc2[r, i] = acc2[r, i] + (v[batch, head, T.min(jb * kb + j, m - 1), do * dt + r]
                                                           * st[jb * kb + j, i])
                    for r in T.unroll(dt):
                        for i in T.vectorized(BR):
                            ot[do * dt + r, i] = acc2[r, i]
            for r in range(d):
                for i in range(BR):
                    out[batch, T.min(row0 + i, n - 1), head, r] = ot[r, i] * inv[i]

    return fused_attention
