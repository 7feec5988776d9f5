"""The CPU rule for everything else (norms, softmax, elementwise): `Generic`. See
sdcore/schedule/cpu.py for how the rules fit together."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target import Target

from sdcore.schedule.common import (
    extent,
    inline_producers,
    vector_lanes,
)


def _rows_match(func) -> bool:
    """Whether every block's leading spatial loops are the last block's: dlight's Reduction rule
    computes every block at those loops, which for GroupNorm (statistics per group, output per
    channel) would redo a group's statistics once per channel."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos:
        return False

    def lead(info):
        kinds = info.dom_kind()
        n = len(kinds) - len(kinds.lstrip("S"))
        return [it.dom for it in info.iters[:n]]

    last = [int(d) if isinstance(d, (int, tirx.IntImm)) else None for d in lead(infos[-1])]
    for info in infos[:-1]:
        ext = [int(d) if isinstance(d, (int, tirx.IntImm)) else None for d in lead(info)]
        k = min(len(ext), len(last))
        if k == 0 or ext[:k] != last[:k]:
            return False
    return True


class Generic(dlight.ScheduleRule):
    """Everything else: parallel outer spatial loops, vectorized innermost spatial loop, per block.

    Row-wise reductions (softmax, LayerNorm) go to dlight's CPU `Reduction` rule first, which keeps
    each row's passes together in cache.
    """

    def __init__(self):
        self._reduction = dlight.cpu.Reduction()

    def apply(self, func, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = None
        if _rows_match(func):
            try:
                sch = self._reduction.apply(func, target, tunable)
            except Exception:  # noqa: BLE001 - the rule does not fit this function
                sch = None
        if sch is not None:
            return sch
        sch = s_tir.Schedule(func)
        lanes = vector_lanes(target)
        if normalize_prim_func(sch) is None:
            _parallel_outermost(sch)
            return sch
        inline_producers(sch, keep=set())
        for info in normalize_prim_func(sch) or []:
            _parallel_vectorize(sch, info, lanes)
        return sch


def _parallel_outermost(sch: s_tir.Schedule) -> None:
    root = sch.get_sblock("root") if _has_root(sch) else None
    blocks = sch.get_child_blocks(root) if root is not None else []
    for block in blocks:
        loops = sch.get_loops(block)
        if loops:
            try:
                sch.parallel(loops[0])
            except Exception:  # noqa: BLE001 - a reduction or opaque outer loop: stay serial
                pass


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


def _parallel_vectorize(sch: s_tir.Schedule, info, lanes: int) -> None:
    iters = info.iters
    if not iters:
        return
    loops = [it.loop_rv for it in iters]
    kinds = "".join(it.kind for it in iters)
    n_lead = len(kinds) - len(kinds.lstrip("S"))
    vec_loop = None
    if kinds[-1] == "S":
        ext = extent(sch, loops[-1])
        if ext is not None and ext >= 2:
            if ext % lanes == 0 and ext > lanes:
                outer, vec_loop = sch.split(loops[-1], [None, lanes])
                loops = loops[:-1] + [outer]
                if n_lead == len(kinds):
                    loops.append(vec_loop)
            elif ext <= 4 * lanes:
                vec_loop = loops[-1]
    # parallel: leading spatial loops, not the vectorized one
    par = [lp for lp in loops[:n_lead] if lp != vec_loop]
    if par:
        fused = sch.fuse(*par) if len(par) > 1 else par[0]
        sch.parallel(fused)
    if vec_loop is not None:
        sch.vectorize(vec_loop)

