"""The Relax pipelines sdcore builds with: TVM's llvm and cuda pipelines with sdcore's schedule
rules in place of TVM's defaults, and the weight transforms lifted out of every function."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdcore.hashing import sha256_files


def lift_weight_transforms(ir_mod, target, schedule: bool, spec) -> tuple[Any, dict[str, str]]:
    """Move weight-only computations (the transposes of every nn.Linear weight) into
    `<function>_transform_params`, run once when the weights are bound. -> (module, function -> its
    transform). Not for `schedule=False`, the unchanged reference graph."""
    from tvm import relax

    if not schedule or target.kind.name not in ("llvm", "cuda"):
        return ir_mod, {}
    ir_mod = relax.transform.LiftTransformParams()(ir_mod)
    names = {gv.name_hint for gv in ir_mod.get_global_vars()}
    return ir_mod, {fn: fn + "_transform_params" for fn in spec if fn + "_transform_params" in names}


def scheduling_passes(target) -> list:
    """The llvm pipeline's first half: sdcore's kernel dispatch, TVM's library dispatch, sdcore's
    fast exp, legalization and fusion, then sdcore's schedule rules. tools/profile_kernels.py stops
    here to time each kernel."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from sdcore.schedule import DispatchKernels, FastExp, schedule_cpu

    return ([DispatchKernels(target)] + cpu.library_dispatch_passes(target) + [FastExp()]
            + cpu.legalize_passes(target) + [schedule_cpu()])


def relax_pipeline(target, schedule: bool = True):
    """The Relax pipeline for `target`: sdcore's kernel dispatch (sdcore/schedule/dispatch.py), then
    on llvm TVM's CPU pipeline with sdcore's schedule rules applied right after FuseTIR (TVM's own
    leaves every loop serial and unvectorized), on cuda TVM's CUDA pipeline with dlight's GPU rules
    applied kernel by kernel (sdcore/schedule/gpu.py)."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.backend.cuda import pipeline as cuda

    if not schedule or target.kind.name not in ("llvm", "cuda"):
        return "default"

    def passes():
        if target.kind.name == "llvm":
            return scheduling_passes(target) + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
        from sdcore.schedule import DispatchKernels
        from sdcore.schedule.gpu import schedule_cuda

        legalize = cuda.legalize_passes(target)
        # TVM's CUDA legalization ends with dlight.ApplyDefaultSchedule: sdcore's pass takes its place
        assert legalize[-1].info.name == "ApplyDefaultSchedule", legalize[-1].info.name
        return ([DispatchKernels(target)] + cuda.library_dispatch_passes(target) + legalize[:-1] + [schedule_cuda()]
                + cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target))

    @tvm.transform.module_pass(opt_level=0, name="SdcorePipeline")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes())(mod)

    return _pipeline


def pipeline_id(target, schedule: bool = True) -> str:
    """Names the pipeline in the cache key; the source of the schedule package and of this module is
    part of it, so editing a rule or a pass invalidates the libraries built with the old one."""
    if not schedule or target.kind.name not in ("llvm", "cuda"):
        return "default-v1"
    from sdcore import layers, schedule

    # (layers.py: the dispatch pass writes attention out as its graph)
    sources = sorted(Path(schedule.__file__).parent.glob("*.py")) + [Path(layers.__file__), Path(__file__)]
    return f"{target.kind.name}-schedule-lift-" + sha256_files(sources)[:16]
