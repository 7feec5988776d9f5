"""Train sdcore's embedded demo model: a small latent diffusion model of procedurally drawn shapes.

    python tools/train_demo_model.py WORK [--seed 0] [--vae-steps N] [--decoder-steps N] [--unet-steps N]
    python tools/train_demo_model.py WORK --init-from MODEL_DIR   # stages 5-7 only, from stages 1-4's result
    python tools/train_demo_model.py WORK --export-only      # diffusers folder from the latest checkpoint
    python tools/train_demo_model.py WORK --evaluate         # sample with diffusers, score colour/position
    python tools/train_demo_model.py WORK --ship sdcore/models/shapes-demo   # convert into the package

The architecture is Stable Diffusion 1.x's, scaled down (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models"): an AutoencoderKL with 8x downsampling and 4 latent channels,
a CLIP text encoder on the real CLIP vocabulary (sdcore's shipped BPE merges), and a
UNet2DConditionModel with cross-attention, trained with classifier-free guidance dropout (Ho &
Salimans 2022) on SD's scaled-linear DDPM schedule. torch, diffusers and transformers are the training
framework (the test extra); the result is a diffusers pipeline folder that `tools/convert_weights.py`
turns into an sdcore model directory.

Data: 64x64 images of one shape (circle, square, triangle) in one of four colours at one of five
positions on one of three backgrounds, drawn with 4x supersampling, captioned like "a red circle at
the top left on a white background" (sometimes without the position or the background, which are
then random). Every random draw comes from `numpy.random.Generator(PCG64([seed, stage, step]))`, so
a run is deterministic given its seed, thread count and library versions; learning rates are constant
after warm-up and the saved weights are EMAs, so a run stopped at a checkpoint (every 100 steps, in
WORK/checkpoints) equals a shorter run, and a resumed run an uninterrupted one.

1. VAE: MSE + L1 reconstruction with the shape's pixels weighted 10x, a small KL term; no GAN or
   perceptual loss (flat colours need neither). `--colour-weight W` adds W x the squared error of
   each shape's mean colour (VAE and decoder stages; 0 in the shipped recipe, see docs/demo-model.md).
2. Latents: 8192 images encoded once; the scaling factor is 1 / std of their posterior means.
3. Decoder fine-tuning with the encoder frozen (SD's ft-MSE VAE recipe): sharper colours, same
   latents. Independent of stage 4, so `--decoder-only` can run it in a second process alongside.
4. UNet + text encoder jointly on posterior samples of those latents, v-prediction (`--prediction-type
   epsilon`: the first model's recipe, with the high-noise steps weighted up by `--high-noise-weight`,
   1/SNR clipped to [1, 5]; it never learnt positions), EMA of both.
5. Colour separation: encoder and decoder fine-tuned so that the same drawing in two shape colours
   lies at least `--separation-margin` apart in the scaled latent space (a hinge on the distance of
   each image's latent to its other-colour partner's), with the shape-colour loss on and the latents
   anchored to stage 3's (`--anchor-weight` x their mean squared drift). Red and yellow on white were
   1.6 apart before it, near the posterior noise, and the UNet painted them as one colour.
6. Latents again (new images) with the separated encoder; the scaling factor stays stage 2's.
7. UNet + text encoder fine-tuned on them from stage 4's EMA weights (new optimizer, its own data
   stream), `--finetune-steps`. The EMA weights of this stage are shipped. `--init-from DIR` starts
   at stage 5 from a model folder (stages 1-4 of an earlier run, e.g. the shipped model before it).

The shipped model is this script's defaults (docs/demo-model.md has the measured run time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SIZE = 64
SHAPES = ("circle", "square", "triangle")
# Shape colours and backgrounds are disjoint sets, so every caption names two distinct colours.
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (240, 210, 30)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
PALETTE = {**COLOURS, **BACKGROUNDS}
# name -> (caption phrase, centre (x, y) in pixels)
POSITIONS = {
    "top left": ("at the top left", (16, 16)),
    "top right": ("at the top right", (48, 16)),
    "bottom left": ("at the bottom left", (16, 48)),
    "bottom right": ("at the bottom right", (48, 48)),
    "center": ("in the center", (32, 32)),
}
SUPERSAMPLE = 4
P_NO_POSITION, P_NO_BACKGROUND = 0.2, 0.1  # caption variants (the rest name everything)
P_EMPTY_CAPTION = 0.1  # classifier-free guidance dropout

SHAPE_WEIGHT = 10.0  # VAE reconstruction weight of the shape's pixels against the background's

SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}

VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": SIZE,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [16, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8, "act_fn": "silu",
}
TEXT_CONFIG = {
    "vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 64, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
UNET_CONFIG = {
    "sample_size": SIZE // 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
    "cross_attention_dim": TEXT_CONFIG["hidden_size"], "attention_head_dim": 4,
}

DEFAULTS = {"seed": 0, "vae_steps": 1500, "vae_batch": 8, "vae_lr": 1e-3, "kl_weight": 1e-7, "vae_ema_decay": 0.99,
            "decoder_steps": 4000, "colour_weight": 0.0,
            "pool_size": 8192, "unet_steps": 12000, "unet_batch": 16, "unet_lr": 1e-3, "ema_decay": 0.998,
            "high_noise_weight": 5.0, "prediction_type": "v_prediction",
            "separation_steps": 600, "separation_lr": 3e-4, "separation_margin": 5.0, "anchor_weight": 0.1,
            "separation_colour_weight": 1.0, "finetune_steps": 3000,
            "checkpoint_every": 100}


# ----------------------------------------------------------------------------------------------
# data


def caption(colour: str, shape: str, position: str | None, background: str | None) -> str:
    text = f"a {colour} {shape}"
    if position is not None:
        text += " " + POSITIONS[position][0]
    if background is not None:
        text += f" on a {background} background"
    return text


def draw(shape: str, colour: str, position: str, background: str, rng: np.random.Generator) -> np.ndarray:
    """One [64, 64, 3] uint8 image; the centre jitters by up to 3 px and the size by about 15%."""
    cx, cy = POSITIONS[position][1]
    cx, cy = cx + rng.uniform(-3, 3), cy + rng.uniform(-3, 3)
    r = rng.uniform(9.5, 12.5)
    n = SIZE * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = coords[None, :], coords[:, None]  # [1, n], [n, 1]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    elif shape == "square":
        half = 0.85 * r
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # an upward triangle: apex above the centre, base below it
        top, base = cy - r, cy + 0.8 * r
        half_width = r * (y - top) / (base - top)
        inside = (y >= top) & (y <= base) & (np.abs(x - cx) <= half_width)
    coverage = inside.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))[..., None]  # [64, 64, 1]
    fg, bg = np.array(COLOURS[colour], np.float64), np.array(BACKGROUNDS[background], np.float64)
    return np.round(coverage * fg + (1 - coverage) * bg).astype(np.uint8)


def random_label(rng: np.random.Generator) -> dict:
    return {"shape": SHAPES[rng.integers(len(SHAPES))], "colour": list(COLOURS)[rng.integers(len(COLOURS))],
            "position": list(POSITIONS)[rng.integers(len(POSITIONS))],
            "background": list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]}


def random_caption(label: dict, rng: np.random.Generator) -> str:
    """The full caption, or (sometimes) one without the position or without the background."""
    u = rng.uniform()
    position = None if u < P_NO_POSITION else label["position"]
    background = None if P_NO_POSITION <= u < P_NO_POSITION + P_NO_BACKGROUND else label["background"]
    return caption(label["colour"], label["shape"], position, background)


def sample_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str], list[dict]]:
    """n random images [n, 64, 64, 3] uint8, their captions, and what each shows."""
    images, captions, labels = [], [], []
    for _ in range(n):
        label = random_label(rng)
        captions.append(random_caption(label, rng))
        images.append(draw(label["shape"], label["colour"], label["position"], label["background"], rng))
        labels.append(label)
    return np.stack(images), captions, labels


def describe(image) -> dict:
    """What an image shows, by a simple measure: every pixel takes the nearest palette colour; the
    most common is the background, the most common other one the shape's colour, whose pixels'
    centroid gives the nearest named position. Used by the evaluation here and by the tests."""
    rgb = np.asarray(image, dtype=np.float64)[..., :3]  # [H, W, 3]
    names = list(PALETTE)
    palette = np.array([PALETTE[k] for k in names], np.float64)  # [P, 3]
    dist = ((rgb[:, :, None, :] - palette[None, None]) ** 2).sum(-1)  # [H, W, P]
    label = dist.argmin(-1)
    counts = np.bincount(label.ravel(), minlength=len(names))
    bg = int(counts.argmax())
    counts_fg = counts.copy()
    counts_fg[bg] = 0
    fg = int(counts_fg.argmax())
    ys, xs = np.nonzero(label == fg)
    h, w = label.shape
    centroid = (float(xs.mean()) * SIZE / w, float(ys.mean()) * SIZE / h) if len(xs) else (SIZE / 2, SIZE / 2)
    position = min(POSITIONS, key=lambda p: math.dist(POSITIONS[p][1], centroid))
    return {"background": names[bg], "colour": names[fg], "position": position, "centroid": centroid,
            "shape_fraction": float(counts[fg]) / label.size}


# ----------------------------------------------------------------------------------------------
# training


def step_rng(seed: int, stage: int, step: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, stage, step]))


def lr_at(step: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then constant: with EMA weights (what is saved) instead of a decay, a run
    stopped at step N equals a run of N steps, so a run cut short is not lost."""
    return peak * min(1.0, (step + 1) / warmup)


