"""Schedules for the CUDA build: TVM's dlight GPU rules, tried in order for each fused kernel.

dlight's own `ApplyDefaultSchedule` stops at the first rule that raises, and leaves a kernel that
no rule takes without thread bindings (the build then fails far from the cause). Here a rule that
raises on a kernel (dlight's Matmul asserts on epilogues it cannot inline, such as a pad fused into
a conv, which is why Downsample2D pads inside its conv) is logged (logger "sdcore.schedule", debug
level: the kernels that got a later rule than the one meant for them, the first places to look for
GPU speed) and the next rule is tried; a kernel that
no rule schedules is an error naming it. Kernels that bind their own threads (TVM's GPU versions of
scatter, sort and the like, chosen at legalization) are left as they are.
"""

from __future__ import annotations

import logging

from tvm import tirx
from tvm.ir.transform import module_pass
from tvm.s_tir import dlight
from tvm.target import Target

from sdcore.errors import SdcoreError

logger = logging.getLogger("sdcore.schedule")


def gpu_rules() -> list:
    """dlight's GPU rules, most specific first (Fallback binds any spatial loop nest)."""
    return [dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(), dlight.gpu.GeneralReduction(),
            dlight.gpu.Fallback()]


def schedule_cuda():
    """The module pass: every unscheduled PrimFunc gets the first rule that applies without raising."""
    rules = gpu_rules()

    def transform(mod, _ctx):
        updated = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or int(func.attrs.get("tirx.is_scheduled", 0)) == 1:
                continue
            target = func.attrs.get("target") or Target.current(allow_none=False)
            if _binds_threads(func, target):
                continue
            updated[gvar] = _schedule(rules, gvar.name_hint, func, target)
        for gvar, func in updated.items():
            mod[gvar] = func
        return mod

    return module_pass(transform, opt_level=0, name="SdcoreScheduleCUDA")


def _binds_threads(func, target) -> bool:
    """True when every memory access is already inside GPU threads (TVM's verify_memory)."""
    return bool(tirx.analysis.verify_memory(func.with_attr("target", target)))


def _schedule(rules, name: str, func, target):
    for rule in rules:
        try:
            space = rule.apply(func, target, False)
        except Exception as err:  # noqa: BLE001 (dlight signals "not for this kernel" by asserting)
            text = str(err).strip()
            reason = text.splitlines()[-1] if text else type(err).__name__
            logger.debug("%s: dlight %s raised (%s); trying the next rule", name, type(rule).__name__, reason)
            continue
        if space is None:
            continue
        sch = space[0] if isinstance(space, list) else space
        return sch.mod["main"].with_attr("tirx.is_scheduled", True)
    raise SdcoreError(f"no GPU schedule rule applies to kernel {name!r}: sdcore cannot build it for cuda.")
