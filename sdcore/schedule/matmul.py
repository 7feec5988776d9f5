"""The CPU rule for GEMMs: `Matmul` (nn.Linear after its weight transpose, both batched matmuls of
attention, the Winograd GEMM). See sdcore/schedule/cpu.py for how the rules fit together."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target import Target

from sdcore.schedule.common import (
    accumulators,
    index_vars,
    inline_consumers,
    inline_producers,
    parallel_copy,
    pick,
    vector_lanes,
    vectors,
)


def _gemm_accumulators(lanes: int) -> int:
    """Accumulators of a GEMM tile: as accumulators, but 10 on AVX2, where 12 accumulators leave
    too few of the 16 registers for the B vectors and the A broadcast (3 x 4 tiles spilled;
    docs/performance.md, "the AVX2 GEMM accumulator cap")."""
    return 10 if lanes == 8 else accumulators(lanes)


_PANEL_BYTES = 1536 * 1024  # a K x NR weight panel streamed once per row tile stays in the 2 MB L2


def matmul_tiles(m: int, n: int, lanes: int, k: int | None = None) -> tuple[int, int, int, int]:
    """(NR columns, vector width, MR rows, row tiles per parallel task) of the GEMM micro-kernel.

    NR is a few whole vectors and MR a divisor of M (a row tile never straddles two batch items,
    and no row needs a bounds check), chosen together so that as many as possible of ~24 of the 32
    vector registers accumulate (77 text tokens: 11 rows x 2 vectors rather than 1 x 4). A column
    count that is not a multiple of the vector width (attention's head size 40) uses narrower
    vectors rather than a ragged one, which LLVM splits badly. With the reduction length `k`, NR is
    kept so that a K x NR panel fits _PANEL_BYTES (K = 5120: 64 columns, not 80; figures in
    docs/performance.md).
    """
    if n <= 5 * lanes and n % lanes:
        options = [n]
    else:
        options = [c for c in (5 * lanes, 4 * lanes, 3 * lanes, 2 * lanes, lanes) if n % c == 0] or [4 * lanes]
        if k is not None:
            options = [c for c in options if k * c * 4 <= _PANEL_BYTES] or options[-1:]
    best = None
    for nr in options:
        vw = next(v for v in (lanes, lanes // 2, lanes // 4, 1) if nr % v == 0)
        vecs = vectors(nr, vw, lanes)
        mr_max = max(1, min(16, _gemm_accumulators(lanes) // vecs))
        mr = pick(range(mr_max, 0, -1), m, 1)
        score = (mr * vecs, nr)
        if best is None or score > best[0]:
            best = (score, nr, vw, mr)
    _, nr, vw, mr = best
    tiles = -(-m // mr)
    mc_tiles = pick(range(max(1, 96 // mr), 0, -1), tiles, 1)  # ~96 rows per parallel task
    return nr, vw, mr, mc_tiles


def _fma_per_load(nr: int, vw: int, mr: int, lanes: int) -> float:
    """FMAs per load (B vectors and A broadcasts) in one k step of an MR x NR micro-kernel."""
    vecs = vectors(nr, vw, lanes)
    return mr * vecs / (mr + vecs)


def _row_padding(m: int, n: int, lanes: int, k: int) -> int | None:
    """The multiple (6, 4 or 3) to pad a GEMM's M to when that gives the micro-kernel >= 1.25x
    the FMAs per load for <= 1/16 more rows, else None."""
    base = _fma_per_load(*matmul_tiles(m, n, lanes, k)[:3], lanes)
    best = None
    for multiple in (6, 4, 3):
        padded = -(-m // multiple) * multiple
        if padded == m or (padded - m) * 16 > m:
            continue
        gain = _fma_per_load(*matmul_tiles(padded, n, lanes, k)[:3], lanes)
        if gain >= 1.25 * base and (best is None or gain > best[0]):
            best = (gain, multiple)
    return None if best is None else best[1]


_MIN_TASKS = 16  # parallel tasks a packed GEMM keeps (fewer, larger ones amortize the copy)


def _packed_row_tiles(tiles: int, mr: int, panels: int) -> int:
    """Row tiles per parallel task when the weight panel is packed: up to ~512 rows, so that the
    copy (strided reads of K x NR floats) is amortized over many row tiles, while keeping at least
    _MIN_TASKS tasks (panels x row blocks) to balance the threads."""
    divisors = [c for c in range(max(1, 512 // mr), 0, -1) if tiles % c == 0]
    for c in divisors:
        if (tiles // c) * panels >= _MIN_TASKS:
            return c
    return divisors[-1]


def _weight_read(stmt) -> int | None:
    """The index of the read B[k, j] of a 2-D operand shared by every row (a Linear weight), if any."""
    j_var, k_var = (it.var for it in stmt.iter_vars[-2:])
    for index, region in enumerate(stmt.reads):
        idx = index_vars([r.min for r in region.region])
        if len(idx) == 2 and all(v is not None and v.same_as(w) for v, w in zip(idx, (k_var, j_var))):
            return index
    return None


WINOGRAD_U = "winograd_u"  # the block computing U in sdcore.schedule.winograd.gemm


def _match_gemm(sch: s_tir.Schedule):
    """The block of an `NN` GEMM C[..., i, j] = sum_k A[..., i, k] B[..., k, j] with static
    extents, the only reduction of the function (after normalize_prim_func), else None."""
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    reductions = [b for b in infos if not b.is_injective()]
    if len(reductions) != 1:
        return None
    main = reductions[0]
    kinds = main.dom_kind()
    if not (len(kinds) >= 3 and kinds.endswith("SSR") and kinds[:-1].count("R") == 0):
        return None
    stmt = sch.get(main.block_rv)
    if len(stmt.reads) != 2 or len(stmt.writes) != 1:
        return None
    iv = [it.var for it in stmt.iter_vars]
    i_var, j_var, k_var = iv[-3], iv[-2], iv[-1]
    w = index_vars([r.min for r in stmt.writes[0].region])
    if w[-2:] != [i_var, j_var]:
        return None
    a_idx = index_vars([r.min for r in stmt.reads[0].region])
    b_idx = index_vars([r.min for r in stmt.reads[1].region])
    if a_idx[-2:] != [i_var, k_var] or b_idx[-2:] != [k_var, j_var]:
        return None
    if any(not isinstance(it.dom.extent, tirx.IntImm) for it in stmt.iter_vars):
        return None
    return main.block_rv


def _pad_rows(sch: s_tir.Schedule, stmt, m: int, n: int, lanes: int, k_len: int) -> tuple[int | None, int]:
    """Pad the GEMM `stmt`'s rows where _row_padding says so -> (the multiple or None, the new M)."""
    name = stmt.name_hint
    # A Linear whose rows have no good divisor (77 text tokens per prompt: on AVX2 the tile is 1
    # vector x 7 rows, 8 loads per 7 FMAs) runs on rows padded with zeros to a multiple of 3, 4
    # or 6 where that gives a tile with >= 1.25x the FMAs per load (78 rows: 3 vectors x 3
    # rows, 9 FMAs per 6 loads); a separate copy drops the padded rows and takes the epilogue.
    # AVX2 only: AVX-512's tiles have not been measured with it (docs/performance.md).
    row_pad = _row_padding(m, n, lanes, k_len) if lanes == 8 and _weight_read(stmt) is not None else None
    if row_pad is not None:
        sch.pad_einsum(sch.get_sblock(name), [1] * (len(stmt.iter_vars) - 3) + [row_pad, 1, 1])
        m = -(-m // row_pad) * row_pad
        for padded_input in sch.get_producers(sch.get_sblock(name)):
            parallel_copy(sch, padded_input)
    return row_pad, m


def _write_back(sch: s_tir.Schedule, block, row_pad: int | None):
    """The tile's local accumulator block, its write-back taking the epilogue (or, with padded
    rows, a parallel copy that crops them taking it)."""
    writeback = sch.cache_write(block, 0, "local")
    if row_pad is None:
        inline_consumers(sch, writeback)
    else:  # (inlined into the write-back, the copy lost its row bound and wrote past the output)
        crop = sch.get_consumers(writeback)[0]
        inline_consumers(sch, crop)
        parallel_copy(sch, crop)
    return writeback


def _gemm_loops(sch: s_tir.Schedule, block, m: int, n: int, tiles: tuple[int, int, int, int],
                panel: bool, batch_inside: bool):
    """Split and order the GEMM's loops: parallel tasks of row tiles x NR columns around the MR x
    NR micro-kernel. `panel`: a weight panel is copied or computed per task (larger tasks);
    `batch_inside`: batch items are walked inside the task. -> (task, i_t, k, i_r, j_v, j_l)."""
    nr, vw, mr, mc_tiles = tiles
    loops = sch.get_loops(block)
    batch, i, j, k = loops[:-3], loops[-3], loops[-2], loops[-1]
    # Batch items stay separate loops, part of the parallel task index: fused into one
    # batch x M row loop, the row index needs a div/mod per A read (half the speed).
    rows = m
    if panel:
        mc_tiles = _packed_row_tiles(-(-rows // mr), mr, n // nr)
    i_o, i_t, i_r = sch.split(i, [None, mc_tiles, mr])
    j_o, j_v, j_l = sch.split(j, [None, nr // vw, vw])
    if batch_inside:
        # batch items inside the task: one panel copy serves both prompts, where the copy is
        # amortized over only 78 rows per item (the text encoder's Linears); and one
        # pass over a Winograd weight panel computes U for all 16 positions (below)
        sch.reorder(i_o, j_o, *batch, i_t, k, i_r, j_v, j_l)
        task = sch.fuse(i_o, j_o)
    else:
        sch.reorder(*batch, i_o, j_o, i_t, k, i_r, j_v, j_l)
        task = sch.fuse(*batch, i_o, j_o)
    sch.parallel(task)
    return task, i_t, k, i_r, j_v, j_l


def _pack_weight(sch: s_tir.Schedule, block, weight: int, task) -> None:
    """Copy the task's K x NR panel of the weight (read `weight` of `block`), vectorized."""
    panel = sch.cache_read(block, weight, "global")
    sch.compute_at(panel, task, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(panel)[-1])


def _winograd_panel(sch: s_tir.Schedule, task, vw: int) -> None:
    """Compute the task's panel of the Winograd U from a copy of its weights."""
    # The task's 16 x K x NR panel of U, computed where a Linear's weight panel is copied:
    # the NR output channels' weights ([NR, C, 3, 3], one contiguous range) are copied to
    # [C, 3, 3, NR], then per input channel the 9 taps give all 16 positions (9 FMAs each,
    # vectors along the panel's columns), so the weight is read once per task, not once per
    # position from beyond the L2.
    u_block = sch.get_sblock(WINOGRAD_U)
    w_read = next(i for i, r in enumerate(sch.get(u_block).reads) if len(r.region) == 4)
    w_panel = sch.cache_read(u_block, w_read, "global")
    sch.transform_layout(w_panel, ("write", 0), lambda k, c, r, s: (c, r, s, k))
    sch.compute_at(u_block, task, preserve_unit_loops=True)
    sch.compute_at(w_panel, task, preserve_unit_loops=True)
    # the copy in the panel's order, NR columns innermost: in the weight's order each store
    # goes to another line of the panel (1.8 MB at 1280 channels)
    p_j, p_c, p_r, p_s = sch.get_loops(w_panel)[-4:]
    sch.reorder(p_c, p_r, p_s, p_j)
    u_p, u_c, u_j = sch.get_loops(u_block)[-3:]
    sch.reorder(u_c, u_p, u_j)
    sch.vectorize(sch.split(u_j, [None, vw])[1])


def _micro_kernel(sch: s_tir.Schedule, block, writeback, i_t, k, i_r, j_v, j_l) -> None:
    """The MR x NR tile in registers: the write-back per row tile, the tile's rows and vectors
    unrolled and its columns vectorized, in the update, the init and the write-back."""
    sch.reverse_compute_at(writeback, i_t, preserve_unit_loops=True)
    sch.unroll(i_r)
    sch.unroll(j_v)
    sch.vectorize(j_l)
    init = sch.decompose_reduction(block, k)
    init_loops = sch.get_loops(init)
    sch.unroll(init_loops[-3])
    sch.unroll(init_loops[-2])
    sch.vectorize(init_loops[-1])
    wb_loops = sch.get_loops(writeback)
    sch.vectorize(wb_loops[-1])


class Matmul(dlight.ScheduleRule):
    """Register-blocked GEMM for the `NN` layout C[..., i, j] = sum_k A[..., i, k] B[..., k, j]."""

    def apply(self, func, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        main = _match_gemm(sch)
        if main is None:
            return None
        stmt = sch.get(main)
        m, n, k_len = (int(it.dom.extent) for it in stmt.iter_vars[-3:])

        name = stmt.name_hint
        # a Winograd GEMM computes its B (U = G g Gᵀ) per task from the weight (see below)
        winograd = any(sch.get(b).name_hint == WINOGRAD_U for b in sch.get_producers(main))
        inline_producers(sch, keep={name, WINOGRAD_U})
        lanes = vector_lanes(target)
        row_pad, m = _pad_rows(sch, stmt, m, n, lanes, k_len)
        nr, vw, mr, mc_tiles = matmul_tiles(m, n, lanes, k_len)
        # A weight shared by every row (a Linear's [K, N] after the lifted transpose) is copied, per
        # parallel task, into a contiguous K x NR panel. Read in place, each k step of a column
        # panel is N floats (a page or more for N >= 1280) from the last: at N = 5120 or 10240 the
        # panel's rows alias to a few cache sets and miss the TLB.
        weight = _weight_read(sch.get(sch.get_sblock(name)))
        pack = weight is not None and n > nr and not winograd
        block = sch.get_sblock(name)
        writeback = _write_back(sch, block, row_pad)

        task, *micro_loops = _gemm_loops(sch, block, m, n, (nr, vw, mr, mc_tiles), panel=pack or winograd,
                                         batch_inside=(row_pad is not None and pack) or winograd)
        if pack:
            _pack_weight(sch, block, weight, task)
        if winograd:
            _winograd_panel(sch, task, vw)
        _micro_kernel(sch, block, writeback, *micro_loops)
        return sch
