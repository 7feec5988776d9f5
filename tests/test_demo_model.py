"""The embedded demo model (sdcore/models/shapes-demo, docs/demo-model.md) does what it is asked.

The measure is `describe` from tools/train_demo_model.py: every pixel takes the nearest colour of the
training palette; the most common is the background, the most common other one the shape's colour,
and the centroid of that colour's pixels gives the nearest named position (top left, ..., center).
Everything runs at the model's 64x64 with the sampler most users use (DPM++ 2M Karras, 20 steps);
the networks compile once for the module (the session's compile cache).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import train_demo_model as demo  # tools/ is on sys.path (pytest's pythonpath, pyproject.toml)
from PIL import Image

from sdcore.models import demo_model_path
from sdcore.pipeline import StableDiffusion, randn

SAMPLER, STEPS, SIZE = "DPM++ 2M Karras", 20, 64
SEEDS = (0, 1, 2)
GUIDANCE_SEED_OFFSETS = (0, 100)  # the guidance test's seeds: offset + the caption's index
# (prompt, what it asks for); prompts without a position leave it free
PROMPTS = [
    ("a red square on a black background", {"colour": "red", "background": "black"}),
    ("a blue square at the top left on a white background",
     {"colour": "blue", "background": "white", "position": "top left"}),
    ("a yellow circle at the bottom right on a black background",
     {"colour": "yellow", "background": "black", "position": "bottom right"}),
    ("a green triangle in the center on a gray background",
     {"colour": "green", "background": "gray", "position": "center"}),
]
# The shipped model's former weakness (docs/demo-model.md): red and yellow on white and gray were one
# colour in its latents, and came out orange or swapped; its training's colour-separation stage fixed it.
LIGHT_RED_YELLOW = [
    ("a red circle on a white background", {"colour": "red", "background": "white"}),
    ("a yellow square on a white background", {"colour": "yellow", "background": "white"}),
    ("a red square on a gray background", {"colour": "red", "background": "gray"}),
    ("a yellow triangle on a gray background", {"colour": "yellow", "background": "gray"}),
]
# Tolerances, in one place.
MIN_TXT2IMG_ACCURACY = 0.9  # fraction of (prompt, seed) images with every asked attribute right
MAX_CENTROID_SHIFT_PX = 6.0  # img2img at low strength: how far the shape may move
MIN_KEPT_PSNR_DB = 20.0  # inpainting: the area outside the mask, against the input
MIN_TOME_PSNR_DB = 15.0  # ToMe 0.5 against ratio 0
MAX_PARITY_DIFF = 3  # of 255: sdcore vs diffusers from the same x_T

pytestmark = pytest.mark.skipif(not (demo_model_path() / "sdcore.json").exists(),
                                reason=f"the demo model is not in {demo_model_path()} (tools/train_demo_model.py)")


@pytest.fixture(scope="module")
def sd(compile_cache):
    return StableDiffusion.load(demo_model_path(), cache_dir=compile_cache)


@pytest.fixture(scope="module")
def generate(sd):
    """txt2img, memoised per (prompt, seed, guidance): the guidance test reuses the txt2img images."""
    cache = {}

    def run(prompt: str, seed: int, guidance: float) -> np.ndarray:
        key = (prompt, seed, guidance)
        if key not in cache:
            image = sd.txt2img(prompt, steps=STEPS, sampler=SAMPLER, guidance_scale=guidance, seed=seed,
                               width=SIZE, height=SIZE, progress=False).images[0]
            cache[key] = np.asarray(image.convert("RGB"))
        return cache[key]

    return run


def misses(image: np.ndarray, want: dict) -> list[str]:
    got = demo.describe(image)
    return [f"{k}: {got[k]} instead of {v}" for k, v in want.items() if got[k] != v]


def colour_error(image: np.ndarray, want: dict) -> float:
    """A continuous measure: RGB distance of the background and shape colours to the asked ones."""
    got = demo.describe(image)
    rgb = np.asarray(image, np.float64)
    names = list(demo.PALETTE)
    palette = np.array([demo.PALETTE[k] for k in names], np.float64)
    label = ((rgb[:, :, None] - palette[None, None]) ** 2).sum(-1).argmin(-1)
    bg_mean = rgb[label == names.index(got["background"])].mean(0)
    fg_mean = rgb[label == names.index(got["colour"])].mean(0)
    return float(np.linalg.norm(bg_mean - demo.BACKGROUNDS[want["background"]])
                 + np.linalg.norm(fg_mean - demo.COLOURS[want["colour"]]))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def test_txt2img_follows_the_prompt(generate):
    """Shape colour and background, over every prompt and seed."""
    failures = []
    for prompt, want in PROMPTS:
        for seed in SEEDS:
            wrong = misses(generate(prompt, seed, 7.0), {k: want[k] for k in ("colour", "background")})
            if wrong:
                failures.append(f"{prompt!r} seed {seed}: {', '.join(wrong)}")
    accuracy = 1 - len(failures) / (len(PROMPTS) * len(SEEDS))
    assert accuracy >= MIN_TXT2IMG_ACCURACY, f"accuracy {accuracy:.0%}; " + "; ".join(failures)


def test_txt2img_red_and_yellow_on_light_backgrounds(generate):
    failures = [f"{prompt!r} seed {seed}: {', '.join(wrong)}" for prompt, want in LIGHT_RED_YELLOW for seed in SEEDS
                if (wrong := misses(generate(prompt, seed, 7.0), want))]
    accuracy = 1 - len(failures) / (len(LIGHT_RED_YELLOW) * len(SEEDS))
    assert accuracy >= MIN_TXT2IMG_ACCURACY, f"accuracy {accuracy:.0%}; " + "; ".join(failures)


def test_txt2img_puts_the_shape_where_asked(generate):
    failures = []
    asked = [(prompt, want) for prompt, want in PROMPTS if "position" in want]
    for prompt, want in asked:
        for seed in SEEDS:
            wrong = misses(generate(prompt, seed, 7.0), {"position": want["position"]})
            if wrong:
                failures.append(f"{prompt!r} seed {seed}: {', '.join(wrong)}")
    accuracy = 1 - len(failures) / (len(asked) * len(SEEDS))
    assert accuracy >= MIN_TXT2IMG_ACCURACY, f"accuracy {accuracy:.0%}; " + "; ".join(failures)


def test_guidance_7_follows_the_prompt_better_than_1(generate, record_property):
    """Over the 60 evaluation captions (colour x position x background), two seeds each: the shipped
    model gets 99% of the asked attributes at guidance 1 already (docs/demo-model.md), so it takes
    this many images to see guidance 7 do better (measured: 360 vs 356 of 360)."""
    prompts = demo.evaluation_prompts()
    scores = {}
    for guidance in (7.0, 1.0):
        hits = errors = 0.0
        for i, (prompt, want) in enumerate(prompts):
            for offset in GUIDANCE_SEED_OFFSETS:
                image = generate(prompt, offset + i, guidance)
                hits += len(want) - len(misses(image, want))  # colour, background and position
                errors += colour_error(image, want)
        scores[guidance] = (hits, errors / (len(prompts) * len(GUIDANCE_SEED_OFFSETS)))
    record_property("guidance_scores", scores)
    (hits7, err7), (hits1, err1) = scores[7.0], scores[1.0]
    assert hits7 > hits1 or (hits7 == hits1 and err7 < err1), \
        f"attributes right / mean colour error: guidance 7 {hits7:.0f} / {err7:.1f}, " \
        f"guidance 1 {hits1:.0f} / {err1:.1f}"


def test_img2img_low_strength_keeps_the_layout(sd):
    rng = np.random.Generator(np.random.PCG64(5))
    init = demo.draw("circle", "blue", "top left", "white", rng)
    # a prompt that asks for something else: at strength 0.3 the input's layout must win
    out = sd.img2img("a yellow square at the bottom right on a black background", Image.fromarray(init),
                     strength=0.3, steps=STEPS, sampler=SAMPLER, guidance_scale=7.0, seed=0,
                     progress=False).images[0]
    out = np.asarray(out.convert("RGB"))
    before, after = demo.describe(init), demo.describe(out)
    shift = math.dist(before["centroid"], after["centroid"])
    # the layout: where the shape is and the background; the prompt may tint the shape's colour
    assert misses(out, {k: before[k] for k in ("background", "position")}) == []
    assert shift <= MAX_CENTROID_SHIFT_PX, f"the shape moved by {shift:.1f} px"


def test_inpainting_changes_the_masked_area_and_keeps_the_rest(sd):
    rng = np.random.Generator(np.random.PCG64(6))
    image = demo.draw("circle", "red", "top left", "white", rng)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[:32, :32] = 255  # the top-left quadrant, over the red circle: latent cells 0..3, no partial cells
    out = sd.inpaint("a blue square on a white background", Image.fromarray(image), Image.fromarray(mask),
                     steps=STEPS, sampler=SAMPLER, guidance_scale=7.0, seed=0, progress=False).images[0]
    out = np.asarray(out.convert("RGB"))
    keep = np.ones((SIZE, SIZE), bool)
    keep[:40, :40] = False  # outside the mask, less a margin for the decoder's receptive field
    kept_psnr = psnr(out[keep], image[keep])
    red_before, red_after = (float(np.mean(_nearest(x[:32, :32]) == "red")) for x in (image, out))
    changed = float(np.abs(out[:32, :32].astype(np.int16) - image[:32, :32]).mean())
    assert kept_psnr >= MIN_KEPT_PSNR_DB, f"outside the mask: PSNR {kept_psnr:.1f} dB"
    assert changed >= 10 and red_after < 0.5 * red_before, \
        f"the masked area: mean change {changed:.1f}/255, red pixels {red_before:.0%} -> {red_after:.0%}"


def _nearest(rgb: np.ndarray) -> np.ndarray:
    """The nearest palette colour's name for every pixel."""
    names = list(demo.PALETTE)
    palette = np.array([demo.PALETTE[k] for k in names], np.float64)
    label = ((np.asarray(rgb, np.float64)[:, :, None] - palette[None, None]) ** 2).sum(-1).argmin(-1)
    return np.array(names)[label]


