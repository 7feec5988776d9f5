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
    ir_mod, _ = export(module, spec)
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


def _networks(configs: dict, latent: int, dtype: str = "float16") -> dict:
    """name -> () -> (module, spec): every network the pipeline builds on cuda, for latents of
    `latent` x `latent` (batch 2, guidance) and the images they decode to."""
    from sdcore.clip.model import clip_spec
    from sdcore.tome import ToMeConfig
    from sdcore.unet.model import unet_spec
    from sdcore.vae.model import vae_spec

    tome = ToMeConfig(ratio=0.5)
    image = latent * 2 ** (len(configs["vae"]["block_out_channels"]) - 1)

    def unet(tome_config):
        module = weights.build_module("unet", configs["unet"], dtype=dtype, tome=tome_config)
        return module, unet_spec(module.config, batch=2, height=latent, width=latent, dtype=dtype, tome=tome_config)

    def vae():
        module = weights.build_module("vae", configs["vae"])
        return module, vae_spec(module.config, batch=1, height=image, width=image)

    def text_encoder():
        module = weights.build_module("text_encoder", configs["text_encoder"], dtype=dtype)
        return module, clip_spec(module.config, batch=1, seq_len=77)

    return {"text_encoder": text_encoder, "unet": lambda: unet(None), "unet-tome": lambda: unet(tome), "vae": vae}


def _demo_networks() -> dict:
    model_dir = sdcore.demo_model_path()
    return _networks({c: weights.read_config(model_dir, c) for c in weights.COMPONENTS}, latent=8)


def _nvcc(source: str, name: str, tmp_path) -> None:
    path = tmp_path / f"{name}.cu"
    path.write_text(source)
    done = subprocess.run(["nvcc", "-cubin", f"-arch={ARCH}", "-O3", "-o", str(tmp_path / f"{name}.cubin"),
                           str(path)], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]


NO_NVCC = "nvcc is not installed: the CUDA source is not compiled"


@pytest.fixture(scope="module")
def cuda_sources():
    built = {}
    for name, make in _demo_networks().items():
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


@pytest.mark.skipif(shutil.which("nvcc") is None, reason=NO_NVCC)
@pytest.mark.parametrize("name", ["text_encoder", "unet", "unet-tome", "vae"])
def test_cuda_source_compiles_with_nvcc(cuda_sources, name, tmp_path):
    _nvcc(cuda_sources[name][0], name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("preset_name, latent", [("sd15", 64), ("sd21", 96)])
@pytest.mark.parametrize("name", ["text_encoder", "unet", "unet-tome", "vae"])
def test_full_size_cuda_build(preset_name, latent, name, tmp_path):
    """SD1.5 at 512x512 and SD2.1 at 768x768: kernel sizes (shared memory, registers) that the demo
    model's do not reach."""
    from sdcore.presets import preset

    module, spec = _networks(preset(preset_name), latent)[name]()
    source, _ = _cuda_build(module, spec)
    if shutil.which("nvcc") is None:
        pytest.skip(NO_NVCC)
    _nvcc(source, name, tmp_path)


def test_cuda_without_a_gpu_names_the_problem():
    import tvm

    from sdcore.compile import make_target
    from sdcore.errors import SdcoreError

    if tvm.cuda(0).exist:
        pytest.skip("a CUDA GPU is visible: the error path is not reachable here")
    with pytest.raises(SdcoreError, match="no CUDA GPU"):
        make_target("cuda")


def test_unknown_dtype_is_refused():
    from sdcore.errors import SdcoreError
    from sdcore.pipeline import StableDiffusion

    with pytest.raises(SdcoreError, match="unknown dtype 'bfloat16'") as err:
        StableDiffusion(dtype="bfloat16")
    assert err.value.exit_code == 2


def test_cuda_build_without_a_kernel_compiler_names_the_problem(monkeypatch):
    import builtins

    from sdcore.compile.targets import check_cuda_compiler
    from sdcore.errors import SdcoreError

    real_import = builtins.__import__

    def no_cuda_bindings(name, *args, **kwargs):
        if name.startswith("cuda"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.delenv("TVM_CUDA_COMPILE_MODE", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_cuda_bindings)
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(SdcoreError, match="needs NVRTC"):
        check_cuda_compiler()
