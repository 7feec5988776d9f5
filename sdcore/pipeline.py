"""Stable Diffusion pipelines: txt2img, img2img and inpainting on the compiled networks.

Mirrors diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline /
StableDiffusionInpaintPipeline step for step (same order of operations, same guidance formula), with
the host side in NumPy (float64 sampler math) and the networks compiled by TVM.

Randomness: image i of a batch draws all its noise from `numpy.random.Generator(PCG64(seed + i))`,
in this order: x_T (or the img2img/inpaint noise), the VAE posterior sample of the init image, the
VAE posterior sample of the masked image (9-channel inpainting), then one draw per step for the
samplers that take noise. So a seed gives the same image on every machine, and image i of a batch
equals a batch-1 run with seed + i. `latents=` gives x_T explicitly (the parity hook with diffusers).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

import sdcore
from sdcore import prompts, weights
from sdcore.errors import SdcoreError, UsageError
from sdcore.images import array_to_images, image_to_array, load_image, mask_to_array

logger = logging.getLogger("sdcore.pipeline")
tome_logger = logging.getLogger("sdcore.tome")

MIN_SIZE, MAX_SIZE = 64, 4096


@dataclasses.dataclass
class GenerationResult:
    images: list  # PIL images
    seeds: list[int]
    parameters: list[dict]  # per image: what save_png writes into the PNG
    timings: dict[str, float]


class StableDiffusion:
    """A converted model directory, its networks compiled on first use for each shape."""

    def __init__(self, model_dir: str | Path | None = None, *, target: str = "llvm", cache_dir=None,
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
        self.vae_scale = 2 ** (len(self.configs["vae"]["block_out_channels"]) - 1)
        self.default_size = int(self.configs["unet"].get("sample_size", 64)) * self.vae_scale
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
            # each array goes to the device as it is read (the NumPy copy then freed): loading the
            # whole file first held the UNet's weights twice, 3.4 GB more at the peak of a txt2img
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
                latents: np.ndarray | None = None, callback: Callable | None = None,
                progress: bool = True, tome_ratio: float = 0.0, tome=None) -> GenerationResult:
        """Text to image. `latents` [batch, 4, h, w] is x_T (before scaling by the sampler's init sigma)."""
        width, height = self._size(width, height)
        return self._generate(mode="txt2img", prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                              guidance_scale=guidance_scale, sampler=sampler, width=width, height=height,
                              seed=seed, batch_size=batch_size, clip_skip=clip_skip, latents=latents,
                              callback=callback, progress=progress, tome=_tome(tome_ratio, tome))

    def img2img(self, prompt: str, init_image, negative_prompt: str = "", *, strength: float = 0.75,
                steps: int = 20, guidance_scale: float = 7.5, sampler: str = "DPM++ 2M Karras",
                seed: int | None = None, batch_size: int = 1, clip_skip: int | None = None,
                callback: Callable | None = None, progress: bool = True, tome_ratio: float = 0.0,
                tome=None) -> GenerationResult:
        """Image to image: `int(strength * steps)` steps run, starting from the init image noised to
        that point of the schedule (diffusers' semantics)."""
        image = load_image(init_image, "init image")
        width, height = self._size(image.width, image.height, what="init image")
        _check_strength(strength)
        return self._generate(mode="img2img", prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                              guidance_scale=guidance_scale, sampler=sampler, width=width, height=height,
                              seed=seed, batch_size=batch_size, clip_skip=clip_skip, init_image=image,
                              strength=strength, callback=callback, progress=progress, tome=_tome(tome_ratio, tome))

    def inpaint(self, prompt: str, image, mask_image, negative_prompt: str = "", *, strength: float = 1.0,
                steps: int = 20, guidance_scale: float = 7.5, sampler: str = "DPM++ 2M Karras",
                seed: int | None = None, batch_size: int = 1, clip_skip: int | None = None,
                latents: np.ndarray | None = None, callback: Callable | None = None,
                progress: bool = True, tome_ratio: float = 0.0, tome=None) -> GenerationResult:
        """Repaint the white area of `mask_image`. A 9-channel inpainting checkpoint gets the mask and
        the masked image's latents as extra UNet input; a regular checkpoint keeps the unmasked area
        by blending the (noised) original latents back after every step."""
        image = load_image(image, "image")
        mask = load_image(mask_image, "mask")
        width, height = self._size(image.width, image.height, what="image")
        if mask.size != image.size:
            raise UsageError(f"the mask is {mask.width}x{mask.height} but the image is "
                              f"{image.width}x{image.height}: they must be the same size.")
        _check_strength(strength)
        return self._generate(mode="inpaint", prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                              guidance_scale=guidance_scale, sampler=sampler, width=width, height=height,
                              seed=seed, batch_size=batch_size, clip_skip=clip_skip, init_image=image,
                              mask=mask, strength=strength, latents=latents, callback=callback,
                              progress=progress, tome=_tome(tome_ratio, tome))

    # ------------------------------------------------------------------------------------------

    def _size(self, width, height, what="size"):
        width = self.default_size if width is None else int(width)
        height = self.default_size if height is None else int(height)
        for name, v in (("width", width), ("height", height)):
            if v % 8 or not MIN_SIZE <= v <= MAX_SIZE:
                raise UsageError(
                    f"{what}: {name} {v} is not supported: it must be a multiple of 8 between {MIN_SIZE} and "
                    f"{MAX_SIZE} (this model was trained at {self.default_size}x{self.default_size}); "
                    f"sdcore never resizes silently.")
        return width, height

    def _generate(self, *, mode, prompt, negative_prompt, steps, guidance_scale, sampler, width, height, seed,
                  batch_size, clip_skip, latents=None, init_image=None, mask=None, strength=1.0, callback=None,
                  progress=True, tome=None) -> GenerationResult:
        from sdcore.compile import release_pooled_memory
        from sdcore.sampling import make_sampler
        from sdcore.unet.model import unet_tome_inputs

        if tome is not None and not tome.enabled:
            tome = None

        if not isinstance(steps, int) or not 1 <= steps <= 1000:
            raise UsageError(f"steps must be an integer between 1 and 1000, got {steps!r}.")
        if not 0.0 <= guidance_scale <= 100.0:
            raise UsageError(f"guidance scale must be between 0 and 100, got {guidance_scale}.")
        if not isinstance(batch_size, int) or not 1 <= batch_size <= 64:
            raise UsageError(f"batch size must be between 1 and 64, got {batch_size!r}.")
        if clip_skip is not None and not 0 <= clip_skip < self.configs["text_encoder"]["num_hidden_layers"]:
            raise UsageError(f"clip skip {clip_skip} is out of range for a "
                              f"{self.configs['text_encoder']['num_hidden_layers']}-layer text encoder.")
        if mode == "txt2img" and self.inpainting:
            raise UsageError("this is an inpainting model (9-channel UNet): use inpaint, not txt2img.")
        if mode == "img2img" and self.inpainting:
            raise UsageError("this is an inpainting model (9-channel UNet): use inpaint, not img2img.")
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (2**32))
        if not 0 <= seed < 2**63:
            raise UsageError(f"seed must be between 0 and 2^63-1, got {seed}.")

        h, w = height // self.vae_scale, width // self.vae_scale
        lat_shape = (4, h, w)
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float64)
            if latents.shape != (batch_size, *lat_shape):
                raise UsageError(f"latents have shape {latents.shape}, expected {(batch_size, *lat_shape)} "
                                  f"for {width}x{height} and batch size {batch_size}.")

        try:  # an unknown name or a bad strength fails here, before any work
            probe = make_sampler(sampler, self.scheduler_config, steps)
            start_index = probe.img2img_start(strength) if mode != "txt2img" and strength < 1.0 else 0
        except SdcoreError as err:
            raise UsageError(str(err)) from None
        n_steps = len(probe.timesteps)
        # diffusers' get_timesteps: int(strength * steps) steps run, from index (steps - that) * order
        t_start = 0 if mode == "txt2img" or (mode == "inpaint" and strength >= 1.0) else start_index
        if t_start >= n_steps:
            raise UsageError(f"strength {strength} with {steps} steps runs no step at all: raise the strength "
                              f"or the number of steps.")

        unet_config = self.unet_config
        if tome is not None:  # a size ToMe cannot merge at fails here, before any work
            from sdcore.unet.model import tome_plans

            try:
                tome_plans(unet_config, tome, batch_size * (2 if guidance_scale > 1.0 else 1), h, w)
            except SdcoreError as err:
                raise UsageError(str(err)) from None

        timings: dict[str, float] = {}
        start = time.perf_counter()
        cond, uncond = self.encode_prompt(prompt, negative_prompt, clip_skip)
        timings["text_encode"] = time.perf_counter() - start
        release_pooled_memory()
        if self.low_memory:
            self.release("text_encoder")
        cfg = guidance_scale > 1.0
        seq_len = cond.shape[1]

        init = mask_np = None
        if init_image is not None:
            init = image_to_array(init_image).astype(np.float32)  # [1, 3, H, W]
        if mask is not None:
            mask_np = mask_to_array(mask)  # [1, 1, H, W]

        rngs = [np.random.Generator(np.random.PCG64(seed + i)) for i in range(batch_size)]
        samplers, xs, extras = [], [], []
        for i, rng in enumerate(rngs):
            s = make_sampler(sampler, self.scheduler_config, steps)
            noise = randn(rng, (1, *lat_shape))  # [1, 4, h, w]
            if latents is not None:
                noise = latents[i : i + 1]
            extra = {"noise": noise}
            if mode == "txt2img":
                x = noise * s.init_noise_sigma
            elif mode == "img2img":
                x0 = self.vae_encode(init, rng)
                x = s.add_noise(x0, noise, t_start)
            else:
                x, extra = self._inpaint_start(s, rng, init, mask_np, noise, strength, t_start, h, w)
            samplers.append(s)
            xs.append(x)
            extras.append(extra)
        if mode != "txt2img":
            release_pooled_memory()  # the VAE encoder's activations
        if self.low_memory and mode != "txt2img":
            self.release("vae")
        x = np.concatenate(xs, axis=0)  # [B, 4, h, w]
        timings["prepare"] = time.perf_counter() - start - timings["text_encode"]

        batch = batch_size * (2 if cfg else 1)
        unet = self.unet(batch, h, w, seq_len, tome)
        # diffusers' order: the negative (unconditional) half first
        context = np.concatenate([np.repeat(uncond, batch_size, 0), np.repeat(cond, batch_size, 0)]) if cfg \
            else np.repeat(cond, batch_size, 0)
        unet_start = time.perf_counter()
        steps_run = range(t_start, n_steps)
        iterator = steps_run
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(steps_run, desc=mode, unit="step")
        for i in iterator:
            model_in = np.concatenate([s.scale_model_input(x[j : j + 1], i) for j, s in enumerate(samplers)])
            if self.inpainting:
                cond_extra = np.concatenate([np.concatenate([e["mask"], e["masked"]], axis=1) for e in extras])
                model_in = np.concatenate([model_in, cond_extra], axis=1)  # [B, 9, h, w]
            model_in = np.concatenate([model_in, model_in]) if cfg else model_in
            t = np.full((batch,), samplers[0].timesteps[i], dtype=np.float32)
            # ToMe's random destinations (use_rand): drawn from (seed, step), apart from the sampler's noise
            extra_in = unet_tome_inputs(unet_config, tome, batch, h, w, seed=(seed, i)) if tome else ()
            out = _first(unet.forward(model_in, t, context, *extra_in)).astype(np.float64)
            if cfg:
                out_uncond, out_cond = out[:batch_size], out[batch_size:]
                out = out_uncond + guidance_scale * (out_cond - out_uncond)
            new = []
            for j, s in enumerate(samplers):
                step_noise = None
                if s.needs_noise:
                    step_noise = randn(rngs[j], (1, *lat_shape))
                xj = s.step(out[j : j + 1], i, x[j : j + 1], noise=step_noise)
                if mode == "inpaint" and not self.inpainting:
                    e = extras[j]
                    proper = e["image_latents"]
                    if i < n_steps - 1:
                        proper = s.add_noise(proper, e["noise"], i + 1)
                    xj = (1.0 - e["mask"]) * proper + e["mask"] * xj
                new.append(xj)
            x = np.concatenate(new)
            if callback is not None:
                callback(i, float(samplers[0].timesteps[i]), x)
        timings["denoise"] = time.perf_counter() - unet_start
        if self.low_memory:
            self.release("unet")

        # the UNet's activations (kept for the next step by the VM's pooled allocator) are not needed
        # by the VAE: freed, the peak is the larger stage, not both (SD1.5 512x512: 5847 -> 5647 MB)
        release_pooled_memory()
        decode_start = time.perf_counter()
        images = []
        for j in range(batch_size):
            images.extend(array_to_images(self.vae_decode(x[j : j + 1])))
        timings["vae_decode"] = time.perf_counter() - decode_start
        release_pooled_memory()
        timings["total"] = time.perf_counter() - start

        params = []
        for j in range(batch_size):
            params.append({
                "prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "sampler": sampler,
                "guidance_scale": guidance_scale, "seed": seed + j, "size": f"{width}x{height}",
                "model_hash": self.info.get("source", {}).get("sha256_10"), "model": self.model_dir.name,
                "strength": strength if mode != "txt2img" else None, "clip_skip": clip_skip,
                "tome_ratio": tome.ratio if tome is not None else None,
                "version": f"sdcore {sdcore.__version__}",
            })
        return GenerationResult(images, [seed + j for j in range(batch_size)], params, timings)

    def _inpaint_start(self, s, rng, init, mask, noise, strength, t_start, h, w):
        """Start latents and per-image extras for inpainting (diffusers' prepare_latents/prepare_mask_latents)."""
        image_latents = None
        if not self.inpainting or strength < 1.0:
            image_latents = self.vae_encode(init, rng)
        x = noise * s.init_noise_sigma if strength >= 1.0 else s.add_noise(image_latents, noise, t_start)
        # nearest-neighbour down to latent size, like torch.nn.functional.interpolate's default
        rows = (np.arange(h) * mask.shape[2] // h)
        cols = (np.arange(w) * mask.shape[3] // w)
        small_mask = mask[:, :, rows][:, :, :, cols].astype(np.float64)  # [1, 1, h, w]
        extra = {"noise": noise, "mask": small_mask, "image_latents": image_latents}
        if self.inpainting:
            masked = init * (mask < 0.5)  # [1, 3, H, W]: the area to keep
            extra["masked"] = self.vae_encode(masked, rng)
        return x, extra


def _tome(ratio: float, tome):
    """The ToMeConfig of a call: `tome` (all of tomesd's options) or tomesd's defaults at `ratio`."""
    from sdcore.tome import ToMeConfig

    if tome is not None:
        if ratio and ratio != tome.ratio:
            raise UsageError(f"tome_ratio={ratio} contradicts tome.ratio={tome.ratio}: give one of them.")
        return tome
    if not ratio:
        return None
    try:
        return ToMeConfig(ratio=float(ratio))
    except SdcoreError as err:
        raise UsageError(str(err)) from None


def randn(rng: np.random.Generator, shape) -> np.ndarray:
    """Standard normal noise: float32 draws (the same on every machine), returned as float64."""
    return rng.standard_normal(shape, dtype=np.float32).astype(np.float64)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _check_strength(strength: float) -> None:
    if not 0.0 < strength <= 1.0:
        raise UsageError(f"strength must be greater than 0 and at most 1, got {strength}.")
