"""TVM targets by the names users type, and the CUDA kernel compiler check."""

from __future__ import annotations

import logging
import os

from sdcore.errors import SdcoreError, UsageError

logger = logging.getLogger("sdcore.compile")


def make_target(name: str = "llvm", arch: str | None = None):
    """A TVM target for `name`: "cpu" or "llvm" (the host CPU, detected), "cuda", or "auto" (cuda
    when a GPU is visible, else the CPU). `arch` ("sm_90") builds for a GPU this machine does not have: the
    library can be built and checked here (tests/test_cuda_build.py), but run only where one is."""
    import tvm
    from tvm.target import Target

    if name == "auto":
        name = "cuda" if tvm.cuda(0).exist else "llvm"
    if name in ("cpu", "llvm"):
        from tvm.target import codegen

        cpu = codegen.llvm_get_system_cpu()
        return Target({"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1})
    if name == "cuda":
        if arch is None:
            if not tvm.cuda(0).exist:
                raise SdcoreError("target 'cuda' asked for, but no CUDA GPU is visible to TVM.")
            arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
        return Target({"kind": "cuda", "arch": arch})
    raise UsageError(f"unknown target {name!r}: use 'cpu' (or 'llvm'), 'cuda' or 'auto'.")


def check_cuda_compiler() -> None:
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
