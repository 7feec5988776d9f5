"""Schedules for the fused TIR functions of a Relax module (see `cpu` for the CPU rules)."""

from sdcore.schedule.cpu import Conv2d, Generic, Matmul, schedule_cpu

__all__ = ["Conv2d", "Generic", "Matmul", "schedule_cpu"]
