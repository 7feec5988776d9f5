"""Kernel dispatch for a target (`dispatch`) and schedules for the fused TIR functions of a Relax
module (see `cpu` for how the CPU rules fit together)."""

from sdcore.schedule.common import vector_lanes
from sdcore.schedule.cpu import Conv2d, Generic, Matmul, schedule_cpu
from sdcore.schedule.dispatch import DispatchKernels
from sdcore.schedule.fastmath import FastExp

__all__ = ["Conv2d", "DispatchKernels", "FastExp", "Generic", "Matmul", "schedule_cpu", "vector_lanes"]
