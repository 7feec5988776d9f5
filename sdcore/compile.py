"""Compile `tvm.relax.frontend.nn` modules for a target, with an on-disk cache of the built libraries.

Parameters are never baked into the library: they are inputs of every exported function, bound at
run time (`CompiledModel.set_params`). The cache key is the SHA-256 of everything that changes the
generated code: the exported Relax module's text (it already contains the config and the shapes),
the target, the build options, and the TVM and sdcore versions. Writes are atomic (temporary file,
then rename) and each entry records the library's own SHA-256, so a truncated or corrupt entry is
detected, deleted and rebuilt instead of crashing the run.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import sdcore
from sdcore.errors import SdcoreError, UsageError

logger = logging.getLogger("sdcore.compile")


def default_cache_dir() -> Path:
    """`$SDCORE_CACHE`, else `$XDG_CACHE_HOME/sdcore`, else `~/.cache/sdcore`."""
    if os.environ.get("SDCORE_CACHE"):
        return Path(os.environ["SDCORE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdcore"


def make_target(name: str = "llvm", arch: str | None = None):
    """A TVM target for `name`: "llvm" (the host CPU, detected), "cuda", or "auto" (cuda when a GPU
    is visible, else llvm). `arch` ("sm_90") builds for a GPU this machine does not have: the
    library can be built and checked here (tests/test_cuda_build.py), but run only where one is."""
    import tvm
    from tvm.target import Target

    if name == "auto":
        name = "cuda" if tvm.cuda(0).exist else "llvm"
    if name == "llvm":
        from tvm.target import codegen

        cpu = codegen.llvm_get_system_cpu()
        return Target({"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1})
    if name == "cuda":
        if arch is None:
            if not tvm.cuda(0).exist:
                raise SdcoreError("target 'cuda' asked for, but no CUDA GPU is visible to TVM.")
            arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
        return Target({"kind": "cuda", "arch": arch})
    raise UsageError(f"unknown target {name!r}: use 'llvm', 'cuda' or 'auto'.")


def device_for(target):
    import tvm

    return tvm.cuda(0) if target.kind.name == "cuda" else tvm.cpu(0)


def set_threads(threads: int | None = None) -> int:
    """The number of CPU threads TVM's thread pool will start with, set before it starts.

    `threads`, else TVM_NUM_THREADS where the user set it, else every CPU this process may run on.
    TVM's own default is half the CPUs (it assumes every pair is one hyper-threaded core): 1 thread
    on this project's 2-core machine, where PyTorch uses 2 and a UNet step takes 12.6 s instead of
    6.8 s. The pool reads the setting once, at its first parallel call: later calls do not resize it.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise UsageError(f"threads must be a positive integer, got {threads!r}.")
        os.environ["TVM_NUM_THREADS"] = str(threads)
    elif not os.environ.get("TVM_NUM_THREADS", "").strip():
        os.environ["TVM_NUM_THREADS"] = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                            else (os.cpu_count() or 1))
    value = os.environ["TVM_NUM_THREADS"].strip()
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"TVM_NUM_THREADS={value!r} is not a positive integer.")
    return int(value)


def release_pooled_memory() -> None:
    """Give back the memory the Relax VM's pooled allocator keeps for reuse (every device).

    A compiled function's activations go back to that pool when it returns, so the next call of
    the same network finds them; the pipeline calls this between stages (text encoder, UNet, VAE),
    whose activations differ in size and would otherwise all stay allocated. Blocks in use are
    untouched.
    """
    import tvm_ffi

    tvm_ffi.get_global_func("vm.builtin.memory_manager.clear")()
    trim_heap()


def trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim; nothing elsewhere).

    Weight tensors and activations are malloc'd. glibc serves blocks under its mmap threshold from
    the heap, and that threshold rises to 32 MB once a larger block is freed, so after the weights
    are bound (each read, copied and, for a Linear, transposed) hundreds of MB of freed blocks stay
    resident: 534 MiB after binding SD1.5's UNet, measured. The pipeline calls this after binding
    weights and between stages.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl has none
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()


