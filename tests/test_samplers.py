"""sdcore.sampling against diffusers' schedulers (the reference), step by step.

A fixed fake "UNet" (a seeded linear function of x and t, so outputs depend on the trajectory)
drives both sdcore and the diffusers scheduler built the way a diffusers user would
(`SchedulerClass.from_config(checkpoint_config, **options)`), with diffusers' samples in float64
torch tensors and identical noise fed to both: Euler a through diffusers' `randn_tensor`, DDIM and
DPM++ 2M SDE through `variance_noise`, DPM++ SDE through a stand-in for its torchsde Brownian tree.
Every step's output is compared.
"""

import copy
import functools
import importlib
import importlib.util
import json
import math
import subprocess
import sys
import types

import numpy as np
import pytest

# diffusers calls np.array() on torch tensors, which NumPy 2 flags; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (  # noqa: E402
    StableDiffusionImg2ImgPipeline,
)

from sdcore.errors import SdcoreError  # noqa: E402
from sdcore.sampling import SAMPLER_NAMES, canonical_name, make_sampler  # noqa: E402

# Tolerances, in one place. Step outputs: max |sdcore - diffusers| / max |diffusers| after every
# step; diffusers keeps its sigma/alpha tables in float32 and casts Euler/DPM samples to float32
# inside step(), so agreement is at float32 precision, accumulated over the run. How much float32
# rounding torch's CPU kernels add depends on the CPU: DDIM over 20 steps was within 1e-6 on an
# AVX-512 Xeon and 1.02e-6 on an AVX2 EPYC (Zen 3), hence 2e-6 (a wrong coefficient is off by >1e-3).
STEP_RTOL = 2e-6
# Tables (sigmas, fractional timesteps, init_noise_sigma): diffusers' float32 values, up to the last
# bit of torch.linspace's vectorised kernel (see sdcore/sampling/noise_schedule.py).
TABLE_RTOL = 1e-6
# alphas_cumprod itself: equal to diffusers' float32 values within a couple of float32 ulps
ALPHAS_RTOL = 3e-7

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
# stabilityai/stable-diffusion-2-1 (768, v-prediction) scheduler/scheduler_config.json: leading
# spacing (the DDIM default) with steps_offset 1
SD21_V = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


@pytest.fixture(scope="module")
def sde_scheduler_cls():
    """diffusers' DPMSolverSDEScheduler; its module imports torchsde only for the Brownian tree,
    which these tests replace, so a placeholder module stands in when torchsde is absent."""
    placeholder = "torchsde" not in sys.modules and importlib.util.find_spec("torchsde") is None
    if placeholder:
        sys.modules["torchsde"] = types.ModuleType("torchsde")
    try:
        module = importlib.import_module("diffusers.schedulers.scheduling_dpmsolver_sde")
    finally:
        if placeholder:
            del sys.modules["torchsde"]
    return module.DPMSolverSDEScheduler


def reference(name, config, sde_cls):
    """A fresh diffusers scheduler for an sdcore sampler name (diffusers' docs, schedulers overview)."""
    return copy.deepcopy(_reference(name, json.dumps(config, sort_keys=True), sde_cls))


