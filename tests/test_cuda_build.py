"""The cuda build of every network, checked on a machine without a GPU.

TVM generates the CUDA kernels without a device (`make_target("cuda", arch=...)`): the build fails
if any kernel is left without a GPU schedule (dlight's rules are the base), and the CUDA source it
produces is compiled here with nvcc when nvcc is installed. Running the kernels needs the GPU
machine; what these tests check is everything short of that, on the embedded demo model's networks
in the dtypes the pipeline uses on cuda (float16 UNet and text encoder, float32 VAE).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

import sdcore
from sdcore import weights

ARCH = "sm_90"  # H100 / H200, the GPU the project measures on


def _cuda_build(module, spec):
    """-> (CUDA source of every kernel, {function: its lifted weight transform})."""
    from tvm import relax

    from sdcore.compile import export, lift_weight_transforms, make_target, relax_pipeline

    target = make_target("cuda", arch=ARCH)
    ir_mod, _ = export(module, spec, target)
    ir_mod, transforms = lift_weight_transforms(ir_mod, target, True, spec)
    executable = relax.build(ir_mod, target=target, relax_pipeline=relax_pipeline(target))

    def cuda_modules(mod):
        if mod.kind == "cuda":
            yield mod
        for sub in mod.imports:
            yield from cuda_modules(sub)

    sources = [m.inspect_source("") for m in cuda_modules(executable.mod)]
    assert len(sources) == 1, f"expected one CUDA module, found {len(sources)}"
    return sources[0], transforms


def _networks():
    from sdcore.clip.model import clip_spec
    from sdcore.tome import ToMeConfig
    from sdcore.unet.model import unet_spec
    from sdcore.vae.model import vae_spec

    model_dir = sdcore.demo_model_path()
    configs = {c: weights.read_config(model_dir, c) for c in weights.COMPONENTS}
    tome = ToMeConfig(ratio=0.5)
    return {
        "text_encoder": lambda: (m := weights.build_module("text_encoder", configs["text_encoder"], dtype="float16"),
                                 clip_spec(m.config, batch=1, seq_len=77)),
        "unet": lambda: (m := weights.build_module("unet", configs["unet"], dtype="float16"),
                         unet_spec(m.config, batch=2, height=8, width=8, dtype="float16")),
        "unet-tome": lambda: (m := weights.build_module("unet", configs["unet"], dtype="float16", tome=tome),
                              unet_spec(m.config, batch=2, height=8, width=8, dtype="float16", tome=tome)),
        "vae": lambda: (m := weights.build_module("vae", configs["vae"]),
                        vae_spec(m.config, batch=1, height=64, width=64)),
    }


@pytest.fixture(scope="module")
def cuda_sources():
    built = {}
    for name, make in _networks().items():
        module, spec = make()
        built[name] = _cuda_build(module, spec)
    return built


@pytest.mark.parametrize("name", ["text_encoder", "unet", "unet-tome", "vae"])
def test_every_kernel_has_a_gpu_schedule(cuda_sources, name):
    source, transforms = cuda_sources[name]
    assert "__global__" in source
    # the hand-written CPU kernels (plain loops, no thread bindings) stay out of cuda builds
    assert "fused_attention" not in source
    if name.startswith("unet"):
        assert set(transforms) == {"forward"}, "the Linear weight transposes should run once, at load"
    if name == "unet":
        assert "half" in source, "the UNet should compute in float16"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed: the CUDA source is not compiled")
@pytest.mark.parametrize("name", ["text_encoder", "unet", "unet-tome", "vae"])
def test_cuda_source_compiles_with_nvcc(cuda_sources, name, tmp_path):
    source, _ = cuda_sources[name]
    path = tmp_path / f"{name}.cu"
    path.write_text(source)
    done = subprocess.run(["nvcc", "-cubin", f"-arch={ARCH}", "-O3", "-o", str(tmp_path / f"{name}.cubin"),
                           str(path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_cuda_without_a_gpu_names_the_problem():
    import tvm

    from sdcore.compile import make_target
    from sdcore.errors import SdcoreError

    if tvm.cuda(0).exist:
        pytest.skip("a CUDA GPU is visible: the error path is not reachable here")
    with pytest.raises(SdcoreError, match="no CUDA GPU"):
        make_target("cuda")
