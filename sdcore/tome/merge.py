"""Bipartite soft matching with 2D strided destinations, as Relax ops (ToMe for Stable Diffusion).

Bolya & Hoffman, "Token Merging for Fast Stable Diffusion" (2023); reference: tomesd 0.1.3,
`tomesd/merge.py::bipartite_soft_matching_random2d`. `sdcore/tome/reference.py` is the same function
in NumPy, step by step; read it first.

The tokens of an h x w grid are split into destinations (one per sx x sy window, its top-left or a
host-chosen random position) and sources (all the rest, including the right/bottom border that no
whole window covers). Each source is linked to its most cosine-similar destination; the r sources
with the strongest links are averaged into their destinations ("mean, include self"). `merge` takes
[B, N, C] to [B, N - r, C] laid out as [unmerged sources (strongest link first) | destinations];
`unmerge` gives every token back the value of the merged token it ended up in.

Everything that depends on the data (the links, the order) is computed in the graph; shapes and r are
static. Indices are int32 throughout.
"""

from __future__ import annotations

from typing import Callable

from tvm import relax, te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from sdcore.errors import SdcoreError


def _dst_first_key(h: int, w: int, sx: int, sy: int, rand_idx: nn.Tensor | None) -> nn.Tensor:
    """[N] int32 sort key: token t is t if it is a destination, N + t if a source.

    tomesd argsorts a -1/0 mask with torch's unstable sort, so its order within each group is an
    artefact of that sort; the unique key gives raster order within each group from any sort.
    """
    n = h * w
    hsy, wsx = h // sy, w // sx

    def key(*args):
        def at(t):
            y, x = t // w, t % w
            inside = tirx.all(y < hsy * sy, x < wsx * sx)
            if args:
                # Clamp the window so the border's (never used) read stays in bounds.
                chosen = args[0][tirx.min(y // sy, hsy - 1), tirx.min(x // sx, wsx - 1), 0].astype("int32")
            else:
                chosen = tirx.const(0, "int32")
            is_dst = tirx.all(inside, (y % sy) * sx + x % sx == chosen)
            return tirx.if_then_else(is_dst, t, t + n)

        return te.compute((n,), at, name="tome_key")

    if rand_idx is None:
        return op.tensor_expr_op(lambda: key(), "tome_dst_key", [])
    return op.tensor_expr_op(key, "tome_dst_key", [rand_idx])


def _gather_rows(x: nn.Tensor, index: nn.Tensor, name: str) -> nn.Tensor:
    """out[b, k, :] = x[b, index[b, k], :]; x [B, M, C], index [B, K] -> [B, K, C]."""

    def gather(x, index):
        b, k = index.shape
        return te.compute((b, k, x.shape[2]), lambda i, j, c: x[i, index[i, j], c], name=name)

    return op.tensor_expr_op(gather, name, [x, index])


def _take(x: nn.Tensor, indices: nn.Tensor, axis: int) -> nn.Tensor:
    # The indices are in range by construction; "clip" instead of the default "fast" mode costs a
    # clamp per index and keeps TOPI from printing a warning per call into every compile log.
    return op.wrap_nested(relax.op.take(x._expr, indices._expr, axis=axis, mode="clip"), name="tome_take")


def _scatter(data: nn.Tensor, index: nn.Tensor, updates: nn.Tensor, reduction: str, name: str) -> nn.Tensor:
    # nn.op has no scatter; Relax's scatter_elements "mean" is a running pairwise average, not
    # torch's mean, so merging uses "add" and divides by the count itself.
    return op.wrap_nested(relax.op.scatter_elements(data._expr, index._expr, updates._expr, axis=1,
                                                    reduction=reduction), name=name)


def bipartite_soft_matching_random2d(
    metric: nn.Tensor, w: int, h: int, sx: int, sy: int, r: int, rand_idx: nn.Tensor | None = None
) -> tuple[Callable[[nn.Tensor], nn.Tensor], Callable[[nn.Tensor], nn.Tensor]]:
    """Match the tokens of `metric` [B, N, C] (N = h * w, raster order) and return (merge, unmerge).

    r: tokens to remove, 0 < r <= N - (h//sy) * (w//sx) (r == 0 is the plain graph: do not call this).
    rand_idx: int [h//sy, w//sx, 1], each window's destination position dy * sx + dx in [0, sx*sy)
    (`reference.random_destination_indices`); None picks every window's top-left token (tomesd's
    no_rand). merge: [B, N, C'] -> [B, N - r, C']; unmerge: [B, N - r, C'] -> [B, N, C'].
    """
    batch, n, _ = (int(s) for s in metric.shape)
    hsy, wsx = h // sy, w // sx
    num_dst = hsy * wsx
    num_src = n - num_dst
    if n != h * w:
        raise SdcoreError(f"ToMe: metric has {n} tokens but the grid is {h}x{w}.")
    if num_dst == 0:
        raise SdcoreError(f"ToMe: a {h}x{w} grid holds no whole {sx}x{sy} window.")
    if not 0 < r <= num_src:
        raise SdcoreError(f"ToMe: r={r} must be in 1..{num_src} for a {h}x{w} grid with a {sx}x{sy} stride.")
    if rand_idx is not None and tuple(int(s) for s in rand_idx.shape) != (hsy, wsx, 1):
        raise SdcoreError(f"ToMe: rand_idx has shape {tuple(rand_idx.shape)}, expected {(hsy, wsx, 1)}.")

    perm = op.argsort(_dst_first_key(h, w, sx, sy, rand_idx), axis=0, dtype="int32")  # [N]: dst | src
    b_idx, a_idx = op.split(perm, [num_dst], axis=0)  # [Nd], [Ns]

    # Cosine similarity of every source to every destination (no epsilon, as tomesd), in float32
    # whatever the activations' dtype: a float16 sum of squares of SD's hidden states overflows, and
    # torch accumulates both the norm and the matmul in float32 anyway.
    if metric.dtype != "float32":
        metric = metric.astype("float32")
    metric = metric / op.sqrt(op.sum(metric * metric, axis=-1, keepdims=True))
    a = _take(metric, a_idx, axis=1)  # [B, Ns, C]
    b = _take(metric, b_idx, axis=1)  # [B, Nd, C]
    scores = op.matmul(a, op.permute_dims(b, (0, 2, 1)))  # [B, Ns, Nd]

    node_max = op.max(scores, axis=-1)  # [B, Ns]
    node_idx = op.wrap_nested(relax.op.argmax(scores._expr, axis=-1), name="tome_node_idx").astype("int32")
    edge_idx = op.argsort(node_max, axis=-1, descending=True, dtype="int32")  # [B, Ns], strongest first
    # At the maximum ratio on a divisible grid every source merges: no zero-size unm tensors then.
    n_unm = num_src - r
    src_idx, unm_idx = op.split(edge_idx, [r], axis=1) if n_unm else (edge_idx, None)  # [B, r], [B, Ns - r]
    dst_idx = op.wrap_nested(relax.op.gather_elements(node_idx._expr, src_idx._expr, axis=1),
                             name="tome_dst_idx")  # [B, r]: destination (0..Nd-1) of each merged source
    unm_tok = _take(a_idx, unm_idx, axis=0) if n_unm else None  # [B, Ns - r]: tokens left unmerged
    src_tok = _take(a_idx, src_idx, axis=0)  # [B, r]: token index of each merged source

    # How many tokens each destination averages, itself included.
    counts = _scatter(op.ones((batch, num_dst), "int32"), dst_idx, op.ones((batch, r), "int32"), "add",
                      "tome_counts")  # [B, Nd]
    counts = op.reshape(counts, (batch, num_dst, 1))  # [B, Nd, 1]

    # Where each token lands in the merged sequence [unm (Ns - r) | dst (Nd)], so unmerge is a gather.
    pos_by_edge = dst_idx + n_unm  # [B, Ns], in edge_idx order
    if n_unm:
        pos_by_edge = op.concat([pos_by_edge, op.broadcast_to(
            op.reshape(op.arange(0, n_unm, dtype="int32"), (1, n_unm)), (batch, n_unm))], dim=1)  # [B, Ns]
    src_pos = _scatter(op.zeros((batch, num_src), "int32"), edge_idx, pos_by_edge, "update",
                       "tome_src_pos")  # [B, Ns], in a_idx order
    dst_pos = op.broadcast_to(op.reshape(op.arange(n_unm, n_unm + num_dst, dtype="int32"), (1, num_dst)),
                              (batch, num_dst))  # [B, Nd]
    # perm [N] -> [1, N] -> [B, N]
    token_pos = _scatter(op.zeros((batch, n), "int32"), op.broadcast_to(op.reshape(perm, (1, n)), (batch, n)),
                         op.concat([dst_pos, src_pos], dim=1), "update", "tome_token_pos")  # [B, N]

    expanded: dict[int, nn.Tensor] = {}

    def merge(x: nn.Tensor) -> nn.Tensor:
        c = int(x.shape[2])
        if c not in expanded:  # scatter_elements wants an index as large as its updates
            expanded[c] = op.broadcast_to(op.reshape(dst_idx, (batch, r, 1)), (batch, r, c))  # [B, r, C]
        src = _gather_rows(x, src_tok, "tome_gather_src")  # [B, r, C]
        dst = _take(x, b_idx, axis=1)  # [B, Nd, C]
        dst = _scatter(dst, expanded[c], src, "add", "tome_scatter_add") / counts.astype(x.dtype)  # mean
        if not n_unm:
            return dst  # [B, N - r, C]
        unm = _gather_rows(x, unm_tok, "tome_gather_unm")  # [B, Ns - r, C]
        return op.concat([unm, dst], dim=1)  # [B, N - r, C]

    def unmerge(x: nn.Tensor) -> nn.Tensor:
        return _gather_rows(x, token_pos, "tome_unmerge")  # [B, N, C]

    return merge, unmerge
