"""Schedules for the fused TIR functions of a Relax module (see `cpu` for the CPU rules)."""

from sdcore.schedule.cpu import Conv2d, Generic, Matmul, schedule_cpu
from sdcore.schedule.fastmath import FastExp

__all__ = ["Conv2d", "FastExp", "Generic", "Matmul", "schedule_cpu"]