class CompiledModel:
    """A built Relax VM plus the parameters it takes, in export order.

    Calling `model.forward(*inputs)` (or any exported function name) passes the inputs followed by
    the parameters and returns NumPy arrays (a tuple when the function returns several outputs).
    """

    def __init__(self, vm, device, param_names: Sequence[str], param_shapes: Sequence[tuple], param_dtypes,
                 transforms: dict[str, str] | None = None, functions: Sequence[str] = (),
                 input_dtypes: dict[str, list] | None = None):
        self.vm = vm
        self.device = device
        self.param_names = list(param_names)
        self.param_shapes = [tuple(s) for s in param_shapes]
        self.param_dtypes = list(param_dtypes)
        # exported function -> its lifted weight transform (`<function>_transform_params`), which
        # set_params runs once: the function itself takes the prepared weights
        self.transforms = dict(transforms or {})
        self.functions = list(functions)
        # exported function -> each input's dtype: NumPy inputs are converted to it (a float16
        # UNet takes the sampler's float64 latents)
        self.input_dtypes = dict(input_dtypes or {})
        self._params: list | None = None
        self._prepared: dict[str, list] = {}

    @property
    def has_params(self) -> bool:
        return self._params is not None

    def set_params(self, params: dict) -> None:
        """Bind weights by name. Strict: every parameter present with its exact shape, nothing extra.

        Values are NumPy arrays (copied to the device) or device tensors (shared, not copied), so
        several compiled shapes of one network can share one copy of its weights.
        """
        import tvm

        missing = [n for n in self.param_names if n not in params]
        extra = sorted(set(params) - set(self.param_names))
        if missing or extra:
            raise SdcoreError(
                f"weights do not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}."
            )
        bound = []
        for name, shape, dtype in zip(self.param_names, self.param_shapes, self.param_dtypes):
            array = params[name]
            if tuple(array.shape) != shape:
                raise SdcoreError(f"weight {name}: expected shape {shape}, found {tuple(array.shape)}.")
            if isinstance(array, tvm.runtime.Tensor):
                if array.dtype != dtype:
                    raise SdcoreError(f"weight {name}: expected dtype {dtype}, found {array.dtype}.")
                bound.append(array)
            else:
                bound.append(tvm.runtime.tensor(np.ascontiguousarray(array, dtype=dtype), self.device))
        self._prepared = {fn: list(self.vm[t](bound)) for fn, t in self.transforms.items()}
        # keep the weights as given only where a function takes them unprepared: holding both copies
        # would double the memory of every transposed Linear weight
        needs_raw = not self.functions or any(fn not in self._prepared for fn in self.functions)
        self._params = bound if needs_raw else []

    def release_params(self) -> None:
        self._params = None
        self._prepared = {}

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("vm", "device"):
            raise AttributeError(name)
        return lambda *inputs: self.run(name, *inputs)

    def run(self, function: str, *inputs):
        import tvm

        if self._params is None:
            raise SdcoreError("parameters are not bound: call set_params() first.")
        dtypes = list(self.input_dtypes.get(function, []))
        dtypes += [None] * (len(inputs) - len(dtypes))
        args = [x if isinstance(x, tvm.runtime.Tensor)
                else tvm.runtime.tensor(np.ascontiguousarray(x, dtype), self.device)
                for x, dtype in zip(inputs, dtypes)]
        if function not in self._prepared and not self._params and self.param_names:
            raise SdcoreError(f"function {function!r} is not one this model was built with ({self.functions}).")
        out = self.vm[function](*args, *self._prepared.get(function, self._params))
        return _to_numpy(out)


