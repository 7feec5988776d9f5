"""`StableDiffusion`: a converted model directory, its networks compiled on first use for each
shape, and the three modes on them. A generation reads as: validate the arguments (request.py),
encode the prompt, prepare the start latents (prepare.py), denoise (denoise.py), decode.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

import sdcore
from sdcore import prompts, weights
from sdcore.errors import SdcoreError, UsageError
from sdcore.images import array_to_images
from sdcore.pipeline.denoise import StepHook, denoise, randn, uses_guidance
from sdcore.pipeline.prepare import Start, prepare_img2img, prepare_inpaint, prepare_txt2img
from sdcore.pipeline.request import Request, default_image_size, unet_batch, validate

logger = logging.getLogger("sdcore.pipeline")
tome_logger = logging.getLogger("sdcore.tome")


@dataclasses.dataclass
class GenerationResult:
    images: list  # PIL images
    seeds: list[int]
    parameters: list[dict]  # per image: what save_png writes into the PNG
    timings: dict[str, float]


class StableDiffusion:
    """A converted model directory, its networks compiled on first use for each shape."""

    def __init__(self, model_dir: str | Path | None = None, *, target: str = "cpu", cache_dir=None,
                 low_memory: bool = False, threads: int | None = None, dtype: str | None = None):
        """`dtype`: the UNet's and text encoder's precision, "float32" or "float16"; None picks
        float16 on cuda and float32 on the CPU. The VAE is float32 either way (diffusers'
        force_upcast: SD's VAE overflows float16 at full size)."""
        from sdcore.compile import set_threads
        from sdcore.tokenizer import CLIPTokenizer

        self.threads = set_threads(threads)  # before TVM's thread pool starts: see set_threads

        if model_dir is None:  # the small shapes model shipped in the package
            model_dir = sdcore.demo_model_path()
            if not (model_dir / "sdcore.json").exists():
                raise SdcoreError(f"the embedded demo model is missing from {model_dir}: reinstall sdcore, or give "
                                  f"a converted model directory.")
        self.model_dir = Path(model_dir)
        self.info = weights.read_model_info(self.model_dir)
        self.target_name = target
        if dtype not in (None, "float32", "float16"):
            raise UsageError(f"unknown dtype {dtype!r}: use 'float32' or 'float16'.")
        self.dtype = dtype
        self.cache_dir = cache_dir
        self.low_memory = low_memory
        self.tokenizer = CLIPTokenizer.from_dir(self.model_dir / "tokenizer")
        self.configs = {c: weights.read_config(self.model_dir, c) for c in weights.COMPONENTS}
        self.unet_config = weights.model_classes("unet")[0].from_dict(self.configs["unet"])  # ToMe plans
        path = self.model_dir / "scheduler" / "scheduler_config.json"
        try:
            self.scheduler_config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SdcoreError(f"{path} cannot be read ({err}).") from None
        self.scheduler_config["prediction_type"] = self.info["prediction_type"]
        self.scaling_factor = float(self.configs["vae"].get("scaling_factor", 0.18215))
        self.vae_scale = weights.model_classes("vae")[0].from_dict(self.configs["vae"]).downsample_factor
        self.default_height, self.default_width = default_image_size(self.unet_config, self.vae_scale)
        self.inpainting = self.configs["unet"].get("in_channels", 4) == 9
        self._target = None
        self._params: dict[str, dict] = {}
        self._compiled: dict[tuple, object] = {}

    @classmethod
    def load(cls, model_dir=None, **kwargs) -> "StableDiffusion":
        return cls(model_dir, **kwargs)

    # ------------------------------------------------------------------------------------------
    # networks

    @property
    def target(self):
        if self._target is None:
            from sdcore.compile import make_target

            target = make_target(self.target_name)
            if self.dtype == "float16" and target.kind.name != "cuda":
                raise UsageError("float16 needs the cuda target: sdcore's CPU kernels are float32 (this "
                                  "kind of CPU has no fast half-precision arithmetic).")
            self._target = target
        return self._target

    def component_dtype(self, component: str) -> str:
        """The precision `component` is built and loaded in (see __init__'s `dtype`)."""
        if component == "vae":
            return "float32"
        if self.dtype is not None:
            return self.dtype
        return "float16" if self.target.kind.name == "cuda" else "float32"

    def _weights(self, component: str) -> dict:
        """The component's weights as device arrays, loaded once and shared by every compiled shape."""
        if component not in self._params:
            import tvm

            from sdcore.compile import device_for

            device = device_for(self.target)
            # each array goes to the device as it is read (the NumPy copy then freed), so the weights
            # are never held twice (docs/performance.md, "Pipeline memory")
            _config, self._params[component] = weights.load_component(
                self.model_dir, component, self.component_dtype(component),
                convert=lambda array: tvm.runtime.tensor(array, device))
        return self._params[component]

    def release(self, component: str) -> None:
        """Free a component's weights (low-memory mode does this after each stage)."""
        self._params.pop(component, None)
        for key, compiled in self._compiled.items():
            if key[0] == component:
                compiled.release_params()

    def _network(self, component: str, key: tuple, make_module: Callable, make_spec: Callable, name: str):
        from sdcore.compile import build

        full_key = (component, *key)
        if full_key not in self._compiled:
            module = make_module()
            self._compiled[full_key] = build(module, make_spec(module), name=name, target=self.target,
                                             cache_dir=self.cache_dir)
        compiled = self._compiled[full_key]
        if not compiled.has_params:
            self._bind(component, compiled)
        return compiled

    def _bind(self, component: str, compiled) -> None:
        from sdcore.compile import trim_heap

        state = self._weights(component)
        # a VAE built for one function holds only that half's weights
        compiled.set_params({name: state[name] for name in compiled.param_names if name in state})
        del state
        if compiled.transforms:
            # the compiled model now holds its own prepared (transposed) weights: drop the loaded
            # copy; another shape of this network reads the file again
            self._params.pop(component, None)
        trim_heap()  # what reading, copying and transposing the weights freed stays resident otherwise

    def text_encoder(self, clip_skip: int | None):
        from sdcore.clip.model import clip_spec

        config = self.configs["text_encoder"]
        return self._network(
            "text_encoder", (clip_skip,),
            lambda: weights.build_module("text_encoder", config, clip_skip=clip_skip,
                                         dtype=self.component_dtype("text_encoder")),
            lambda m: clip_spec(m.config, batch=1, seq_len=self.tokenizer.model_max_length),
            f"text_encoder-skip{clip_skip or 0}")

    def unet(self, batch: int, h: int, w: int, seq_len: int, tome=None):
        """The UNet for latents h x w; `tome` (a ToMeConfig) compiles token merging into the graph."""
        from sdcore.unet.model import unet_spec

        config = self.configs["unet"]
        if tome is not None and not tome.enabled:
            tome = None  # ratio 0: the plain graph, not a merged graph with r = 0
        key = (batch, h, w, seq_len, tome)
        if ("unet", *key) not in self._compiled and tome is not None:
            from sdcore.tome import log_lines
            from sdcore.unet.model import tome_plans

            plans = tome_plans(self.unet_config, tome, batch, h, w)
            tome_logger.info("token merging %s, latent %dx%d:", tome.tag(), h, w)
            for line in log_lines(plans):
                tome_logger.info("  %s", line)
        tag = f"-{tome.tag()}" if tome is not None else ""
        return self._network(
            "unet", key,
            lambda: weights.build_module("unet", config, tome=tome, dtype=self.component_dtype("unet")),
            lambda m: unet_spec(m.config, batch=batch, height=h, width=w, seq_len=seq_len, tome=tome,
                                dtype=m.dtype),
            f"unet-b{batch}-{h}x{w}-s{seq_len}{tag}")

    def vae(self, function: str, height: int, width: int):
        from sdcore.vae.model import vae_spec

        config = self.configs["vae"]
        return self._network(
            "vae", (function, height, width),
            lambda: weights.build_module("vae", config, functions=(function,)),
            lambda m: vae_spec(m.config, batch=1, height=height, width=width, functions=(function,)),
            f"vae-{function}-{height}x{width}")

    # ------------------------------------------------------------------------------------------
    # stages

    def encode_prompt(self, prompt: str, negative_prompt: str, clip_skip: int | None):
        """(cond, uncond) hidden states, each [1, 77·k, C] for k prompt chunks."""
        pos, neg = prompts.prompt_windows(self.tokenizer, prompt, negative_prompt)
        encoder = self.text_encoder(clip_skip)

        vocab = int(self.configs["text_encoder"]["vocab_size"])

        def run(windows):
            if int(np.max(windows)) >= vocab:
                raise SdcoreError(f"the tokenizer in {self.model_dir / 'tokenizer'} produced token id "
                                  f"{int(np.max(windows))}, beyond the text encoder's {vocab}-token vocabulary.")
            states = [_first(encoder.forward(w[None].astype(np.int32))) for w in windows]  # k × [1, 77, C]
            return np.concatenate(states, axis=1)  # [1, 77·k, C]

        return run(pos), run(neg)

    def vae_encode(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[1, 3, H, W] in [-1, 1] -> scaled latents [1, 4, h, w], a sample of the posterior."""
        _, _, height, width = image.shape
        # NumPy inputs go in as they are: CompiledModel converts them to each network's input dtype
        mean, logvar = self.vae("encode", height, width).encode(image)
        noise = randn(rng, mean.shape)
        std = np.exp(0.5 * logvar)
        return (mean + std * noise).astype(np.float64) * self.scaling_factor

    def vae_decode(self, latents: np.ndarray) -> np.ndarray:
        """[1, 4, h, w] latents -> [1, 3, H, W] image in [-1, 1]; refuses to return NaN/inf."""
        _, _, h, w = latents.shape
        z = latents / self.scaling_factor
        image = self.vae("decode", h * self.vae_scale, w * self.vae_scale).decode(z)
        image = _first(image)
        if not np.isfinite(image).all():
            raise SdcoreError("the decoded image contains NaN or inf values (the model diverged): "
                              "try fewer steps, another sampler or a lower guidance scale.")
        return image

    # ------------------------------------------------------------------------------------------
    # public API

    def txt2img(self, prompt: str, negative_prompt: str = "", *, steps: int = 20, guidance_scale: float = 7.5,
                sampler: str = "DPM++ 2M Karras", width: int | None = None, height: int | None = None,
                seed: int | None = None, batch_size: int = 1, clip_skip: int | None = None,
                latents: np.ndarray | None = None, callback: StepHook | None = None, progress: bool = True,
                tome=None) -> GenerationResult:
        """Text to image. `latents` [batch, 4, h, w] is x_T (before scaling by the sampler's init sigma).

        `tome`: token merging, a ratio (tomesd's other defaults) or a sdcore.tome.ToMeConfig.
        `callback(i, t, latents)` runs after every step (see sdcore.pipeline.denoise: it may return
        replaced latents, or raise to stop)."""
        request = validate(self, "txt2img", prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                           guidance_scale=guidance_scale, sampler=sampler, width=width, height=height, seed=seed,
                           batch_size=batch_size, clip_skip=clip_skip, latents=latents, tome=tome)
        return self.generate(request, callback=callback, progress=progress)

    def img2img(self, prompt: str, image, negative_prompt: str = "", *, strength: float = 0.75,
                steps: int = 20, guidance_scale: float = 7.5, sampler: str = "DPM++ 2M Karras",
                seed: int | None = None, batch_size: int = 1, clip_skip: int | None = None,
                callback: StepHook | None = None, progress: bool = True, tome=None) -> GenerationResult:
        """Image to image: `int(strength * steps)` steps run, starting from `image` (a PIL image or a
        path) noised to that point of the schedule (diffusers' semantics). Other arguments: txt2img."""
        request = validate(self, "img2img", prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                           guidance_scale=guidance_scale, sampler=sampler, seed=seed, batch_size=batch_size,
                           clip_skip=clip_skip, strength=strength, image=image, tome=tome)
        return self.generate(request, callback=callback, progress=progress)

    def inpaint(self, prompt: str, image, mask_image, negative_prompt: str = "", *, strength: float = 1.0,
                steps: int = 20, guidance_scale: float = 7.5, sampler: str = "DPM++ 2M Karras",
                seed: int | None = None, batch_size: int = 1, clip_skip: int | None = None,
                latents: np.ndarray | None = None, callback: StepHook | None = None, progress: bool = True,
                tome=None) -> GenerationResult:
        """Repaint the white area of `mask_image` (same size as `image`). A 9-channel inpainting
        checkpoint gets the mask and the masked image's latents as extra UNet input; a regular
        checkpoint keeps the unmasked area by blending the (noised) original latents back after
        every step. Other arguments: txt2img."""
        request = validate(self, "inpaint", prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                           guidance_scale=guidance_scale, sampler=sampler, seed=seed, batch_size=batch_size,
                           clip_skip=clip_skip, strength=strength, latents=latents, image=image,
                           mask_image=mask_image, tome=tome)
        return self.generate(request, callback=callback, progress=progress)

    # ------------------------------------------------------------------------------------------
    # one generation

    def generate(self, request: Request, *, callback: StepHook | None = None, progress: bool = True
                 ) -> GenerationResult:
        """Run a validated request (sdcore.pipeline.request.validate): encode the prompt, prepare the
        start latents, denoise, decode. `callback` runs after each step, after the mode's own hooks."""
        from sdcore.compile import release_pooled_memory

        timings: dict[str, float] = {}
        start = time.perf_counter()
        cond, uncond = self.encode_prompt(request.prompt, request.negative_prompt, request.clip_skip)
        timings["text_encode"] = time.perf_counter() - start
        self._end_stage("text_encoder")

        rngs = [np.random.Generator(np.random.PCG64(request.seed + j)) for j in range(request.batch_size)]
        begin = self.prepare(request, rngs)
        if request.mode != "txt2img":
            self._end_stage("vae")  # the VAE encoder's activations (and weights in low-memory mode)
        timings["prepare"] = time.perf_counter() - start - timings["text_encode"]

        unet = self._unet_call(request, cond, uncond)  # compiled (or loaded) on first use of this shape
        hooks = [*begin.hooks, *([callback] if callback is not None else [])]
        unet_start = time.perf_counter()
        with _ProgressBar(request, progress) as tick:
            x = denoise(unet, begin.samplers, begin.x, request.steps_run, guidance_scale=request.guidance_scale,
                        rngs=rngs, conditioning=begin.conditioning, hooks=[*hooks, tick])
        timings["denoise"] = time.perf_counter() - unet_start
        # the UNet's activations (kept for the next step by the VM's pooled allocator) are not
        # needed by the VAE: freed, the peak is the larger stage, not both (docs/performance.md,
        # "Pipeline memory")
        self._end_stage("unet")

        decode_start = time.perf_counter()
        images = [image for j in range(request.batch_size) for image in array_to_images(self.vae_decode(x[j : j + 1]))]
        timings["vae_decode"] = time.perf_counter() - decode_start
        release_pooled_memory()
        timings["total"] = time.perf_counter() - start
        seeds = [request.seed + j for j in range(request.batch_size)]
        return GenerationResult(images, seeds, [self._parameters(request, seed) for seed in seeds], timings)

    def prepare(self, request: Request, rngs: list[np.random.Generator]) -> Start:
        """The start latents of `request`'s mode and what the loop needs besides (prepare.py)."""
        from sdcore.sampling import make_sampler

        new_sampler = functools.partial(make_sampler, request.sampler, self.scheduler_config, request.steps)
        if request.mode == "txt2img":
            return prepare_txt2img(request, rngs, new_sampler)
        if request.mode == "img2img":
            return prepare_img2img(request, rngs, new_sampler, self.vae_encode, request.image)
        return prepare_inpaint(request, rngs, new_sampler, self.vae_encode, request.image, request.mask,
                               inpainting_unet=self.inpainting)

    def _unet_call(self, request: Request, cond: np.ndarray, uncond: np.ndarray) -> Callable:
        """The UNet as the denoising loop calls it: the prompt's hidden states (diffusers' order: the
        negative half first) and ToMe's per-step random destinations bound in."""
        from sdcore.unet.model import unet_tome_inputs

        batch, (_, h, w) = unet_batch(request), request.latent_shape
        unet = self.unet(batch, h, w, cond.shape[1], request.tome)
        repeat = functools.partial(np.repeat, repeats=request.batch_size, axis=0)
        context = np.concatenate([repeat(uncond), repeat(cond)]) if uses_guidance(request.guidance_scale) \
            else repeat(cond)

        def call(model_in: np.ndarray, t: np.ndarray, i: int) -> np.ndarray:
            # ToMe's random destinations (use_rand): drawn from (seed, step), apart from the sampler's noise
            tome_in = unet_tome_inputs(self.unet_config, request.tome, batch, h, w, seed=(request.seed, i)) \
                if request.tome else ()
            return _first(unet.forward(model_in, t, context, *tome_in)).astype(np.float64)

        return call

    def _end_stage(self, component: str) -> None:
        """Free what a stage's network held: its pooled activations, and its weights in low-memory mode."""
        from sdcore.compile import release_pooled_memory

        if self.low_memory:
            self.release(component)
        release_pooled_memory()

    def _parameters(self, request: Request, seed: int) -> dict:
        """What save_png writes into the PNG of one image."""
        return {
            "prompt": request.prompt, "negative_prompt": request.negative_prompt, "steps": request.steps,
            "sampler": request.sampler, "guidance_scale": request.guidance_scale, "seed": seed,
            "size": f"{request.width}x{request.height}", "model_hash": self.info.get("source", {}).get("sha256_10"),
            "model": self.model_dir.name, "strength": request.strength if request.mode != "txt2img" else None,
            "clip_skip": request.clip_skip, "tome_ratio": request.tome.ratio if request.tome is not None else None,
            "version": f"sdcore {sdcore.__version__}",
        }


class _ProgressBar:
    """A tqdm bar over the steps that run, as a step hook (a hook that never replaces the latents)."""

    def __init__(self, request: Request, enabled: bool):
        self.request, self.enabled, self.bar = request, enabled, None

    def __enter__(self) -> StepHook:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(self.request.steps_run), desc=self.request.mode, unit="step")
        return self.tick

    def tick(self, _i: int, _t: float, _x: np.ndarray) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def __exit__(self, *_exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _first(out):
    return out[0] if isinstance(out, tuple) else out