def update_ema(ema, model, step: int, decay: float) -> None:
    import torch

    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.lerp_(p, 1 - decay)


def to_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W]


def build_models(seed: int, scaling_factor: float = 1.0):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=scaling_factor)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    unet = UNet2DConditionModel(**UNET_CONFIG)
    return vae, text_encoder, unet


def require_model_folder(folder: Path, hint: str) -> None:
    """Exit with one line unless folder holds a diffusers pipeline (an sdcore model directory does)."""
    if not (folder / "model_index.json").exists():
        raise SystemExit(f"error: {folder} is not a diffusers or sdcore model folder {hint}")


def load_pipeline_models(folder: Path):
    """VAE, text encoder and UNet of a diffusers folder (an sdcore model directory is one too)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return (AutoencoderKL.from_pretrained(str(folder), subfolder="vae").eval(),
            CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder"),
            UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet"))


def save_atomic(obj, path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


class Log:
    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def optimizer_step(opt, loss, params, lr: float) -> None:
    """One AdamW step at learning rate lr, gradients clipped to norm 1."""
    import torch

    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def resume_vae_stage(ckpt_path: Path, live, ema, opt, log: Log) -> tuple[int, float]:
    """Load a VAE stage's checkpoint (live and EMA weights, optimizer) where there is one; returns the
    step to go on from and the seconds spent so far."""
    import torch

    if not ckpt_path.exists():
        return 0, 0.0
    ckpt = torch.load(ckpt_path, weights_only=False)
    live.load_state_dict(ckpt["vae_live"])
    ema.load_state_dict(ckpt["vae"])
    opt.load_state_dict(ckpt["opt"])
    log(f"{ckpt_path.stem}: resumed at step {ckpt['step']}")
    return ckpt["step"], ckpt["elapsed"]


def save_vae_stage(ckpt_path: Path, live, ema, opt, step: int, elapsed: float) -> None:
    save_atomic({"vae": ema.state_dict(), "vae_live": live.state_dict(), "opt": opt.state_dict(),
                 "step": step, "elapsed": elapsed}, ckpt_path)


def reconstruction_loss(recon, x, labels, colour_weight: float = 0.0):
    """MSE + L1, the shape's pixels weighted SHAPE_WEIGHT times: the shape covers a tenth of the
    image, and without the weight the VAE learns the background first and paints every shape one
    muddy colour for a long time. With colour_weight > 0, plus that times the squared error of the
    shape's mean colour (over its fully covered pixels): it separates red from yellow on light
    backgrounds, which per-pixel errors leave close (docs/demo-model.md)."""
    import torch

    bg = np.array([BACKGROUNDS[lb["background"]] for lb in labels], np.float32)[:, :, None, None] / 127.5 - 1
    fg = np.array([COLOURS[lb["colour"]] for lb in labels], np.float32)[:, :, None, None] / 127.5 - 1
    shape = (x - torch.from_numpy(bg)).abs().sum(1, keepdim=True) > 0.02  # [B, 1, H, W]
    weight = 1.0 + (SHAPE_WEIGHT - 1.0) * shape.float()
    loss = torch.mean(weight * ((recon - x) ** 2 + torch.abs(recon - x))) / weight.mean()
    if colour_weight > 0:
        inside = ((x - torch.from_numpy(fg)).abs().sum(1, keepdim=True) < 0.02).float()  # [B, 1, H, W]
        mean_colour = (recon * inside).sum((2, 3)) / inside.sum((2, 3)).clamp(min=1.0)  # [B, 3]
        loss = loss + colour_weight * torch.mean((mean_colour - torch.from_numpy(fg[:, :, 0, 0])) ** 2)
    return loss


def train_decoder(vae, args, work: Path, log: Log):
    """Fine-tune the decoder (and post_quant_conv) with the encoder frozen, like SD's ft-MSE VAE:
    the latents, and so the UNet's data, do not change. Returns the VAE with the EMA decoder."""
    import copy

    import torch

    ckpt_path = work / "checkpoints" / "decoder.pt"
    live = copy.deepcopy(vae)
    params = list(live.decoder.parameters()) + list(live.post_quant_conv.parameters())
    live.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.vae_lr, weight_decay=0.0)
    ema = copy.deepcopy(vae).eval()
    start, elapsed = resume_vae_stage(ckpt_path, live, ema, opt, log)
    live.decoder.train()
    t0 = time.perf_counter() - elapsed
    for step in range(start, args.decoder_steps):
        rng = step_rng(args.seed, 5, step)
        images, _, labels = sample_batch(rng, args.vae_batch)
        x = to_tensor(images)
        with torch.no_grad():
            posterior = live.encode(x).latent_dist
        eps = torch.from_numpy(rng.standard_normal(posterior.mean.shape, dtype=np.float32))
        recon = live.decode(posterior.mean + posterior.std * eps).sample
        loss = reconstruction_loss(recon, x, labels, args.colour_weight)
        optimizer_step(opt, loss, params, lr_at(step, args.vae_lr))
        for name in ("decoder", "post_quant_conv"):
            update_ema(getattr(ema, name), getattr(live, name), step, args.vae_ema_decay)
        if step % 50 == 0 or step == args.decoder_steps - 1:
            mse = torch.mean((recon - x) ** 2).item()
            log(f"decoder step {step} loss {loss.item():.5f} (PSNR {10 * math.log10(4.0 / max(mse, 1e-12)):.1f} dB) "
                f"{time.perf_counter() - t0:.0f}s")
        if (step + 1) % args.checkpoint_every == 0 or step == args.decoder_steps - 1:
            save_vae_stage(ckpt_path, live, ema, opt, step + 1, time.perf_counter() - t0)
    return ema