def test_tome_half_stays_close_to_no_merging(sd, record_property):
    prompt = PROMPTS[1][0]
    plain, merged = [np.asarray(sd.txt2img(prompt, steps=STEPS, sampler=SAMPLER, guidance_scale=7.0, seed=0,
                                           width=SIZE, height=SIZE, tome=ratio,
                                           progress=False).images[0].convert("RGB"))
                     for ratio in (0.0, 0.5)]
    value = psnr(merged, plain)
    record_property("tome_psnr_db", value)
    assert misses(merged, {k: demo.describe(plain)[k] for k in ("colour", "background", "position")}) == [], \
        f"ToMe 0.5 changed what the image shows (PSNR {value:.1f} dB against ratio 0)"
    assert value >= MIN_TOME_PSNR_DB, f"ToMe 0.5 vs 0: PSNR {value:.1f} dB"


def test_same_image_as_diffusers_from_the_same_x_t(sd, record_property):
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    prompt = PROMPTS[2][0]
    x_t = randn(np.random.Generator(np.random.PCG64(11)), (1, 4, SIZE // 8, SIZE // 8))
    ours = sd.txt2img(prompt, steps=STEPS, sampler=SAMPLER, guidance_scale=7.0, seed=11, latents=x_t,
                      width=SIZE, height=SIZE, progress=False).images[0]
    pipe = StableDiffusionPipeline.from_pretrained(demo_model_path(), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True,
                                                             algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompt, num_inference_steps=STEPS, guidance_scale=7.0, height=SIZE, width=SIZE,
               latents=torch.from_numpy(x_t).float()).images[0]
    a, b = np.asarray(ours.convert("RGB"), np.int16), np.asarray(ref.convert("RGB"), np.int16)
    diff = int(np.abs(a - b).max())
    record_property("parity", {"max_abs_diff": diff, "psnr_db": psnr(a, b)})
    assert diff <= MAX_PARITY_DIFF, f"max abs difference {diff}/255, PSNR {psnr(a, b):.1f} dB"
