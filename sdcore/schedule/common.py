"""What the CPU schedule rules share: the vector width and register budget of a target, and the
block-inlining and loop helpers of every rule."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target import Target


def vector_lanes(target: Target) -> int:
    """float32 lanes of the target's vector registers: 16 with AVX-512, 8 with AVX/AVX2, else 4.

    From the target's CPU features; not TVM's llvm_get_vector_width, which answers 512 bits for
    every x86 CPU in TVM 0.27 (AVX2-only Zen 3 included), and with 16-lane tiles on AVX2 every
    micro-kernel spills."""
    from tvm.target.codegen import target_has_features

    try:
        if target_has_features("avx512f", target):
            return 16
        if target_has_features("avx", target):
            return 8
    except Exception:  # noqa: BLE001 - not an x86 target
        pass
    return 4


def accumulators(lanes: int) -> int:
    """Vector registers a micro-kernel may keep as accumulators: 24 of AVX-512's 32, 12 of AVX2's
    16 (the rest hold the loaded inputs and broadcast weights). Tiles sized for 32 registers spill
    on AVX2."""
    return 24 if lanes >= 16 else 12



def extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def index_vars(indices) -> list:
    """The variable of each index expression, or None where it is not a plain variable."""
    return [i if isinstance(i, tirx.Var) else None for i in indices]


def inline_producers(sch: s_tir.Schedule, keep) -> None:
    """compute_inline every injective block other than those in `keep` (reshapes, transposes, pads)."""
    changed = True
    while changed:
        changed = False
        for info in normalize_prim_func(sch) or []:
            if sch.get(info.block_rv).name_hint in keep or not info.is_injective():
                continue
            try:
                sch.compute_inline(info.block_rv)
                changed = True
                break
            except Exception:  # noqa: BLE001 - not inlinable (e.g. an output block): leave it
                continue


def inline_consumers(sch: s_tir.Schedule, block) -> None:
    """reverse_compute_inline the chain of elementwise consumers of `block` into it."""
    while True:
        consumers = sch.get_consumers(block)
        if len(consumers) != 1:
            return
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:  # noqa: BLE001 - e.g. a broadcast or reduction consumer: stop here
            return


def root_blocks(sch: s_tir.Schedule):
    try:
        return list(sch.get_child_blocks(sch.get_sblock("root")))
    except Exception:  # noqa: BLE001 - no root block: not a legalized operator
        return None


def is_spatial(block) -> bool:
    return all(it.iter_type == tirx.IterVar.DataPar for it in block.iter_vars)


def inline_spatial(sch: s_tir.Schedule, keep) -> None:
    """compute_inline, then reverse_compute_inline where that fails, every all-spatial block not
    in `keep`, without normalizing the function (its loop structure is left as it is)."""
    changed = True
    while changed:
        changed = False
        for block in root_blocks(sch) or []:
            stmt = sch.get(block)
            if stmt.name_hint in keep or not is_spatial(stmt):
                continue
            try:
                sch.compute_inline(block)
                changed = True
                break
            except Exception:  # noqa: BLE001 - an output block, or read by a reduction
                continue


def parallel_copy(sch: s_tir.Schedule, block) -> None:
    """A copy block (padding, layout change, cropping): parallel over all but its innermost loop,
    vectorized along that one."""
    loops = sch.get_loops(block)
    sch.parallel(sch.fuse(*loops[:-1]))
    sch.vectorize(loops[-1])


def pick(candidates, total: int, default: int) -> int:
    for c in candidates:
        if c <= total and total % c == 0:
            return c
    return default


def vectors(nr: int, vw: int, lanes: int) -> int:
    """Vector registers one row of an NR-column tile takes, at vector width `vw`."""
    return -(-nr // lanes) if vw == lanes else nr // vw

