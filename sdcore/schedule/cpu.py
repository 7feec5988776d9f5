"""Hand-written CPU schedule rules, in the style of TVM's dlight rules, for the fused TIR functions.

TVM 0.27's `relax.build` for an llvm target legalizes and fuses the graph but schedules nothing:
every loop nest runs serial and unvectorized, as written by the legalizer (about 2 GFLOP/s). The
rules here run after FuseTIR and give each PrimFunc a schedule without any tuning:

- `Matmul`: C[..., i, j] = sum_k A[..., i, k] * B[..., k, j] (nn.Linear after its weight
  transpose, and both batched matmuls of attention). Register-blocked micro-kernel: an MR x NR
  accumulator tile kept in registers (a "local" write cache), vectorized over j (contiguous in B
  and C), unrolled over the MR rows, the k loop innermost around it; tiles run in parallel over
  the cores. Fused epilogues (bias, residual adds, GELU, scale) are inlined into the write-back,
  injective prologues (reshapes, transposes of the inputs) into the reads. A 2-D weight wider than
  one panel is copied per task into a contiguous K x NR panel (strided by N, its rows would alias
  in the caches and miss the TLB), and a task then runs up to 512 rows against it.
  On AVX2, 77 rows (text tokens) run as 78 zero-padded rows, for a wider tile.
- `Conv2d`: NCHW direct convolution with the same micro-kernel shape: an (output channels x output
  columns) tile in registers, vectorized along the output row, the (input channel, ky, kx)
  reduction innermost; the padding block is inlined into the reads and the epilogue into the
  write-back. On AVX2 the 3x3 reduction over rows of 32+ columns is blocked by 8 input channels.
- `Generic`: anything else (norms, softmax, elementwise): the dlight CPU reduction rule where it
  applies, else parallel outer spatial loops and a vectorized innermost loop per block.

Everything stays float32 and computes the same sums (only their order changes), so results agree
with the unscheduled build to rounding.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target import Target

def vector_lanes(target: Target) -> int:
    """float32 lanes of the target's vector registers: 16 with AVX-512, 8 with AVX/AVX2, else 4.

    From the target's CPU features; not TVM's llvm_get_vector_width, which answers 512 bits for
    every x86 CPU in TVM 0.27 (AVX2-only Zen 3 included): with 16-lane tiles on AVX2 every
    micro-kernel spilled, and SD1.5's UNet step at 512x512 took 2.35x PyTorch's time there."""
    from tvm.target.codegen import target_has_features

    try:
        if target_has_features("avx512f", target):
            return 16
        if target_has_features("avx", target):
            return 8
    except Exception:  # noqa: BLE001 - not an x86 target
        pass
    return 4


def _accumulators(lanes: int) -> int:
    """Vector registers a micro-kernel may keep as accumulators: 24 of AVX-512's 32, 12 of AVX2's
    16 (the rest hold the loaded inputs and broadcast weights). Tiles sized for 32 registers spill
    on AVX2."""
    return 24 if lanes >= 16 else 12


def _gemm_accumulators(lanes: int) -> int:
    """Accumulators of a GEMM tile: as _accumulators, but 10 on AVX2. 3 rows x 4 vectors (12,
    chosen wherever M is a multiple of 3: every SD2.1 768x768 shape, 9216 = 2^10 x 9 tokens) ran
    far slower than 2 x 5 vectors (10), with 4 B vectors and a broadcast beside 12 accumulators in
    16 registers: 1 thread, one process, 2x9216x320 -> 2560 697 -> 459 ms (PyTorch 478),
    2x2304x640 -> 5120 693 -> 457 (445), 2x576x1280 -> 10240 724 -> 569 (534), 2x77x768 -> 3072
    14.4 -> 13.3 (11.8)."""
    return 10 if lanes == 8 else _accumulators(lanes)


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _index_vars(indices) -> list:
    """The variable of each index expression, or None where it is not a plain variable."""
    return [i if isinstance(i, tirx.Var) else None for i in indices]


def _inline_producers(sch: s_tir.Schedule, keep) -> None:
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


def _inline_consumers(sch: s_tir.Schedule, block) -> None:
    """reverse_compute_inline the chain of elementwise consumers of `block` into it."""
    while True:
        consumers = sch.get_consumers(block)
        if len(consumers) != 1:
            return
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:  # noqa: BLE001 - e.g. a broadcast or reduction consumer: stop here
            return


def _root_blocks(sch: s_tir.Schedule):
    try:
        return list(sch.get_child_blocks(sch.get_sblock("root")))
    except Exception:  # noqa: BLE001 - no root block: not a legalized operator
        return None


def _is_spatial(block) -> bool:
    return all(it.iter_type == tirx.IterVar.DataPar for it in block.iter_vars)


def _inline_spatial(sch: s_tir.Schedule, keep) -> None:
    """compute_inline, then reverse_compute_inline where that fails, every all-spatial block not
    in `keep`, without normalizing the function (its loop structure is left as it is)."""
    changed = True
    while changed:
        changed = False
        for block in _root_blocks(sch) or []:
            stmt = sch.get(block)
            if stmt.name_hint in keep or not _is_spatial(stmt):
                continue
            try:
                sch.compute_inline(block)
                changed = True
                break
            except Exception:  # noqa: BLE001 - an output block, or read by a reduction
                continue


def _parallel_copy(sch: s_tir.Schedule, block) -> None:
    """A copy block (padding, layout change, cropping): parallel over all but its innermost loop,
    vectorized along that one."""
    loops = sch.get_loops(block)
    sch.parallel(sch.fuse(*loops[:-1]))
    sch.vectorize(loops[-1])


def _pick(candidates, total: int, default: int) -> int:
    for c in candidates:
        if c <= total and total % c == 0:
            return c
    return default


def _vectors(nr: int, vw: int, lanes: int) -> int:
    """Vector registers one row of an NR-column tile takes, at vector width `vw`."""
    return -(-nr // lanes) if vw == lanes else nr // vw


_PANEL_BYTES = 1536 * 1024  # a K x NR weight panel streamed once per row tile stays in the 2 MB L2


def matmul_tiles(m: int, n: int, lanes: int, k: int | None = None) -> tuple[int, int, int, int]:
    """(NR columns, vector width, MR rows, row tiles per parallel task) of the GEMM micro-kernel.

    NR is a few whole vectors and MR a divisor of M (a row tile never straddles two batch items,
    and no row needs a bounds check), chosen together so that as many as possible of ~24 of the 32
    vector registers accumulate (77 text tokens: 11 rows x 2 vectors rather than 1 x 4). A column
    count that is not a multiple of the vector width (attention's head size 40) uses narrower
    vectors rather than a ragged one, which LLVM splits badly. With the reduction length `k`, NR is
    kept so that a K x NR panel fits _PANEL_BYTES (K = 5120: 64 columns, not 80: 2x256x5120 @
    5120x1280 54.3 -> 47.5 ms, PyTorch 42.4; 1 thread).
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
        vecs = _vectors(nr, vw, lanes)
        mr_max = max(1, min(16, _gemm_accumulators(lanes) // vecs))
        mr = _pick(range(mr_max, 0, -1), m, 1)
        score = (mr * vecs, nr)
        if best is None or score > best[0]:
            best = (score, nr, vw, mr)
    _, nr, vw, mr = best
    tiles = -(-m // mr)
    mc_tiles = _pick(range(max(1, 96 // mr), 0, -1), tiles, 1)  # ~96 rows per parallel task
    return nr, vw, mr, mc_tiles


def _fma_per_load(nr: int, vw: int, mr: int, lanes: int) -> float:
    """FMAs per load (B vectors and A broadcasts) in one k step of an MR x NR micro-kernel."""
    vecs = _vectors(nr, vw, lanes)
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
        idx = _index_vars([r.min for r in region.region])
        if len(idx) == 2 and all(v is not None and v.same_as(w) for v, w in zip(idx, (k_var, j_var))):
            return index
    return None


WINOGRAD_U = "winograd_u"  # the block computing U in sdcore.schedule.winograd.gemm


class Matmul(dlight.ScheduleRule):
    """Register-blocked GEMM for the `NN` layout C[..., i, j] = sum_k A[..., i, k] B[..., k, j]."""

    def apply(self, func, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
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
        w = _index_vars([r.min for r in stmt.writes[0].region])
        if w[-2:] != [i_var, j_var]:
            return None
        a_idx = _index_vars([r.min for r in stmt.reads[0].region])
        b_idx = _index_vars([r.min for r in stmt.reads[1].region])
        if a_idx[-2:] != [i_var, k_var] or b_idx[-2:] != [k_var, j_var]:
            return None
        if any(not isinstance(it.dom.extent, tirx.IntImm) for it in stmt.iter_vars):
            return None
        m, n, k_len = (int(it.dom.extent) for it in stmt.iter_vars[-3:])

        name = stmt.name_hint
        # a Winograd GEMM computes its B (U = G g Gᵀ) per task from the weight (see below)
        winograd = any(sch.get(b).name_hint == WINOGRAD_U for b in sch.get_producers(main.block_rv))
        _inline_producers(sch, keep={name, WINOGRAD_U})
        lanes = vector_lanes(target)
        nr, vw, mr, mc_tiles = matmul_tiles(m, n, lanes, k_len)
        # A Linear whose rows have no good divisor (77 text tokens per prompt: on AVX2 the tile is 1
        # vector x 7 rows, 8 loads per 7 FMAs) runs on rows padded with zeros to a multiple of 3, 4
        # or 6 where that gives a tile with >= 1.25x the FMAs per load (78 rows: 3 vectors x 3
        # rows, 9 FMAs per 6 loads; 4 x 3 before _gemm_accumulators capped AVX2 at 10); a
        # separate copy drops the padded rows and takes the epilogue.
        # 2x77x3072 -> 768 (fc2 of the text encoder), 1 thread, Zen 3: 31.8 -> 14.3 ms (torch 9.9),
        # and 14.3 -> 12.7 (torch 10.4) in a second run from the shared panel copy below. AVX2
        # only: not measured with AVX-512's tiles.
        row_pad = _row_padding(m, n, lanes, k_len) if lanes == 8 and _weight_read(stmt) is not None else None
        if row_pad is not None:
            sch.pad_einsum(sch.get_sblock(name), [1] * (len(stmt.iter_vars) - 3) + [row_pad, 1, 1])
            m = -(-m // row_pad) * row_pad
            nr, vw, mr, mc_tiles = matmul_tiles(m, n, lanes, k_len)
            for padded_input in sch.get_producers(sch.get_sblock(name)):
                _parallel_copy(sch, padded_input)
        # A weight shared by every row (a Linear's [K, N] after the lifted transpose) is copied, per
        # parallel task, into a contiguous K x NR panel. Read in place, each k step of a column
        # panel is N floats (a page or more for N >= 1280) from the last: at N = 5120 or 10240 the
        # panel's rows alias to a few cache sets and miss the TLB, and wide GEMMs ran at ~20 GFLOP/s.
        weight = _weight_read(sch.get(sch.get_sblock(name)))
        pack = weight is not None and n > nr and not winograd
        block = sch.get_sblock(name)
        writeback = sch.cache_write(block, 0, "local")
        if row_pad is None:
            _inline_consumers(sch, writeback)
        else:  # (inlined into the write-back, the copy lost its row bound and wrote past the output)
            crop = sch.get_consumers(writeback)[0]
            _inline_consumers(sch, crop)
            _parallel_copy(sch, crop)

        loops = sch.get_loops(block)
        batch, i, j, k = loops[:-3], loops[-3], loops[-2], loops[-1]
        # Batch items stay separate loops, part of the parallel task index: fused into one
        # batch x M row loop, the row index needed a div/mod per A read, and 2x4096x320 @ 320x2560
        # ran at 53 GFLOP/s against 113 unfused (1 thread).
        rows = m
        if pack or winograd:
            mc_tiles = _packed_row_tiles(-(-rows // mr), mr, n // nr)
        i_o, i_t, i_r = sch.split(i, [None, mc_tiles, mr])
        j_o, j_v, j_l = sch.split(j, [None, nr // vw, vw])
        if (row_pad is not None and pack) or winograd:
            # batch items inside the task: one panel copy serves both prompts (10-15% on the text
            # encoder's Linears), where the copy is amortized over only 78 rows per item; and one
            # pass over a Winograd weight panel computes U for all 16 positions (below)
            sch.reorder(i_o, j_o, *batch, i_t, k, i_r, j_v, j_l)
            task = sch.fuse(i_o, j_o)
        else:
            sch.reorder(*batch, i_o, j_o, i_t, k, i_r, j_v, j_l)
            task = sch.fuse(*batch, i_o, j_o)
        sch.parallel(task)
        if pack:
            panel = sch.cache_read(block, weight, "global")
            sch.compute_at(panel, task, preserve_unit_loops=True)
            sch.vectorize(sch.get_loops(panel)[-1])
        if winograd:
            # The task's 16 x K x NR panel of U, computed where a Linear's weight panel is copied:
            # the NR output channels' weights ([NR, C, 3, 3], one contiguous range) are copied to
            # [C, 3, 3, NR], then per input channel the 9 taps give all 16 positions (9 FMAs each,
            # vectors along the panel's columns), so the weight is read once per task. Per position
            # instead, it was read 16 times from beyond the L2 (1280 -> 1280 at 16x16, 1 thread: 167
            # ms for the GEMM, ~50 of them U; 114 with U cut to one term).
            u_block = sch.get_sblock(WINOGRAD_U)
            w_read = next(i for i, r in enumerate(sch.get(u_block).reads) if len(r.region) == 4)
            w_panel = sch.cache_read(u_block, w_read, "global")
            sch.transform_layout(w_panel, ("write", 0), lambda k, c, r, s: (c, r, s, k))
            sch.compute_at(u_block, task, preserve_unit_loops=True)
            sch.compute_at(w_panel, task, preserve_unit_loops=True)
            # the copy in the panel's order, NR columns innermost: in the weight's order each store
            # went to another line of the panel (1.8 MB at 1280 channels), 18% of the GEMM's samples
            # (perf, 1280 -> 1280 at 16x16); now ~8%, the conv 147 -> 138 ms (640 at 32x32: 126.5
            # -> 119.8; 320 at 64x64 unchanged), 1 thread, one process
            p_j, p_c, p_r, p_s = sch.get_loops(w_panel)[-4:]
            sch.reorder(p_c, p_r, p_s, p_j)
            u_p, u_c, u_j = sch.get_loops(u_block)[-3:]
            sch.reorder(u_c, u_p, u_j)
            sch.vectorize(sch.split(u_j, [None, vw])[1])
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
        return sch


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
        _inline_producers(sch, keep=set())
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
        ext = _extent(sch, loops[-1])
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


_CONV_INPUT_BYTES = 512 * 1024  # input rows per conv task (image-major order): half the L2
_CONV_COPY_1X1_BYTES = 64 << 20  # 1x1 inputs up to this size are copied to [N, H, C, W] first
_RC_BLOCK = 8  # input channels per reduction block of an AVX2 3x3 conv (see Conv2d) ...
_RC_TILES = 2  # ... channel tiles (of 4) and
_RC_COLUMNS = 64  # ... output columns a task's strip has


class Conv2d(dlight.ScheduleRule):
    """NCHW direct convolution: (FR output channels x YR rows x XR columns) accumulators in registers.

    The padding block stays a separate, parallel copy (inlining it would put a bounds check on every
    input load of the inner loop), in the [N, H, C, W] layout; every other injective producer is
    inlined into the reads.
    """

    def apply(self, func, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        # No normalize_prim_func here: it drops unit loops (batch 1, 1x1 windows), and the loop
        # order (n, f, y, x, rc, ry, rx) of the legalized conv2d is what the tiling below expects.
        sch = s_tir.Schedule(func)
        blocks = _root_blocks(sch)
        if blocks is None:
            return None
        reductions = [b for b in blocks if not _is_spatial(sch.get(b))]
        if len(reductions) != 1:
            return None
        stmt = sch.get(reductions[0])
        kinds = "".join("S" if it.iter_type == tirx.IterVar.DataPar else "R" for it in stmt.iter_vars)
        if kinds != "SSSSRRR" or len(sch.get_loops(reductions[0])) != 7:
            return None
        if not stmt.name_hint.startswith("conv2d_nchw") or len(stmt.reads) != 2:
            return None
        if any(not isinstance(it.dom.extent, tirx.IntImm) for it in stmt.iter_vars):
            return None
        _, f, h, w = (int(it.dom.extent) for it in stmt.iter_vars[:4])
        window = [int(it.dom.extent) for it in stmt.iter_vars[5:]]
        lanes = vector_lanes(target)
        name = stmt.name_hint
        # a 1x1 window reads its input directly: the (zero-width) padding copy is inlined
        pad = stmt.reads[0].source.name if window != [1, 1] else None
        _inline_spatial(sch, keep={name, pad})
        block = sch.get_sblock(name)
        copy = None
        c_in = int(stmt.iter_vars[4].dom.extent)
        if pad is None and int(stmt.iter_vars[0].dom.extent) * c_in * h * w * 4 <= _CONV_COPY_1X1_BYTES:
            # a 1x1 window reads its input in NCHW, one row piece per channel 16 KB apart at 64x64:
            # copy it to [N, H, C, W] first, as the padding copy of a 3x3 is (UNet 640->320 at
            # 64x64: 26 -> 14 ms, torch 12; 2560->1280 at 16x16: 25 -> 15, torch 12; the copy
            # costs more than it saves on the VAE's 268 MB inputs)
            copy = sch.cache_read(block, 0, "global")
        writeback = sch.cache_write(block, 0, "local")
        _inline_consumers(sch, writeback)

        row_tile = window != [1, 1] and w % lanes == 0 and f % 4 == 0
        # AVX2 3x3 convs over rows of 32+ columns block their reduction by input channel (below)
        blocked = row_tile and lanes == 8 and w >= 32 and c_in % _RC_BLOCK == 0 and c_in > _RC_BLOCK
        if row_tile:
            # 3x3: one vector per output row, 4 rows x 4 channels (16 accumulators). Per input channel
            # and tap that is 4 input loads and 4 weight broadcasts for 16 FMAs, against 2 + 8 for
            # 2 vectors x 8 channels; measured 1 thread, vs that tiling: VAE 128->128 at 512x512
            # 112 -> 135 GFLOP/s, 512->512 at 128x128 139 -> 161, UNet 320->320 at 64x64 143 -> 164
            # On AVX2 (8 accumulators) 4 channels x 2 rows, not 2 x 4: each input vector loaded then
            # serves 4 channels, and a task re-reads the input once per 4 output channels, not 2.
            budget = 2 * _accumulators(lanes) // 3
            xr, yr = lanes, _pick([r for r in (4, 2, 1) if 4 * r <= budget], h, 1)
            vecs = yr
            fr = _pick([c for c in (8, 4, 2, 1) if c * vecs <= budget], f, 1)
        else:
            if w % (2 * lanes) == 0:
                xr = 2 * lanes
            elif w % lanes == 0 or w > 2 * lanes:
                xr = lanes
            else:
                xr = w
            yr = _pick([r for r in (4, 2, 1) if r * xr <= 2 * lanes], h, 1)
            vecs = yr * -(-xr // lanes)
            fr = _pick([c for c in (12, 8, 6, 5, 4, 3, 2, 1) if c * vecs <= _accumulators(lanes)], f, 1)
            if fr * vecs <= _accumulators(lanes) // 2 and xr == 2 * lanes and w % (4 * lanes) == 0:
                xr, vecs = 4 * lanes, 2 * vecs

        n_, f_, y_, x_, *red = sch.get_loops(block)
        rc = red[0]
        f_o, f_i = sch.split(f_, [None, fr])
        y_o, y_i = sch.split(y_, [None, yr])
        x_o, x_i = sch.split(x_, [None, xr])
        # Tasks walk rows inside channel blocks when the weights are the larger operand (deep, low
        # resolution layers) and channel blocks inside rows when the image is (a VAE decoder at
        # 512x512 would otherwise stream its whole input from memory once per channel block).
        image_major = c_in * h * w > f * c_in * window[0] * window[1]
        if blocked:
            # The reduction walks 8 input channels at a time (rc_o), and within each block every
            # tile of the task's strip (2 channel tiles x 64 columns): the block's input rows and
            # weights (8 channels x 4 rows x 66 columns + 8 x 8 x 9 weights: 11 KB) stay in the
            # 32 KB L1 while the tiles walk across them, and the strip's accumulators (8 x 2 x 64
            # floats, 4 KB) are loaded and stored once per 576 FMAs. Unblocked, a tile walked every
            # input channel (512 x 4 rows: ~150 KB) and its neighbour found none of it in the L1,
            # and a task's rows (540 KB at 512 channels x 64 columns) did not fit the Zen 3's 512 KB
            # L2 either. 1 thread, same process, min of 3, unblocked -> blocked (torch), Zen 3:
            # VAE 512->512 at 64x64 1057 -> 290 ms (227), at 128x128 1484 -> 1310 (1140), 128->128
            # at 512x512 1591 -> 1386 (1297), 256->256 at 256x256 1492 -> 1530 (1167); UNet, batch
            # 2: 320->320 at 64x64 223 -> 201 (180), 960->320 at 64x64 867 -> 614 (535), 1920->640
            # at 32x32 764 -> 571 (567). Unblocked times also swung 2-4x between processes (512 at
            # 64x64: 280-1100 ms), blocked ones ~10%. 4 channel tiles per strip instead of 2: VAE
            # 5% faster, UNet at 64x64 15% slower. At 16x16 and 8x8 (UNet, 1280 channels) blocking
            # measured 5-15% slower, so it starts at 32 columns. Not measured on AVX-512.
            rc_o, rc_i = sch.split(rc, [None, _RC_BLOCK])
            tiles = w // xr
            strip = _pick([t for t in range(tiles, 0, -1) if t * xr <= _RC_COLUMNS], tiles, 1)
            x_oo, x_o = sch.split(x_o, [None, strip])
            f_oo, f_b = sch.split(f_o, [None, _pick(range(_RC_TILES, 0, -1), f // fr, 1)])
            task = [n_, y_o, x_oo, f_oo] if image_major else [n_, f_oo, y_o, x_oo]
            sch.reorder(*task, rc_o, f_b, x_o, rc_i, *red[1:], y_i, f_i, x_i)
            task = sch.fuse(*task)
            sch.parallel(task)
            sch.reverse_compute_at(writeback, task, preserve_unit_loops=True)
            rc = rc_o
        elif image_major:
            # A task takes a chunk of the row whose input rows (all channels) fit ~512 KiB, and
            # consecutive tasks the next channel blocks of that chunk: with whole rows (256
            # channels x 3 rows x 514 columns = 1.6 MB at 512x512) the input fell out of the L2 between
            # tasks, and the VAE's 256->256 conv at 512x512 ran at 68 GFLOP/s (93-109 chunked).
            tiles = w // xr
            chunk = _pick([t for t in range(tiles, 0, -1)
                           if c_in * (window[0] + yr - 1) * (t * xr + window[1] - 1) * 4 <= _CONV_INPUT_BYTES], tiles, 1)
            x_oo, x_o = sch.split(x_o, [None, chunk])
            sch.reorder(n_, y_o, x_oo, f_o, x_o, *red, y_i, f_i, x_i)
            sch.parallel(sch.fuse(n_, y_o, x_oo, f_o))
        else:
            sch.reorder(n_, f_o, y_o, x_o, *red, y_i, f_i, x_i)
            sch.parallel(sch.fuse(n_, f_o, y_o))
        if not blocked:
            sch.reverse_compute_at(writeback, x_o, preserve_unit_loops=True)
        sch.unroll(y_i)
        sch.unroll(f_i)
        sch.vectorize(x_i)
        init = sch.decompose_reduction(block, rc)
        init_loops = sch.get_loops(init)
        sch.vectorize(init_loops[-1])
        sch.vectorize(sch.get_loops(writeback)[-1])
        if copy is not None:  # parallel over (n, row, channel), vectorized along the row
            sch.transform_layout(copy, ("write", 0), lambda n, c, y, x: (n, y, c, x))
            _parallel_copy(sch, copy)
        if pad is not None:  # the padding copy: parallel over (n, c, row), vectorized along the row
            # ... written as [N, H, C, W]: a task's input rows for every channel are then one
            # contiguous range, not C planes apart. In NCHW a 1920-channel 32x32 input is 9 MB, a
            # task touched a page per channel, and the conv ran at 81 GFLOP/s (153 in this layout).
            sch.transform_layout(sch.get_sblock(pad), ("write", 0), lambda n, c, y, x: (n, y, c, x))
            _parallel_copy(sch, sch.get_sblock(pad))
        return sch


def schedule_cpu():
    """The rules, in the order they are tried, for `dlight.ApplyDefaultSchedule`."""
    return dlight.ApplyDefaultSchedule(Matmul(), Conv2d(), Generic())