@functools.lru_cache(maxsize=None)
def _reference(name, config_json, sde_cls):
    config = json.loads(config_json)
    table = {
        "DDIM": (DDIMScheduler, {}),
        "PLMS": (PNDMScheduler, {"skip_prk_steps": True}),
        "Euler": (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
        "Euler a": (EulerAncestralDiscreteScheduler, {}),
        "LMS": (LMSDiscreteScheduler, {"use_karras_sigmas": False}),
        "LMS Karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True}),
        "DPM++ 2M": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
        "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
        "DPM++ 2M SDE": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
        "DPM++ 2M SDE Karras": (
            DPMSolverMultistepScheduler,
            {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        ),
        "DPM++ SDE": (sde_cls, {"use_karras_sigmas": False}),
        "DPM++ SDE Karras": (sde_cls, {"use_karras_sigmas": True}),
    }
    cls, options = table[name]
    return cls.from_config(config, **options)


SHAPE = (2, 4, 6, 6)


class FakeUNet:
    """out = (W x over channels) * (1 + t / 1000) + B cos(t / 150): linear in x, depends on t."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.w = rng.normal(size=(4, 4)) * 0.3
        self.b = rng.normal(size=SHAPE[1:])

    def __call__(self, x, t):
        return np.einsum("oc,bchw->bohw", self.w, x) * (1 + t / 1000) + self.b * math.cos(t / 150)


class StubBrownian:
    """Stands in for diffusers' torchsde BrownianTreeNoiseSampler: the first call of a step returns
    z1 for [sigma_mid, sigma], the second the increment over [sigma_next, sigma] that contains it,
    W(sigma) - W(sigma_next) = (W(sigma) - W(sigma_mid)) + (W(sigma_mid) - W(sigma_next)), normalised."""

    def __init__(self, noises):
        self.noises = iter(noises)
        self.first = None

    def __call__(self, sigma, sigma_next):
        sigma, sigma_next, z = float(sigma), float(sigma_next), next(self.noises)
        if self.first is None:
            self.first = (sigma, sigma_next, z)
            return torch.from_numpy(z)
        s, mid, z1 = self.first
        self.first = None
        increment = math.sqrt(s - mid) * z1 + math.sqrt(mid - sigma_next) * z
        return torch.from_numpy(increment / math.sqrt(s - sigma_next))


def run_sdcore(sampler, x, model, noises, start=0, blend=None):
    outs = []
    for i in range(start, len(sampler.timesteps)):
        out = model(sampler.scale_model_input(x, i), sampler.timesteps[i])
        x = sampler.step(out, i, x, noise=noises[i] if sampler.needs_noise else None)
        if blend is not None and i < len(sampler.timesteps) - 1:
            x0, mask, noise = blend
            x = (1 - mask) * sampler.add_noise(x0, noise, i + 1) + mask * x
        outs.append(x)
    return outs


def run_diffusers(sched, x, model, noises, monkeypatch, start=0, eta=0.0, blend=None):
    """The denoising loop of diffusers' StableDiffusion(Img2Img|Inpaint)Pipeline around `sched`,
    which has had set_timesteps (and set_begin_index) called."""
    x = torch.from_numpy(x)
    timesteps = sched.timesteps[start:]
    stream = iter(noises[start:])
    monkeypatch.setattr(
        "diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor",
        lambda shape, **kw: torch.from_numpy(next(stream)),
    )
    if hasattr(sched, "noise_sampler"):
        sched.noise_sampler = StubBrownian(noises[start:])
    outs = []
    for k, t in enumerate(timesteps):
        out = torch.from_numpy(model(sched.scale_model_input(x, t).numpy(), float(t)))
        kwargs = {}
        if isinstance(sched, DDIMScheduler) and eta > 0:
            kwargs = {"eta": eta, "variance_noise": torch.from_numpy(noises[start + k])}
        if isinstance(sched, DPMSolverMultistepScheduler) and "sde" in sched.config.algorithm_type:
            kwargs = {"variance_noise": torch.from_numpy(noises[start + k])}
        x = sched.step(out, t, x, **kwargs).prev_sample
        if blend is not None and k < len(timesteps) - 1:
            x0, mask, noise = (torch.from_numpy(a) for a in blend)
            x = (1 - mask) * sched.add_noise(x0, noise, torch.tensor([timesteps[k + 1]])) + mask * x
        outs.append(x.numpy())
    return outs


def assert_timesteps_match(sampler, sched):
    """Integer timesteps exactly; fractional ones (from a sigma table) to float32 precision."""
    theirs = sched.timesteps.numpy().astype(np.float64)
    if sched.timesteps.dtype == torch.int64:
        np.testing.assert_array_equal(sampler.timesteps, theirs)
    else:
        np.testing.assert_allclose(sampler.timesteps, theirs, rtol=TABLE_RTOL)


def assert_steps_close(ours, theirs):
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert np.all(np.isfinite(a))
        rel = np.abs(a - b).max() / np.abs(b).max()
        assert rel <= STEP_RTOL, f"step {k}: relative error {rel:.3g} > {STEP_RTOL}"


def make_noises(n, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE) for _ in range(n)]


def txt2img_parity(name, config, steps, sde_cls, monkeypatch, eta=None):
    sampler = make_sampler(name, config, steps, eta=eta)
    sched = reference(name, config, sde_cls)
    sched.set_timesteps(steps)
    assert_timesteps_match(sampler, sched)
    model, noises = FakeUNet(), make_noises(len(sampler.timesteps))
    x_T = np.random.default_rng(2).standard_normal(SHAPE)
    ours = run_sdcore(sampler, x_T * sampler.init_noise_sigma, model, noises)
    theirs = run_diffusers(
        sched, x_T * float(sched.init_noise_sigma), model, noises, monkeypatch, eta=eta or 0.0
    )
    assert_steps_close(ours, theirs)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_step_parity(name, prediction_type, spacing, sde_scheduler_cls, monkeypatch):
    config = {**SD15, "prediction_type": prediction_type, "timestep_spacing": spacing}
    txt2img_parity(name, config, 12, sde_scheduler_cls, monkeypatch)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_step_parity_sd21_v_25_steps(name, sde_scheduler_cls, monkeypatch):
    txt2img_parity(name, SD21_V, 25, sde_scheduler_cls, monkeypatch)


@pytest.mark.parametrize("name", ["DDIM", "Euler", "LMS", "DPM++ 2M", "DPM++ 2M Karras"])
def test_step_parity_sample_prediction(name, sde_scheduler_cls, monkeypatch):
    txt2img_parity(name, {**SD15, "prediction_type": "sample"}, 10, sde_scheduler_cls, monkeypatch)


@pytest.mark.parametrize("config", [SD15, SD21_V], ids=["sd15", "sd21v"])
def test_ddim_eta_parity(config, sde_scheduler_cls, monkeypatch):
    txt2img_parity("DDIM", config, 15, sde_scheduler_cls, monkeypatch, eta=0.7)


@pytest.mark.parametrize(
    "name,extra,steps",
    [
        ("DDIM", {"clip_sample": True, "set_alpha_to_one": True}, 20),
        ("Euler", {"final_sigmas_type": "sigma_min"}, 20),
        ("Euler", {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, 20),
        ("DPM++ 2M", {"solver_type": "heun", "lower_order_final": False}, 20),
        ("DPM++ 2M SDE", {"solver_type": "heun"}, 20),
        ("DPM++ 2M", {"final_sigmas_type": "sigma_min"}, 12),  # < 15 steps: first-order final step
        ("DPM++ 2M", {"final_sigmas_type": "sigma_min"}, 20),
        ("DPM++ 2M Karras", {"final_sigmas_type": "sigma_min", "euler_at_final": True}, 20),
        ("DPM++ 2M", {"beta_schedule": "squaredcos_cap_v2"}, 20),
        ("DPM++ SDE", {"trained_betas": [0.001 + 0.019 * k / 999 for k in range(1000)]}, 20),
    ],
)
def test_step_parity_options(name, extra, steps, sde_scheduler_cls, monkeypatch):
    txt2img_parity(name, {**SD15, **extra}, steps, sde_scheduler_cls, monkeypatch)


@pytest.mark.parametrize(
    "config",
    [SD15, SD21_V, {**SD15, "timestep_spacing": "trailing"}, {**SD15, "timestep_spacing": "linspace"}],
    ids=["sd15", "sd21v", "trailing", "linspace"],
)
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_schedule_matches_diffusers(name, config, sde_scheduler_cls):
    for steps in (1, 2, 20, 50):
        sampler = make_sampler(name, config, steps)
        sched = reference(name, config, sde_scheduler_cls)
        sched.set_timesteps(steps)
        assert_timesteps_match(sampler, sched)
        if hasattr(sampler, "sigmas"):
            np.testing.assert_allclose(sampler.sigmas, sched.sigmas.numpy(), rtol=TABLE_RTOL)
        np.testing.assert_allclose(sampler.init_noise_sigma, float(sched.init_noise_sigma), rtol=TABLE_RTOL)
        assert sampler.order == sched.order


def test_alphas_cumprod_matches_diffusers():
    ours = make_sampler("DDIM", SD15, 50).alphas_cumprod
    np.testing.assert_allclose(ours, DDIMScheduler.from_config(SD15).alphas_cumprod.numpy(), rtol=ALPHAS_RTOL)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_add_noise(name, sde_scheduler_cls):
    steps = 20
    sampler = make_sampler(name, SD21_V, steps)
    x0, noise = make_noises(2, seed=3)
    for start in (0, 3, len(sampler.timesteps) - 1):
        sched = reference(name, SD21_V, sde_scheduler_cls)
        sched.set_timesteps(steps)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start)
        t = sched.timesteps[start : start + 1]
        theirs = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), t).numpy()
        np.testing.assert_allclose(sampler.add_noise(x0, noise, start), theirs, rtol=TABLE_RTOL, atol=1e-12)


@pytest.mark.parametrize("name", ["DDIM", "PLMS", "Euler", "DPM++ 2M", "DPM++ SDE Karras"])
def test_img2img_start(name, sde_scheduler_cls):
    for steps in (7, 20, 50):
        for strength in (0.3, 0.5, 0.75, 1.0):
            sched = reference(name, SD15, sde_scheduler_cls)
            sched.set_timesteps(steps)
            pipe = types.SimpleNamespace(scheduler=sched)  # get_timesteps only reads self.scheduler
            timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, steps, strength, "cpu")
            sampler = make_sampler(name, SD15, steps)
            start = sampler.img2img_start(strength)
            np.testing.assert_allclose(sampler.timesteps[start:], timesteps.numpy(), rtol=TABLE_RTOL)
            if getattr(sched, "begin_index", None) is not None:
                assert sched.begin_index == start


# LMS is left out: diffusers takes a 4th-order step on a one-derivative history when starting
# past step 0 (see sdcore/sampling/lms.py and docs/samplers.md).
@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint"])
@pytest.mark.parametrize(
    "name", ["DDIM", "PLMS", "Euler", "Euler a", "DPM++ 2M Karras", "DPM++ 2M SDE", "DPM++ SDE Karras"]
)
def test_img2img_and_inpaint_parity(name, inpaint, sde_scheduler_cls, monkeypatch):
    steps, strength = 20, 0.6
    sampler = make_sampler(name, SD21_V, steps)
    start = sampler.img2img_start(strength)
    sched = reference(name, SD21_V, sde_scheduler_cls)
    sched.set_timesteps(steps)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
        types.SimpleNamespace(scheduler=sched), steps, strength, "cpu"
    )
    x0, noise = make_noises(2, seed=4)
    mask = (np.arange(SHAPE[-1]) < 3).astype(np.float64) * np.ones(SHAPE)
    blend = (x0, mask, noise) if inpaint else None
    noises = make_noises(len(sampler.timesteps), seed=5)
    ours = run_sdcore(sampler, sampler.add_noise(x0, noise, start), FakeUNet(), noises, start, blend)
    x_start = sched.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps[:1]).numpy()
    theirs = run_diffusers(sched, x_start, FakeUNet(), noises, monkeypatch, start, blend=blend)
    assert_steps_close(ours, theirs)


def test_lms_coefficients_are_exact_integrals():
    integrate = pytest.importorskip("scipy.integrate")
    from sdcore.sampling.lms import lms_coefficient

    sigmas = np.array([14.6, 9.1, 5.2, 3.3, 1.9, 0.0])
    for i in range(5):
        order = min(i + 1, 4)
        for j in range(order):

            def basis(tau, i=i, j=j, order=order):  # the Lagrange basis polynomial of this (i, j)
                prod = 1.0
                for k in range(order):
                    if k != j:
                        prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
                return prod

            expected = integrate.quad(basis, sigmas[i], sigmas[i + 1], epsabs=0, epsrel=1e-13)[0]
            assert lms_coefficient(sigmas, i, order, j) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_names_and_aliases():
    assert canonical_name("euler a") == "Euler a"
    assert canonical_name("EULER_ANCESTRAL") == "Euler a"
    assert canonical_name("dpmpp_2m_karras") == "DPM++ 2M Karras"
    assert canonical_name("  DPM++   2M  Karras ") == "DPM++ 2M Karras"
    assert canonical_name("pndm") == "PLMS"
    assert canonical_name("k_lms") == "LMS"
    assert make_sampler("dpm++ sde karras", SD15, 5).name == "DPM++ SDE Karras"


def test_unknown_sampler_name_lists_known():
    with pytest.raises(SdcoreError, match="Unknown sampler 'Heun'.*Euler a.*DPM\\+\\+ 2M Karras"):
        make_sampler("Heun", SD15, 20)


@pytest.mark.parametrize("name", ["Euler a", "DPM++ SDE Karras", "DPM++ 2M SDE"])
def test_missing_noise_raises(name):
    sampler = make_sampler(name, SD15, 10)
    assert sampler.needs_noise
    x = np.zeros(SHAPE)
    with pytest.raises(SdcoreError, match="needs a noise array"):
        sampler.step(x, 0, x)


def test_ddim_needs_noise_only_with_eta():
    assert not make_sampler("DDIM", SD15, 10).needs_noise
    sampler = make_sampler("DDIM", SD15, 10, eta=1.0)
    assert sampler.needs_noise
    with pytest.raises(SdcoreError, match="needs a noise array"):
        sampler.step(np.zeros(SHAPE), 0, np.zeros(SHAPE))
    with pytest.raises(SdcoreError, match="eta applies to DDIM only"):
        make_sampler("Euler", SD15, 10, eta=0.5)


@pytest.mark.parametrize(
    "name,extra,key",
    [
        ("DDIM", {"thresholding": True}, "thresholding"),
        ("Euler", {"interpolation_type": "log_linear"}, "interpolation_type"),
        ("DPM++ 2M", {"use_lu_lambdas": True}, "use_lu_lambdas"),
        ("PLMS", {"prediction_type": "sample"}, "prediction_type"),
        ("Euler a", {"prediction_type": "flow_prediction"}, "prediction_type"),
        ("LMS", {"timestep_spacing": "karras"}, "timestep_spacing"),
        ("DDIM", {"beta_schedule": "cosine"}, "beta_schedule"),
        ("Euler", {"final_sigmas_type": "one"}, "final_sigmas_type"),
        ("DDIM", {"clip_sample": "no"}, "clip_sample"),
        ("DPM++ 2M", {"trained_betas": [0.01, 0.02]}, "trained_betas"),
    ],
)
def test_unsupported_config_values_raise(name, extra, key):
    with pytest.raises(SdcoreError, match=key):
        make_sampler(name, {**SD15, **extra}, 20)


def test_unrelated_keys_are_ignored():
    # a DPMSolverMultistep config carries keys DDIM does not read; diffusers' from_config drops them
    make_sampler("DDIM", {**SD15, "_class_name": "DPMSolverMultistepScheduler", "use_lu_lambdas": True}, 20)


def test_steps_out_of_order_raise_and_reset():
    sampler = make_sampler("DPM++ 2M", SD15, 10)
    x = np.ones(SHAPE)
    sampler.step(x, 0, x)
    with pytest.raises(SdcoreError, match="expected step 1"):
        sampler.step(x, 3, x)
    sampler.reset()
    sampler.step(x, 3, x)


def test_fresh_samplers_share_no_history():
    a, b = make_sampler("PLMS", SD15, 10), make_sampler("PLMS", SD15, 10)
    x = np.ones(SHAPE)
    a.step(x, 0, x)
    b.step(x, 0, x)  # would raise if b shared a's step counter
    assert not a.timesteps.flags.writeable


@pytest.mark.parametrize("steps", [0, 1001, 2.5])
def test_bad_steps_raise(steps):
    with pytest.raises(SdcoreError, match="steps must be an integer"):
        make_sampler("Euler", SD15, steps)


def test_img2img_strength_too_small_raises():
    with pytest.raises(SdcoreError, match="leaves no denoising step"):
        make_sampler("Euler", SD15, 10).img2img_start(0.05)


def test_import_does_not_load_torch():
    code = "import sys, sdcore.sampling; sys.exit(any(m in sys.modules for m in ('torch', 'diffusers', 'scipy')))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- the pipeline's denoising loop (sdcore/pipeline/denoise.py), against the loop above ---------


@pytest.mark.parametrize("name", ["DDIM", "Euler a", "DPM++ 2M Karras", "DPM++ SDE Karras"])
def test_denoise_loop_equals_the_sampler_loop(name):
    """A batch of two, each image with its own sampler and random stream, no guidance: the same
    latents as run_sdcore per image, bit for bit; the hooks see every step in order."""
    from sdcore.pipeline.denoise import denoise, randn

    unet, steps, shape = FakeUNet(), 8, (1, *SHAPE[1:])
    samplers = [make_sampler(name, SD15, steps) for _ in range(2)]
    n = len(samplers[0].timesteps)
    x = make_noises(1, seed=6)[0]  # [2, 4, 6, 6]
    seen = []
    out = denoise(lambda model_in, _t, i: unet(model_in, samplers[0].timesteps[i]), samplers, x, range(n),
                  guidance_scale=1.0, rngs=[np.random.Generator(np.random.PCG64(10 + j)) for j in range(2)],
                  hooks=[lambda i, t, latents: seen.append((i, t, latents.shape))])
    assert seen == [(i, float(samplers[0].timesteps[i]), SHAPE) for i in range(n)]
    for j in range(2):
        rng = np.random.Generator(np.random.PCG64(10 + j))
        noises = [randn(rng, shape) for _ in range(n)]
        expected = run_sdcore(make_sampler(name, SD15, steps), x[j : j + 1], unet, noises)[-1]
        np.testing.assert_array_equal(out[j : j + 1], expected)


def test_guidance_runs_the_negative_half_first():
    from sdcore.pipeline.denoise import predict

    def unet(model_in, t, i):  # the negative half predicts 1, the positive half 3
        assert model_in.shape[0] == 4 and t.shape == (4,) and t.dtype == np.float32 and i == 5
        return np.concatenate([np.full((2, 4, 2, 2), 1.0), np.full((2, 4, 2, 2), 3.0)])

    np.testing.assert_array_equal(predict(unet, np.zeros((2, 4, 2, 2)), 500.0, 5, 7.5), 1.0 + 7.5 * (3.0 - 1.0))
    assert predict(lambda m, t, i: m + 2.0, np.zeros((2, 4, 2, 2)), 500.0, 5, 1.0).max() == 2.0  # no guidance


def test_a_hook_can_replace_the_latents_and_is_checked():
    from sdcore.pipeline.denoise import denoise

    samplers = [make_sampler("DDIM", SD15, 3)]
    x = np.ones((1, *SHAPE[1:]))
    rngs = [np.random.Generator(np.random.PCG64(0))]
    starts = []

    def unet(model_in, t, i):
        starts.append(float(model_in.max()))
        return np.zeros_like(model_in)

    denoise(unet, samplers, x, range(3), guidance_scale=1.0, rngs=rngs, hooks=[lambda i, t, x: np.full_like(x, 7.0)])
    assert starts[1:] == [7.0, 7.0]  # every step after the first starts from what the hook returned
    samplers[0].reset()
    with pytest.raises(SdcoreError, match="step hook returned latents of shape"):
        denoise(unet, samplers, x, range(3), guidance_scale=1.0, rngs=rngs, hooks=[lambda i, t, x: x[:, :2]])
