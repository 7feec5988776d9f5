"""The CPU rule for direct NCHW convolutions: `Conv2d`. See sdcore/schedule/cpu.py for how the
rules fit together."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight
from tvm.target import Target

from sdcore.schedule.common import (
    accumulators,
    inline_consumers,
    inline_spatial,
    is_spatial,
    parallel_copy,
    pick,
    root_blocks,
    vector_lanes,
)

_CONV_INPUT_BYTES = 512 * 1024  # input rows per conv task (image-major order): half the L2
_CONV_COPY_1X1_BYTES = 64 << 20  # 1x1 inputs up to this size are copied to [N, H, C, W] first
_RC_BLOCK = 8  # input channels per reduction block of an AVX2 3x3 conv (see Conv2d) ...
_RC_TILES = 2  # ... channel tiles (of 4) and
_RC_COLUMNS = 64  # ... output columns a task's strip has


def _match_conv(sch: s_tir.Schedule):
    """The block of a legalized conv2d_nchw (loops n, f, y, x, rc, ry, rx; static extents), the
    only reduction of the function, else None."""
    blocks = root_blocks(sch)
    if blocks is None:
        return None
    reductions = [b for b in blocks if not is_spatial(sch.get(b))]
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
    return stmt


def _conv_shape(stmt) -> tuple[int, int, int, int, list[int]]:
    """(output channels, rows, columns, input channels, [window rows, window columns]) of a conv."""
    _, f, h, w = (int(it.dom.extent) for it in stmt.iter_vars[:4])
    c_in = int(stmt.iter_vars[4].dom.extent)
    window = [int(it.dom.extent) for it in stmt.iter_vars[5:]]
    return f, h, w, c_in, window


def _conv_tiles(f: int, h: int, w: int, lanes: int, row_tile: bool) -> tuple[int, int, int]:
    """(FR output channels, YR rows, XR columns) of the conv's register tile."""
    if row_tile:
        # 3x3: one vector per output row, 4 rows x 4 channels (16 accumulators). Per input channel
        # and tap that is 4 input loads and 4 weight broadcasts for 16 FMAs, against 2 + 8 for
        # 2 vectors x 8 channels (docs/performance.md has the comparison).
        # On AVX2 (8 accumulators) 4 channels x 2 rows, not 2 x 4: each input vector loaded then
        # serves 4 channels, and a task re-reads the input once per 4 output channels, not 2.
        budget = 2 * accumulators(lanes) // 3
        xr, yr = lanes, pick([r for r in (4, 2, 1) if 4 * r <= budget], h, 1)
        vecs = yr
        fr = pick([c for c in (8, 4, 2, 1) if c * vecs <= budget], f, 1)
    else:
        if w % (2 * lanes) == 0:
            xr = 2 * lanes
        elif w % lanes == 0 or w > 2 * lanes:
            xr = lanes
        else:
            xr = w
        yr = pick([r for r in (4, 2, 1) if r * xr <= 2 * lanes], h, 1)
        vecs = yr * -(-xr // lanes)
        fr = pick([c for c in (12, 8, 6, 5, 4, 3, 2, 1) if c * vecs <= accumulators(lanes)], f, 1)
        if fr * vecs <= accumulators(lanes) // 2 and xr == 2 * lanes and w % (4 * lanes) == 0:
            xr, vecs = 4 * lanes, 2 * vecs
    return fr, yr, xr


def _blocked_loops(sch: s_tir.Schedule, writeback, outer, red, inner, f_tiles: int, x_tiles: int, xr: int,
                   image_major: bool):
    """The task order of an AVX2 3x3 conv whose reduction is blocked by input channel -> rc_o."""
    n_, f_o, y_o, x_o = outer
    rc = red[0]
    # The reduction walks 8 input channels at a time (rc_o), and within each block every
    # tile of the task's strip (2 channel tiles x 64 columns): the block's input rows and
    # weights (8 channels x 4 rows x 66 columns + 8 x 8 x 9 weights: 11 KB) stay in the
    # 32 KB L1 while the tiles walk across them, and the strip's accumulators (8 x 2 x 64
    # floats, 4 KB) are loaded and stored once per 576 FMAs. Unblocked, a tile walked every
    # input channel (512 x 4 rows: ~150 KB) and its neighbour found none of it in the L1,
    # and a task's rows (540 KB at 512 channels x 64 columns) did not fit Zen 3's 512 KB L2
    # either. Below 32 columns blocking is slower; AVX-512 is not blocked (not measured).
    # The per-shape times are in docs/performance.md ("AVX2 3x3 convs blocked by channel").
    rc_o, rc_i = sch.split(rc, [None, _RC_BLOCK])
    tiles = x_tiles
    strip = pick([t for t in range(tiles, 0, -1) if t * xr <= _RC_COLUMNS], tiles, 1)
    x_oo, x_o = sch.split(x_o, [None, strip])
    f_oo, f_b = sch.split(f_o, [None, pick(range(_RC_TILES, 0, -1), f_tiles, 1)])
    task = [n_, y_o, x_oo, f_oo] if image_major else [n_, f_oo, y_o, x_oo]
    sch.reorder(*task, rc_o, f_b, x_o, rc_i, *red[1:], *inner)
    task = sch.fuse(*task)
    sch.parallel(task)
    sch.reverse_compute_at(writeback, task, preserve_unit_loops=True)
    return rc_o


def _image_major_loops(sch: s_tir.Schedule, writeback, outer, red, inner, c_in: int, window, yr: int,
                       xr: int, tiles: int) -> None:
    """The task order of a conv whose input is the larger operand: row chunks, then channel blocks."""
    n_, f_o, y_o, x_o = outer
    # A task takes a chunk of the row whose input rows (all channels) fit ~512 KiB, and
    # consecutive tasks the next channel blocks of that chunk: with whole rows (256
    # channels x 3 rows x 514 columns = 1.6 MB at 512x512) the input falls out of the L2
    # between tasks.
    rows_in = window[0] + yr - 1
    chunk = pick([t for t in range(tiles, 0, -1)
                  if c_in * rows_in * (t * xr + window[1] - 1) * 4 <= _CONV_INPUT_BYTES], tiles, 1)
    x_oo, x_o = sch.split(x_o, [None, chunk])
    sch.reorder(n_, y_o, x_oo, f_o, x_o, *red, *inner)
    sch.parallel(sch.fuse(n_, y_o, x_oo, f_o))
    sch.reverse_compute_at(writeback, x_o, preserve_unit_loops=True)


def _conv_loops(sch: s_tir.Schedule, block, writeback, stmt, tiles: tuple[int, int, int], blocked: bool):
    """Tile the conv's loops into parallel tasks around the FR x YR x XR register tile, the
    write-back at each task's tile (or strip) -> (the reduction loop to decompose at, y_i, f_i, x_i)."""
    fr, yr, xr = tiles
    f, h, w, c_in, window = _conv_shape(stmt)
    n_, f_, y_, x_, *red = sch.get_loops(block)
    rc = red[0]
    f_o, f_i = sch.split(f_, [None, fr])
    y_o, y_i = sch.split(y_, [None, yr])
    x_o, x_i = sch.split(x_, [None, xr])
    # Tasks walk rows inside channel blocks when the weights are the larger operand (deep, low
    # resolution layers) and channel blocks inside rows when the image is (a VAE decoder at
    # 512x512 would otherwise stream its whole input from memory once per channel block).
    image_major = c_in * h * w > f * c_in * window[0] * window[1]
    outer, inner = (n_, f_o, y_o, x_o), (y_i, f_i, x_i)
    if blocked:
        rc = _blocked_loops(sch, writeback, outer, red, inner, f // fr, w // xr, xr, image_major)
    elif image_major:
        _image_major_loops(sch, writeback, outer, red, inner, c_in, window, yr, xr, w // xr)
    else:
        sch.reorder(n_, f_o, y_o, x_o, *red, y_i, f_i, x_i)
        sch.parallel(sch.fuse(n_, f_o, y_o))
        sch.reverse_compute_at(writeback, x_o, preserve_unit_loops=True)
    return rc, y_i, f_i, x_i


def _register_tile(sch: s_tir.Schedule, block, writeback, rc, y_i, f_i, x_i) -> None:
    """The FR x YR x XR tile in registers: rows and channels unrolled, columns vectorized, in the
    update, the init (decomposed at `rc`) and the write-back."""
    sch.unroll(y_i)
    sch.unroll(f_i)
    sch.vectorize(x_i)
    init = sch.decompose_reduction(block, rc)
    init_loops = sch.get_loops(init)
    sch.vectorize(init_loops[-1])
    sch.vectorize(sch.get_loops(writeback)[-1])


def _input_copies(sch: s_tir.Schedule, copy, pad) -> None:
    """The input's copies to [N, H, C, W]: the 1x1 conv's `copy` and the 3x3 conv's padding `pad`."""
    if copy is not None:  # parallel over (n, row, channel), vectorized along the row
        sch.transform_layout(copy, ("write", 0), lambda n, c, y, x: (n, y, c, x))
        parallel_copy(sch, copy)
    if pad is not None:  # the padding copy: parallel over (n, c, row), vectorized along the row
        # ... written as [N, H, C, W]: a task's input rows for every channel are then one
        # contiguous range, not C planes apart (in NCHW a task touches a page per channel).
        sch.transform_layout(sch.get_sblock(pad), ("write", 0), lambda n, c, y, x: (n, y, c, x))
        parallel_copy(sch, sch.get_sblock(pad))


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
        stmt = _match_conv(sch)
        if stmt is None:
            return None
        f, h, w, c_in, window = _conv_shape(stmt)
        lanes = vector_lanes(target)
        name = stmt.name_hint
        # a 1x1 window reads its input directly: the (zero-width) padding copy is inlined
        pad = stmt.reads[0].source.name if window != [1, 1] else None
        inline_spatial(sch, keep={name, pad})
        block = sch.get_sblock(name)
        copy = None
        if pad is None and int(stmt.iter_vars[0].dom.extent) * c_in * h * w * 4 <= _CONV_COPY_1X1_BYTES:
            # a 1x1 window reads its input in NCHW, one row piece per channel 16 KB apart at 64x64:
            # copy it to [N, H, C, W] first, as the padding copy of a 3x3 is (up to
            # _CONV_COPY_1X1_BYTES: on the VAE's largest inputs the copy costs more than it saves)
            copy = sch.cache_read(block, 0, "global")
        writeback = sch.cache_write(block, 0, "local")
        inline_consumers(sch, writeback)

        row_tile = window != [1, 1] and w % lanes == 0 and f % 4 == 0
        # AVX2 3x3 convs over rows of 32+ columns block their reduction by input channel (below)
        blocked = row_tile and lanes == 8 and w >= 32 and c_in % _RC_BLOCK == 0 and c_in > _RC_BLOCK
        tiles = _conv_tiles(f, h, w, lanes, row_tile)
        rc, *tile_loops = _conv_loops(sch, block, writeback, stmt, tiles, blocked)
        _register_tile(sch, block, writeback, rc, *tile_loops)
        _input_copies(sch, copy, pad)
        return sch
