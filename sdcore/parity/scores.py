"""Scores of one tensor against its reference (max abs, max relative, PSNR) and the thresholds that
judge them, kept in TOLERANCES only."""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

# One place for every threshold. fp32: the reference and sdcore run the same math in a different
# order (blocked reductions, fused kernels), which moves results by ~1e-6 relative; 1e-4 of the
# reference's scale and 60 dB PSNR leave room for that while catching any real mistake (a wrong
# scale, transpose or epsilon is off by >1e-2).
TOLERANCES = {
    "float32": {"max_rel": 1e-4, "min_psnr": 60.0},
    "float16": {"max_rel": 2e-2, "min_psnr": 35.0},
    "bfloat16": {"max_rel": 5e-2, "min_psnr": 30.0},
}


@dataclasses.dataclass
class LayerDiff:
    name: str
    shape: tuple
    max_abs: float
    max_rel: float  # max |ours - ref| / max |ref|
    psnr: float  # 20 log10(max |ref| / rms error), in dB
    ok: bool


def compare(name: str, ours: np.ndarray, ref: np.ndarray, dtype: str = "float32") -> LayerDiff:
    """Score `ours` against `ref`; `ok` applies TOLERANCES[dtype]."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return LayerDiff(name, tuple(ref.shape), math.inf, math.inf, -math.inf, False)
    err = np.abs(ours - ref)
    max_abs = float(err.max()) if err.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    rms = float(np.sqrt(np.mean(err**2))) if err.size else 0.0
    psnr = math.inf if rms == 0 else (20 * math.log10(scale / rms) if scale > 0 else -math.inf)
    tol = TOLERANCES[dtype]
    ok = bool(np.isfinite(ours).all()) and max_rel <= tol["max_rel"] and psnr >= tol["min_psnr"]
    return LayerDiff(name, tuple(ref.shape), max_abs, max_rel, psnr, ok)


def format_table(rows: Sequence[LayerDiff], title: str = "") -> str:
    """A Markdown table, one row per layer."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| layer | shape | max abs | max rel | PSNR dB | ok |", "|---|---|---|---|---|---|"]
    for r in rows:
        psnr = "inf" if math.isinf(r.psnr) and r.psnr > 0 else f"{r.psnr:.1f}"
        shape = "×".join(str(s) for s in r.shape)
        lines.append(f"| {r.name} | {shape} | {r.max_abs:.2e} | {r.max_rel:.2e} | {psnr} | {'yes' if r.ok else 'NO'} |")
    return "\n".join(lines)