def train_vae(vae, args, work: Path, log: Log):
    """Train the VAE; returns its EMA copy (the weights that are used from then on)."""
    import copy

    import torch

    ckpt_path = work / "checkpoints" / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ema = copy.deepcopy(vae).eval().requires_grad_(False)
    start, elapsed = resume_vae_stage(ckpt_path, vae, ema, opt, log)
    vae.train()
    t0 = time.perf_counter() - elapsed
    for step in range(start, args.vae_steps):
        rng = step_rng(args.seed, 1, step)
        images, _, labels = sample_batch(rng, args.vae_batch)
        x = to_tensor(images)
        posterior = vae.encode(x).latent_dist
        eps = torch.from_numpy(rng.standard_normal(posterior.mean.shape, dtype=np.float32))
        z = posterior.mean + posterior.std * eps
        recon = vae.decode(z).sample
        loss_rec = reconstruction_loss(recon, x, labels, args.colour_weight)
        mse = torch.mean((recon - x) ** 2)
        kl = posterior.kl().mean()  # summed over the latent, averaged over the batch
        loss = loss_rec + args.kl_weight * kl
        optimizer_step(opt, loss, vae.parameters(), lr_at(step, args.vae_lr))
        update_ema(ema, vae, step, args.vae_ema_decay)
        if step % 50 == 0 or step == args.vae_steps - 1:
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-12))
            log(f"vae step {step} loss {loss.item():.5f} mse {mse.item():.5f} (PSNR {psnr:.1f} dB) "
                f"kl {kl.item():.1f} {time.perf_counter() - t0:.0f}s")
        if (step + 1) % args.checkpoint_every == 0 or step == args.vae_steps - 1:
            save_vae_stage(ckpt_path, vae, ema, opt, step + 1, time.perf_counter() - t0)
    return ema


