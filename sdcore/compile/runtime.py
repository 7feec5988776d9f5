"""Running built networks: the CPU thread pool, the VM's memory, and CompiledModel (a built Relax
VM plus the weights it is bound to)."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from sdcore.errors import SdcoreError, UsageError


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
    resident (docs/performance.md has the figure for SD1.5's UNet). The pipeline calls this after binding
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

