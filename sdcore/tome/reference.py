"""Token merging (ToMe for SD) in NumPy: the readable twin of `sdcore/tome/merge.py`, used by the tests.

Bolya & Hoffman, "Token Merging for Fast Stable Diffusion" (2023); reference: tomesd 0.1.3,
`tomesd/merge.py::bipartite_soft_matching_random2d`. Same arguments as the Relax version, except that
arrays are NumPy and `rand_idx` is an array (or None for tomesd's no_rand).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def random_destination_indices(seed: int | Sequence[int], h: int, w: int, sx: int, sy: int) -> np.ndarray:
    """Each sx x sy window's destination position dy * sx + dx, int32 [h//sy, w//sx, 1].

    Drawn on the host from `Generator(PCG64(seed))`, so it is reproducible and independent of the
    sampler's noise (tomesd forks torch's global RNG instead). `seed` may be a tuple such as
    (seed, step, block) to give every block and step its own draw, as tomesd's generator does.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    return rng.integers(0, sx * sy, size=(h // sy, w // sx, 1), dtype=np.int64).astype(np.int32)


def partition(h: int, w: int, sx: int, sy: int,
              rand_idx: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(a_idx sources, b_idx destinations): token indices in raster order, as tomesd splits them.

    The border rows/columns that no whole window covers are all sources.
    """
    hsy, wsx = h // sy, w // sx
    if rand_idx is None:
        rand_idx = np.zeros((hsy, wsx, 1), np.int64)
    is_dst = np.zeros((h, w), bool)
    window = np.zeros((hsy, wsx, sy * sx), bool)  # [hsy, wsx, position in window]
    np.put_along_axis(window, rand_idx.astype(np.int64), True, axis=2)
    is_dst[: hsy * sy, : wsx * sx] = window.reshape(hsy, wsx, sy, sx).transpose(0, 2, 1, 3).reshape(
        hsy * sy, wsx * sx)  # [h', w'] with windows laid back on the grid
    flat = is_dst.reshape(-1)
    return np.flatnonzero(~flat), np.flatnonzero(flat)


def bipartite_soft_matching_random2d(
    metric: np.ndarray, w: int, h: int, sx: int, sy: int, r: int, rand_idx: np.ndarray | None = None
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """Match the tokens of `metric` [B, N, C] and return (merge, unmerge); see merge.py for the contract."""
    batch, n, _ = metric.shape
    a_idx, b_idx = partition(h, w, sx, sy, rand_idx)
    assert n == h * w and 0 < r <= len(a_idx), (n, h, w, r)

    metric = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
    scores = metric[:, a_idx] @ metric[:, b_idx].transpose(0, 2, 1)  # [B, Ns, Nd]
    node_max = scores.max(axis=-1)  # [B, Ns]
    node_idx = scores.argmax(axis=-1)  # [B, Ns]
    edge_idx = np.argsort(-node_max, axis=-1, kind="stable")  # [B, Ns], strongest link first
    src_idx, unm_idx = edge_idx[:, :r], edge_idx[:, r:]
    dst_idx = np.take_along_axis(node_idx, src_idx, axis=1)  # [B, r]
    rows = np.arange(batch)[:, None]

    def merge(x: np.ndarray) -> np.ndarray:
        src, dst = x[:, a_idx], x[:, b_idx].copy()  # [B, Ns, C], [B, Nd, C]
        unm = np.take_along_axis(src, unm_idx[..., None], axis=1)  # [B, Ns - r, C]
        merged = np.take_along_axis(src, src_idx[..., None], axis=1)  # [B, r, C]
        counts = np.ones(dst.shape[:2], x.dtype)  # each destination counts itself ("include_self")
        np.add.at(dst, (rows, dst_idx), merged)  # unbuffered: repeated destinations all add up
        np.add.at(counts, (rows, dst_idx), 1)
        return np.concatenate([unm, dst / counts[..., None]], axis=1)  # [B, N - r, C]

    def unmerge(x: np.ndarray) -> np.ndarray:
        n_unm = len(a_idx) - r
        unm, dst = x[:, :n_unm], x[:, n_unm:]
        out = np.zeros((batch, n, x.shape[2]), x.dtype)
        out[:, b_idx] = dst
        out[rows, a_idx[unm_idx]] = unm
        out[rows, a_idx[src_idx]] = np.take_along_axis(dst, dst_idx[..., None], axis=1)
        return out

    return merge, unmerge