def colour_partner_batch(rng: np.random.Generator, n: int):
    """n random drawings and, for each, the same drawing (shape, position, jitter, size, background)
    in another shape colour: [n, 64, 64, 3] uint8 twice, and the labels of the first."""
    images, partners, labels = [], [], []
    for _ in range(n):
        label = random_label(rng)
        other = [c for c in COLOURS if c != label["colour"]][rng.integers(len(COLOURS) - 1)]
        jitter = int(rng.integers(2**63))  # the same draw() randomness for both
        for colour, out in ((label["colour"], images), (other, partners)):
            out.append(draw(label["shape"], colour, label["position"], label["background"],
                            np.random.Generator(np.random.PCG64(jitter))))
        labels.append(label)
    return np.stack(images), np.stack(partners), labels


def train_separation(vae, scaling_factor: float, args, work: Path, log: Log):
    """Fine-tune encoder and decoder so that every two shape colours are at least
    `separation_margin` apart in the (scaled) latent space for the same drawing, while the latents
    stay close to `vae`'s (the anchor: the UNet trained on them stays valid up to a short fine-tune).
    Without it red and yellow on white are 1.6 apart (black: 6.4), close to the posterior noise (1.3),
    and the UNet learns them as one colour (docs/demo-model.md). Returns the EMA VAE."""
    import copy

    import torch

    ckpt_path = work / "checkpoints" / "separation.pt"
    anchor = copy.deepcopy(vae).eval().requires_grad_(False)
    live = copy.deepcopy(vae).train().requires_grad_(True)
    ema = copy.deepcopy(vae).eval().requires_grad_(False)
    opt = torch.optim.AdamW(live.parameters(), lr=args.separation_lr, weight_decay=0.0)
    start, elapsed = resume_vae_stage(ckpt_path, live, ema, opt, log)
    t0 = time.perf_counter() - elapsed
    for step in range(start, args.separation_steps):
        rng = step_rng(args.seed, 6, step)
        images, partners, labels = colour_partner_batch(rng, args.vae_batch)
        x = to_tensor(images)
        posterior = live.encode(x).latent_dist
        partner_mean = live.encode(to_tensor(partners)).latent_dist.mean
        with torch.no_grad():
            anchor_mean = anchor.encode(x).latent_dist.mean
        eps = torch.from_numpy(rng.standard_normal(posterior.mean.shape, dtype=np.float32))
        recon = live.decode(posterior.mean + posterior.std * eps).sample
        loss_rec = reconstruction_loss(recon, x, labels, args.separation_colour_weight)
        drift = torch.mean((posterior.mean - anchor_mean) ** 2) * scaling_factor**2  # per element, scaled units
        distance = ((posterior.mean - partner_mean) * scaling_factor).flatten(1).norm(dim=1)  # [B]
        hinge = torch.mean(torch.relu(args.separation_margin - distance) ** 2)
        loss = loss_rec + args.anchor_weight * drift + hinge
        optimizer_step(opt, loss, live.parameters(), lr_at(step, args.separation_lr))
        update_ema(ema, live, step, args.vae_ema_decay)
        if step % 50 == 0 or step == args.separation_steps - 1:
            log(f"separation step {step} loss {loss.item():.5f} reconstruction {loss_rec.item():.5f} "
                f"drift {math.sqrt(drift.item()):.4f} colour distance min {distance.min().item():.2f} "
                f"mean {distance.mean().item():.2f} {time.perf_counter() - t0:.0f}s")
        if (step + 1) % args.checkpoint_every == 0 or step == args.separation_steps - 1:
            save_vae_stage(ckpt_path, live, ema, opt, step + 1, time.perf_counter() - t0)
    return ema