def _to_numpy(out):
    import tvm

    if isinstance(out, tvm.runtime.Tensor):
        return out.numpy()
    return tuple(_to_numpy(o) for o in out)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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

    ir_mod, named_params = export(module, spec, target, debug=debug)
    param_names = [n for n, _ in named_params]
    param_shapes = [tuple(int(s) for s in p.shape) for _, p in named_params]
    param_dtypes = [p.dtype for _, p in named_params]

    key_material = json.dumps(
        {
            "ir": ir_mod.script(show_meta=True),
            "target": str(target),
            "tvm": tvm.__version__,
            "sdcore": sdcore.__version__,
            "pipeline": pipeline_id(target, schedule),
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()[:24]

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    lib_path = cache / f"{name}-{key}.so"
    meta_path = cache / f"{name}-{key}.json"

    lib = None
    if use_cache and lib_path.exists() and meta_path.exists():
        lib = _load_cached(lib_path, meta_path)
        if lib is not None:
            logger.info("loaded %s from cache (%s)", name, lib_path.name)

    ir_mod, transforms = lift_weight_transforms(ir_mod, target, schedule, spec)
    if lib is None:
        if target.kind.name == "cuda":
            _check_cuda_compiler()
        start = time.perf_counter()
        executable = relax.build(ir_mod, target=target, relax_pipeline=relax_pipeline(target, schedule))
        seconds = time.perf_counter() - start
        logger.info("compiled %s for %s in %.1f s", name, target.kind.name, seconds)
        if use_cache:
            _store(executable, lib_path, meta_path, {"name": name, "compile_seconds": seconds})
            lib = tvm.runtime.load_module(str(lib_path))
        else:
            lib = executable
    device = device_for(target)
    vm = relax.VirtualMachine(lib, device)
    input_dtypes = {fn: [getattr(arg, "dtype", None) for arg in args.values()] for fn, args in spec.items()}
    return CompiledModel(vm, device, param_names, param_shapes, param_dtypes, transforms, functions=list(spec),
                         input_dtypes=input_dtypes)


def _check_cuda_compiler() -> None:
    """TVM compiles the generated CUDA with NVRTC (the cuda-bindings package) unless
    TVM_CUDA_COMPILE_MODE=nvcc: without cuda-bindings, nvcc is used when it is on the PATH."""
    import shutil

    if os.environ.get("TVM_CUDA_COMPILE_MODE"):
        return
    try:
        import cuda.bindings.nvrtc  # noqa: F401
    except ImportError:
        if shutil.which("nvcc") is None:
            raise SdcoreError("building for cuda needs NVRTC (pip install cuda-bindings) or nvcc on the "
                              "PATH.") from None
        logger.info("cuda-bindings is not installed: compiling CUDA kernels with nvcc")
        os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"


def export(module, spec: dict[str, dict[str, Any]], target, *, debug: bool = False):
    """`module.export_tvm(spec)` for `target` -> (IRModule, named parameters). The hand-written CPU
    kernels (sdcore/schedule) go into llvm exports only; a CUDA export is the plain graph."""
    from sdcore.ops import kernels_for

    with kernels_for(target):
        ir_mod, named_params = module.export_tvm(spec=spec, debug=debug)
    # TVMScript's parser (the hand-written kernels are parsed during the export) keeps
    # inspect.stack() records in reference cycles, and they hold every caller's frame: collected
    # only when Python's cycle collector happens to run, a caller's locals stayed alive (the
    # pipeline's untransposed UNet weights, 1 GB; a parity test's torch and sdcore models, until
    # `pytest -m slow` ran out of 24 GB)
    gc.collect()
    return ir_mod, named_params


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
    """The llvm pipeline's first half: TVM's library dispatch, sdcore's fast exp, legalization and
    fusion, then sdcore's schedule rules. tools/profile_kernels.py stops here to time each kernel."""
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from sdcore.schedule import FastExp, schedule_cpu

    return cpu.library_dispatch_passes(target) + [FastExp()] + cpu.legalize_passes(target) + [schedule_cpu()]


def relax_pipeline(target, schedule: bool = True):
    """The Relax pipeline for `target`: on llvm, TVM's CPU pipeline with sdcore's schedule rules
    applied right after FuseTIR (TVM's own leaves every loop serial and unvectorized); on cuda,
    TVM's CUDA pipeline with dlight's GPU rules applied kernel by kernel (sdcore/schedule/gpu.py)."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.backend.cuda import pipeline as cuda

    if not schedule or target.kind.name not in ("llvm", "cuda"):
        return "default"

    def passes():
        if target.kind.name == "llvm":
            return scheduling_passes(target) + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
        from sdcore.schedule.gpu import schedule_cuda

        legalize = cuda.legalize_passes(target)
        # TVM's CUDA legalization ends with dlight.ApplyDefaultSchedule: sdcore's pass takes its place
        assert legalize[-1].info.name == "ApplyDefaultSchedule", legalize[-1].info.name
        return (cuda.library_dispatch_passes(target) + legalize[:-1] + [schedule_cuda()]
                + cuda.dataflow_lower_passes(target) + cuda.finalize_passes(target))

    @tvm.transform.module_pass(opt_level=0, name="SdcorePipeline")
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes())(mod)

    return _pipeline


def pipeline_id(target, schedule: bool = True) -> str:
    """Names the pipeline in the cache key; the schedule rules' source is part of it, so editing a
    rule invalidates the libraries built with the old one."""
    if not schedule or target.kind.name not in ("llvm", "cuda"):
        return "default-v1"
    if target.kind.name == "cuda":
        from sdcore.schedule import gpu

        return "cuda-dlight-lift-" + hashlib.sha256(Path(gpu.__file__).read_bytes()).hexdigest()[:16]
    from sdcore import schedule

    h = hashlib.sha256()
    for path in sorted(Path(schedule.__file__).parent.glob("*.py")):
        h.update(path.read_bytes())
    return "cpu-schedule-lift-" + h.hexdigest()[:16]


def _load_cached(lib_path: Path, meta_path: Path):
    import tvm

    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("sha256") != _sha256_file(lib_path):
            raise ValueError("checksum mismatch")
        return tvm.runtime.load_module(str(lib_path))
    except Exception as err:  # a corrupt entry is rebuilt, never fatal
        logger.warning("cache entry %s is corrupt (%s): rebuilding", lib_path.name, err)
        for p in (lib_path, meta_path):
            p.unlink(missing_ok=True)
        return None


def _store(executable, lib_path: Path, meta_path: Path, meta: dict) -> None:
    lib_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib_path.parent)
    os.close(fd)
    try:
        executable.export_library(tmp)
        meta = dict(meta, sha256=_sha256_file(Path(tmp)), created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        os.replace(tmp, lib_path)
        fd, tmp_meta = tempfile.mkstemp(suffix=".json", dir=lib_path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
        os.replace(tmp_meta, meta_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
