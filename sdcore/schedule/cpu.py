"""Hand-written CPU schedule rules, in the style of TVM's dlight rules, for the fused TIR functions.

TVM 0.27's `relax.build` for an llvm target legalizes and fuses the graph but schedules nothing:
every loop nest runs serial and unvectorized, as written by the legalizer (about 2 GFLOP/s). The
rules (matmul.py, conv.py, generic.py; what they share in common.py) run after FuseTIR, in the
order `schedule_cpu` lists them, and give each PrimFunc a schedule without any tuning:

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

from tvm.s_tir import dlight

from sdcore.schedule.conv import Conv2d
from sdcore.schedule.generic import Generic
from sdcore.schedule.matmul import Matmul


def schedule_cpu():
    """The rules, in the order they are tried, for `dlight.ApplyDefaultSchedule`."""
    return dlight.ApplyDefaultSchedule(Matmul(), Conv2d(), Generic())