def latent_pool(vae, seed: int, n: int, work: Path, log: Log, name: str = "latents.pt", stage: int = 3,
                scaling_factor: float | None = None):
    """Posterior means and stds [n, 4, 8, 8] of n fresh images, with their labels: the UNet's data.
    Encoding once is 30% of a UNet step saved; each use draws a new posterior sample and caption.
    The scaling factor is 1 / the means' std unless given (the fine-tune keeps the first one)."""
    import torch

    path = work / "checkpoints" / name
    if path.exists():
        return torch.load(path, weights_only=False)
    rng = step_rng(seed, stage, 0)
    means, stds, labels = [], [], []
    with torch.no_grad():
        for _ in range(n // 64):
            images, _, batch_labels = sample_batch(rng, 64)
            posterior = vae.encode(to_tensor(images)).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
            labels += batch_labels
    pool = {"mean": torch.cat(means), "std": torch.cat(stds), "labels": labels}
    pool["scaling_factor"] = float(1.0 / pool["mean"].std()) if scaling_factor is None else scaling_factor
    save_atomic(pool, path)
    log(f"encoded {len(labels)} images; latent scaling factor {pool['scaling_factor']:.5f}")
    return pool


def train_unet(pool: dict, text_encoder, unet, args, work: Path, log: Log, steps: int | None = None,
               name: str = "unet.pt", stage: int = 2) -> dict:
    """Train UNet and text encoder from the given weights (stage 4; the fine-tune of stage 7 starts
    from stage 4's EMA weights with a new optimizer) for `steps`, checkpointing to WORK/checkpoints/name.
    Returns the EMA models, {"unet": ..., "text_encoder": ...}."""
    import copy

    import torch

    from sdcore.tokenizer import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_bpe_gz()
    ids_cache: dict[str, np.ndarray] = {}

    def tokens(texts):
        for t in texts:
            if t not in ids_cache:
                ids_cache[t] = tokenizer(t)[0]
        return torch.from_numpy(np.stack([ids_cache[t] for t in texts]))  # [N, 77]

    betas = np.linspace(SCHEDULE["beta_start"] ** 0.5, SCHEDULE["beta_end"] ** 0.5,
                        SCHEDULE["num_train_timesteps"], dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)

    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    ema = {"unet": copy.deepcopy(unet).eval(), "text_encoder": copy.deepcopy(text_encoder).eval()}
    for m in ema.values():
        m.requires_grad_(False)
    steps = args.unet_steps if steps is None else steps
    ckpt_path = work / "checkpoints" / name
    start, elapsed = 0, 0.0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        unet.load_state_dict(ckpt["unet"])
        text_encoder.load_state_dict(ckpt["text_encoder"])
        ema["unet"].load_state_dict(ckpt["ema_unet"])
        ema["text_encoder"].load_state_dict(ckpt["ema_text_encoder"])
        opt.load_state_dict(ckpt["opt"])
        start, elapsed = ckpt["step"], ckpt["elapsed"]
        log(f"{ckpt_path.stem}: resumed at step {start}")
    unet.train()
    text_encoder.train()
    t0 = time.perf_counter() - elapsed
    running = None
    for step in range(start, steps):
        rng = step_rng(args.seed, stage, step)
        b = args.unet_batch
        index = rng.integers(0, len(pool["labels"]), size=b)
        captions = [random_caption(pool["labels"][i], rng) for i in index]
        captions = ["" if rng.uniform() < P_EMPTY_CAPTION else c for c in captions]
        mean, std = pool["mean"][index], pool["std"][index]
        latent_eps = torch.from_numpy(rng.standard_normal(mean.shape, dtype=np.float32))
        x0 = (mean + std * latent_eps) * pool["scaling_factor"]  # [B, 4, 8, 8]
        t = rng.integers(0, SCHEDULE["num_train_timesteps"], size=b)
        noise = torch.from_numpy(rng.standard_normal(x0.shape, dtype=np.float32))
        ab = torch.from_numpy(alphas_cumprod[t].astype(np.float32))[:, None, None, None]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        context = text_encoder(tokens(captions))[0]  # [B, 77, C]
        pred = unet(xt, torch.from_numpy(t), context).sample
        snr = ab / (1 - ab)
        if args.prediction_type == "v_prediction":
            # v = sqrt(ab) eps - sqrt(1 - ab) x0: at high noise the target is (minus) the image itself,
            # so where the prompt puts the shape is the bulk of the target, not a 7% residual on top
            # of copying the noise through (epsilon at t = 999). Plain v-MSE = x0-MSE * (1 + SNR).
            target = ab.sqrt() * noise - (1 - ab).sqrt() * x0
            weight = torch.ones_like(snr)
        else:
            # Layout and colours are decided at high noise, where the epsilon error is small but the
            # x0 error it implies is large: weight those steps up to `high_noise_weight` (1/SNR, clipped).
            target = noise
            weight = (1 / snr).clamp(1.0, args.high_noise_weight)  # [B, 1, 1, 1]
        loss = torch.mean(weight * (pred - target) ** 2) / weight.mean()
        optimizer_step(opt, loss, params, lr_at(step, args.unet_lr))
        update_ema(ema["unet"], unet, step, args.ema_decay)
        update_ema(ema["text_encoder"], text_encoder, step, args.ema_decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            lr = opt.param_groups[0]["lr"]
            log(f"{ckpt_path.stem} step {step} loss {loss.item():.4f} (avg {running:.4f}) lr {lr:.2e} "
                f"{time.perf_counter() - t0:.0f}s")
        if (step + 1) % args.checkpoint_every == 0 or step == steps - 1:
            save_atomic({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
                         "ema_unet": ema["unet"].state_dict(), "ema_text_encoder": ema["text_encoder"].state_dict(),
                         "opt": opt.state_dict(), "step": step + 1, "elapsed": time.perf_counter() - t0}, ckpt_path)
    return ema


# ----------------------------------------------------------------------------------------------
# export and evaluation


def export(work: Path, seed: int, log: Log, prediction_type: str) -> Path:
    """Write WORK/diffusers, a diffusers StableDiffusionPipeline folder, from the latest checkpoints
    (EMA weights; the fine-tuned ones where stages 5-7 ran)."""
    import tempfile

    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from sdcore.tokenizer import write_vocab_files

    def latest(*names: str) -> Path:
        return next((work / "checkpoints" / n for n in names if (work / "checkpoints" / n).exists()),
                    work / "checkpoints" / names[-1])

    scaling_factor = torch.load(latest("finetune_latents.pt", "latents.pt"), weights_only=False)["scaling_factor"]
    vae, text_encoder, unet = build_models(seed, scaling_factor=scaling_factor)
    vae.load_state_dict(torch.load(latest("separation.pt", "decoder.pt", "vae.pt"), weights_only=False)["vae"])
    unet_ckpt = latest("finetune.pt", "unet.pt")
    ckpt = torch.load(unet_ckpt, weights_only=False)
    unet.load_state_dict(ckpt["ema_unet"])
    text_encoder.load_state_dict(ckpt["ema_text_encoder"])
    with tempfile.TemporaryDirectory() as tmp:
        write_vocab_files(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    # SD's own scheduler settings (convert.DEFAULT_SCHEDULER); samplers are chosen at generation time.
    scheduler = PNDMScheduler(**SCHEDULE, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                              prediction_type=prediction_type, timestep_spacing="leading")
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    out = work / "diffusers"
    pipe.save_pretrained(out, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; write the classic vocab.json + merges.txt folder instead.
    shutil.rmtree(out / "tokenizer")
    write_vocab_files(out / "tokenizer")
    log(f"exported {out} ({ckpt['step']} steps of {unet_ckpt.name}, "
        f"scaling factor {scaling_factor:.5f})")
    return out


def evaluation_prompts() -> list[tuple[str, dict]]:
    """Every colour x position x background, the shape cycling: 60 captions and what they ask for."""
    prompts = []
    for i, (colour, position, background) in enumerate(
            (c, p, b) for c in COLOURS for p in POSITIONS for b in BACKGROUNDS):
        shape = SHAPES[i % len(SHAPES)]
        prompts.append((caption(colour, shape, position, background),
                        {"colour": colour, "position": position, "background": background}))
    return prompts


def evaluate(folder: Path, log: Log, guidance_scales=(7.0, 1.0), seeds=(0, 1, 2), steps: int = 20) -> dict:
    """Sample every evaluation prompt with diffusers (DPM++ 2M Karras) and score it with `describe`."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    require_model_folder(folder, "(run the training or --export-only first)")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = evaluation_prompts()
    results = {}
    for g in guidance_scales:
        hits = {"colour": 0, "position": 0, "background": 0, "all": 0}
        total = 0
        for seed in seeds:
            texts = [p for p, _ in prompts]
            images = pipe(texts, num_inference_steps=steps, guidance_scale=g, height=SIZE, width=SIZE,
                          generator=[torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(texts))],
                          output_type="np").images
            for image, (_, want) in zip(images, prompts):
                got = describe(np.round(image * 255))
                ok = {k: got[k] == want[k] for k in ("colour", "position", "background")}
                for k, v in ok.items():
                    hits[k] += v
                hits["all"] += all(ok.values())
                total += 1
        results[g] = {k: v / total for k, v in hits.items()}
        log(f"evaluation, guidance {g}: " + ", ".join(f"{k} {v:.0%}" for k, v in results[g].items())
            + f" ({total} images)")
    return results


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work", type=Path, help="folder for checkpoints, the log and the diffusers export")
    for key, value in DEFAULTS.items():
        parser.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    # One thread: on a shared 2-core machine, two OpenMP threads that wait on each other ran 10x slower.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--stop-after-vae", action="store_true")
    parser.add_argument("--decoder-only", action="store_true", help="stop after the decoder fine-tuning")
    parser.add_argument("--export-only", action="store_true")
    parser.add_argument("--init-from", type=Path, help="skip stages 1-4: start stage 5 from this model folder")
    parser.add_argument("--evaluate", action="store_true", help="sample the exported model and score it")
    parser.add_argument("--ship", type=Path, help="convert WORK/diffusers into this sdcore model directory")
    args = parser.parse_args(argv)
    if args.init_from:
        require_model_folder(args.init_from, "(--init-from)")

    import torch

    torch.set_num_threads(args.threads)
    (args.work / "checkpoints").mkdir(parents=True, exist_ok=True)
    log = Log(args.work / "train.log")
    if args.ship:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        subprocess.run([sys.executable, str(ROOT / "tools" / "convert_weights.py"), str(args.work / "diffusers"),
                        "--output", str(args.ship), "--overwrite"], check=True, env=env)
        return 0
    if args.evaluate:
        evaluate(args.work / "diffusers", log)
        return 0
    if args.export_only:
        export(args.work, args.seed, log, args.prediction_type)
        return 0

    log(f"training with {json.dumps(vars(args), default=str)}")
    started = time.perf_counter()
    if args.init_from:  # stages 1-4 done: a diffusers folder (or sdcore model directory) of their result
        vae, text_encoder, unet = load_pipeline_models(args.init_from)
        scaling_factor = vae.config.scaling_factor
        log(f"stages 1-4 from {args.init_from} (scaling factor {scaling_factor:.5f})")
    else:
        vae, text_encoder, unet = build_models(args.seed)
        vae = train_vae(vae, args, args.work, log)
        pool = latent_pool(vae, args.seed, args.pool_size, args.work, log)
        if args.stop_after_vae:
            return 0
        vae = train_decoder(vae, args, args.work, log)  # independent of the UNet: its own process with --decoder-only
        if args.decoder_only:
            return 0
        ema = train_unet(pool, text_encoder, unet, args, args.work, log)
        scaling_factor = pool["scaling_factor"]
        unet.load_state_dict(ema["unet"].state_dict())  # stage 7 starts from the EMA weights
        text_encoder.load_state_dict(ema["text_encoder"].state_dict())
    vae = train_separation(vae, scaling_factor, args, args.work, log)
    pool = latent_pool(vae, args.seed, args.pool_size, args.work, log, name="finetune_latents.pt", stage=8,
                       scaling_factor=scaling_factor)
    train_unet(pool, text_encoder, unet, args, args.work, log, steps=args.finetune_steps, name="finetune.pt",
               stage=7)
    export(args.work, args.seed, log, args.prediction_type)
    log(f"done in {time.perf_counter() - started:.0f}s of this process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
