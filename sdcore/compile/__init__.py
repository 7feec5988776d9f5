"""Compile `tvm.relax.frontend.nn` modules for a target, with an on-disk cache of the built libraries.

Parameters are never baked into the library: they are inputs of every exported function, bound at
run time (`CompiledModel.set_params`). Where things are:
- targets.py: `make_target` (the names users type) and the CUDA compiler check;
- passes.py: the Relax pipelines (sdcore's schedule rules inside TVM's llvm and cuda pipelines);
- cache.py: the cache of built libraries (key, atomic writes, corrupt entries rebuilt);
- runtime.py: the thread pool, the VM's pooled memory, and `CompiledModel`.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

import sdcore
from sdcore.compile import cache
from sdcore.compile.passes import lift_weight_transforms, pipeline_id, relax_pipeline, scheduling_passes
from sdcore.compile.runtime import CompiledModel, device_for, release_pooled_memory, set_threads, trim_heap
from sdcore.compile.targets import check_cuda_compiler, make_target

__all__ = ["CompiledModel", "build", "device_for", "export", "lift_weight_transforms", "make_target",
           "pipeline_id", "relax_pipeline", "release_pooled_memory", "scheduling_passes", "set_threads",
           "trim_heap"]

logger = logging.getLogger("sdcore.compile")


def build(
    module,
    spec: dict[str, dict[str, Any]],
    *,
    name: str,
    target="llvm",
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    debug: bool = False,
    schedule: bool = True,
) -> CompiledModel:
    """Export `module` with `spec`, build it for `target` (cached on disk) and return a CompiledModel.

    `name` only labels the log line and the cache file; the key is the exported code itself.
    `debug=True` passes `debug=True` to export_tvm (effects, intermediate outputs are the caller's).
    `schedule=False` builds with TVM's default pipeline (unscheduled loops), the reference the
    schedule tests compare against.
    """
    import tvm
    from tvm import relax

    if isinstance(target, str):
        target = make_target(target)

    ir_mod, named_params = export(module, spec, debug=debug)
    lib_path, meta_path = cache.entry(cache_dir, name, {
        "ir": ir_mod.script(show_meta=True),
        "target": str(target),
        "tvm": tvm.__version__,
        "sdcore": sdcore.__version__,
        "pipeline": pipeline_id(target, schedule),
    })
    lib = cache.load(lib_path, meta_path) if use_cache else None
    if lib is not None:
        logger.info("loaded %s from cache (%s)", name, lib_path.name)

    ir_mod, transforms = lift_weight_transforms(ir_mod, target, schedule, spec)
    if lib is None:
        if target.kind.name == "cuda":
            check_cuda_compiler()
        start = time.perf_counter()
        executable = relax.build(ir_mod, target=target, relax_pipeline=relax_pipeline(target, schedule))
        # TVMScript's parser (run by the dispatch pass for the hand-written kernels) keeps
        # inspect.stack() records in reference cycles, and they hold every caller's frame: until
        # Python's cycle collector happens to run, a caller's locals (the pipeline's loaded weights,
        # a parity test's torch model) stay alive
        gc.collect()
        seconds = time.perf_counter() - start
        logger.info("compiled %s for %s in %.1f s", name, target.kind.name, seconds)
        if use_cache:
            cache.store(executable, lib_path, meta_path, {"name": name, "compile_seconds": seconds})
            lib = tvm.runtime.load_module(str(lib_path))
        else:
            lib = executable
    device = device_for(target)
    vm = relax.VirtualMachine(lib, device)
    input_dtypes = {fn: [getattr(arg, "dtype", None) for arg in args.values()] for fn, args in spec.items()}
    return CompiledModel(vm, device, [n for n, _ in named_params],
                         [tuple(int(s) for s in p.shape) for _, p in named_params],
                         [p.dtype for _, p in named_params], transforms, functions=list(spec),
                         input_dtypes=input_dtypes)


def export(module, spec: dict[str, dict[str, Any]], *, debug: bool = False):
    """`module.export_tvm(spec)` -> (IRModule, named parameters): the network's plain graph, the
    same for every target (the pipeline's dispatch pass picks the kernels, sdcore/schedule/dispatch.py)."""
    return module.export_tvm(spec=spec, debug=debug)

