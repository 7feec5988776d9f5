"""Single-file original-format (CompVis / Stability) SD1.x and SD2.x checkpoints -> diffusers components.

A LatentDiffusion checkpoint (CompVis/stablediffusion `ldm/models/diffusion/ddpm.py`) is one state
dict for the whole model:

    model.diffusion_model.*         UNet                      -> sdcore.convert.original_unet
    first_stage_model.*             VAE                       -> sdcore.convert.original_vae
    cond_stage_model.transformer.*  SD1.x text encoder (CLIP) -> sdcore.convert.original_clip
    cond_stage_model.model.*        SD2.x text encoder (OpenCLIP ViT-H/14 text tower)
    model_ema.*                     LitEma copy of the UNet: "model_ema." + the parameter's name
                                    under `model.` with the dots removed
    betas, alphas_cumprod, ...      buffers of the training schedule

`split_original` reads the family, the inpainting UNet and the architecture from the tensors
themselves (names and shapes), sorts every tensor into a component or an explicit ignore rule, and
renames it to diffusers/transformers names by reshape or slicing only (no arithmetic; dtype kept).
Anything no rule covers is an error. The tests check the result against diffusers' own single-file
conversion (`diffusers/loaders/single_file_utils.py`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import numpy as np

from sdcore import weights
from sdcore.convert import original_clip, original_unet, original_vae
from sdcore.convert.original_common import check_converted, convert_by_table
from sdcore.errors import SdcoreError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD1.x
OPENCLIP_PREFIX = "cond_stage_model.model."  # SD2.x
EMA_PREFIX = "model_ema."

# Tensors that are never converted, whatever the options: (full-name pattern, why).
IGNORE_RULES = (
    (re.compile(r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
                r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod"
                r"|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2"
                r"|lvlb_weights|logvar)"),
     "training-schedule buffers (the scheduler config defines the schedule)"),
    (re.compile(r"model_ema\.(decay|num_updates)"), "EMA bookkeeping (decay, num_updates)"),
    (re.compile(r"cond_stage_model\.model\.(text_projection|logit_scale)"),
     "OpenCLIP text_projection/logit_scale (SD2.x conditions on token states, not the pooled embedding)"),
    (re.compile(r"cond_stage_model\.model\.attn_mask"), "OpenCLIP causal-mask buffer"),
    (re.compile(r"cond_stage_model\.model\.visual\..+"), "OpenCLIP image tower (unused by SD2.x)"),
)

# Default image size in latents (diffusers' sample_size): the weights cannot tell a 512 px SD2.x base
# model from a 768 px one; 96 is stable-diffusion-2-1's value, inpainting models are 512 px.
SAMPLE_SIZE = {"sd1": 64, "sd2": 96, "inpainting": 64}


@dataclasses.dataclass
class OriginalSplit:
    unet: dict[str, np.ndarray]  # diffusers UNet2DConditionModel parameter names
    vae: dict[str, np.ndarray]  # diffusers AutoencoderKL names (to_q/to_k/to_v/to_out.0, Linear weights 2-D)
    text_encoder: dict[str, np.ndarray]  # transformers CLIPTextModel on-disk names ("text_model.embeddings...")
    unet_config: dict  # enough for UNet2DConditionModel(**unet_config)
    vae_config: dict  # enough for AutoencoderKL(**vae_config)
    text_encoder_config: dict  # transformers CLIPTextConfig dict
    family: str  # "sd1" | "sd2"
    inpainting: bool  # the UNet's conv_in takes 9 channels (latents, mask, masked-image latents)
    used_ema: bool
    ignored_keys: list[str]  # every tensor deliberately left out, each by a rule named in `notes`
    notes: list[str]  # one line each: what was decided


def _ignore_rule(key: str) -> str | None:
    """Why `key` is never converted, or None: the rules above, and the buffers weights.py ignores."""
    for pattern, why in IGNORE_RULES:
        if pattern.fullmatch(key):
            return why
    if key.startswith(CLIP_PREFIX) and weights.is_ignored_key("text_encoder", key[len(CLIP_PREFIX):]):
        return "buffers of the text encoder that are not parameters (position_ids)"
    return None


def _strip(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _example_keys(keys) -> str:
    """A few keys for a message, preferring ones no ignore rule covers (schedule buffers say little)."""
    keys = sorted(keys)
    telling = [k for k in keys if _ignore_rule(k) is None]
    return ", ".join((telling or keys)[:3]) or "no keys at all"


def ema_name(unet_key: str) -> str:
    """LitEma's name for `model.diffusion_model.<unet_key>`: the name under `model.` without dots."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def _choose_unet_weights(state, live, use_ema, ignored, notes) -> tuple[dict[str, np.ndarray], bool]:
    """Live UNet weights or the EMA copy, per `use_ema` (None: the EMA copy when it is complete)."""
    ema_keys = [k for k in state if k.startswith(EMA_PREFIX) and k not in ignored]
    names = {ema_name(k): k for k in live}
    if len(names) != len(live):
        raise SdcoreError("two model.diffusion_model.* keys have the same EMA name: cannot tell EMA tensors apart.")
    unknown = [k for k in ema_keys if k not in names]
    if unknown:
        raise SdcoreError(f"unknown key {unknown[0]}: not the EMA name of any {UNET_PREFIX}* tensor.")
    complete = bool(live) and len(ema_keys) == len(live)
    if use_ema and not complete:
        raise SdcoreError(
            f"EMA weights were asked for, but the checkpoint has {len(ema_keys)} of the {len(live)} EMA "
            f"tensors of the UNet ({EMA_PREFIX}*)."
        )
    use = complete if use_ema is None else bool(use_ema)
    if use:
        for k in live:
            ignored[UNET_PREFIX + k] = f"live UNet weights ({UNET_PREFIX}*; the EMA copy is used instead)"
        notes.append(f"EMA weights used ({len(ema_keys)} {EMA_PREFIX}* tensors).")
        return {k: state[ema_name(k)] for k in live}, True
    for k in ema_keys:
        ignored[k] = f"EMA copy of the UNet ({EMA_PREFIX}*; live weights used)"
    if ema_keys and not complete:
        notes.append(f"incomplete EMA copy ({len(ema_keys)} of {len(live)} tensors): live UNet weights used.")
    elif ema_keys:
        notes.append("live UNet weights used (EMA copy present but not asked for).")
    return live, False


def _convert_unet(tensors, family, notes) -> tuple[dict, dict]:
    layout, partial = original_unet.infer_unet_layout(tensors, UNET_PREFIX)
    inpainting = partial["in_channels"] == 9
    sample_size = SAMPLE_SIZE["inpainting" if inpainting else family]
    cfg = original_unet.unet_config(layout, partial, family=family, sample_size=sample_size)
    table = original_unet.unet_table(layout)
    converted = convert_by_table("UNet", UNET_PREFIX, tensors, table)
    state = check_converted("unet", converted, cfg, table, UNET_PREFIX)
    projection = "linear proj_in/proj_out" if cfg["use_linear_projection"] else "1x1-conv proj_in/proj_out"
    heads = (f"{cfg['attention_head_dim']} heads per attention (SD1.x convention)" if family == "sd1"
             else f"attention_head_dim {cfg['attention_head_dim']} "
                  f"({original_unet.SD2_HEAD_CHANNELS}-wide heads, SD2.x)")
    notes.append(
        f"UNet: block_out_channels {tuple(cfg['block_out_channels'])}, layers_per_block {cfg['layers_per_block']}, "
        f"cross_attention_dim {cfg['cross_attention_dim']}, {projection}, {heads}."
    )
    if family == "sd2":
        size = ("512 px, as SD2.x inpainting models" if inpainting
                else "768 px, as stable-diffusion-2-1; the weights cannot tell a 512 px base model from a 768 px one")
        notes.append(
            f"UNet: upcast_attention true (diffusers' SD2.x setting), sample_size {sample_size} ({size})."
        )
    return state, cfg


def _convert_vae(tensors, latent_sample_size, notes) -> tuple[dict, dict]:
    cfg = original_vae.vae_config(tensors, VAE_PREFIX, latent_sample_size=latent_sample_size)
    table = original_vae.vae_table(len(cfg["block_out_channels"]), cfg["layers_per_block"])
    converted = convert_by_table("VAE", VAE_PREFIX, tensors, table)
    state = check_converted("vae", converted, cfg, table, VAE_PREFIX)
    notes.append(
        f"VAE: block_out_channels {tuple(cfg['block_out_channels'])}, latent_channels {cfg['latent_channels']}; "
        "mid-block attention 1x1 convs q/k/v/proj_out -> Linear to_q/to_k/to_v/to_out.0."
    )
    return state, cfg


def _convert_text_encoder(state, family, ignored, notes) -> tuple[dict, dict]:
    if family == "sd1":
        tensors = {k: v for k, v in _strip(state, CLIP_PREFIX).items() if CLIP_PREFIX + k not in ignored}
        legacy, sizes = original_clip.read_hf_clip(tensors, CLIP_PREFIX)
        cfg = original_clip.text_encoder_config(family, sizes)
        table = original_clip.hf_clip_table(legacy, sizes["num_hidden_layers"])
        converted = convert_by_table("text encoder", CLIP_PREFIX, tensors, table)
        notes.append(
            f"SD1.x: CLIP text encoder ({CLIP_PREFIX}*{' without the text_model. level' if legacy else ''}), "
            f"width {sizes['hidden_size']}, {sizes['num_hidden_layers']} layers, quick_gelu."
        )
    else:
        tensors = {k: v for k, v in _strip(state, OPENCLIP_PREFIX).items() if OPENCLIP_PREFIX + k not in ignored}
        n_blocks, sizes = original_clip.read_open_clip(tensors, OPENCLIP_PREFIX)
        last = f"transformer.resblocks.{n_blocks - 1}."
        for k in [k for k in tensors if k.startswith(last)]:
            ignored[OPENCLIP_PREFIX + k] = (f"last OpenCLIP resblock ({OPENCLIP_PREFIX}{last}*; "
                                            "SD2.x uses the penultimate)")
            del tensors[k]
        cfg = original_clip.text_encoder_config(family, sizes)
        table = original_clip.open_clip_table(sizes["num_hidden_layers"])
        split, sources = original_clip.split_in_proj(tensors, OPENCLIP_PREFIX)
        converted = convert_by_table("text encoder", OPENCLIP_PREFIX, split, table, sources)
        notes.append(
            f"SD2.x: OpenCLIP text tower ({OPENCLIP_PREFIX}*), width {sizes['hidden_size']}, {n_blocks} resblocks; "
            f"text_encoder keeps {n_blocks - 1} (SD2.x uses the penultimate layer, then ln_final), gelu."
        )
    prefix = CLIP_PREFIX if family == "sd1" else OPENCLIP_PREFIX
    return check_converted("text_encoder", converted, cfg, table, prefix), cfg


def _family(keys: list[str]) -> str:
    """The family ("sd1" or "sd2") from the text encoder the checkpoint holds; one clear line when it is
    not an SD1.x/SD2.x checkpoint (no UNet, no VAE, no or both text encoders)."""
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise SdcoreError(
            f"no {UNET_PREFIX}* keys: not a Stable Diffusion 1.x/2.x checkpoint (found keys like "
            f"{_example_keys(keys)})."
        )
    if not any(k.startswith(VAE_PREFIX) for k in keys):
        raise SdcoreError(
            f"no {VAE_PREFIX}* (VAE) keys: the checkpoint has no VAE, or is not a Stable Diffusion 1.x/2.x "
            f"checkpoint (found keys like {_example_keys(k for k in keys if not k.startswith(UNET_PREFIX))})."
        )
    has_clip = any(k.startswith(CLIP_PREFIX) for k in keys)
    has_openclip = any(k.startswith(OPENCLIP_PREFIX) for k in keys)
    if has_clip == has_openclip:
        found = "both" if has_clip else "neither"
        raise SdcoreError(
            f"found {found} of {CLIP_PREFIX}* (SD1.x CLIP) and {OPENCLIP_PREFIX}* (SD2.x OpenCLIP) text encoder "
            f"keys: not a Stable Diffusion 1.x/2.x checkpoint (other keys like "
            f"{_example_keys(k for k in keys if not k.startswith((UNET_PREFIX, VAE_PREFIX)))})."
        )
    return "sd1" if has_clip else "sd2"


def split_original(state_dict: dict[str, np.ndarray], *, use_ema: bool | None = None) -> OriginalSplit:
    """Split an original-format SD1.x/SD2.x state dict into diffusers-named components and configs.

    `use_ema`: None takes the EMA copy of the UNet (`model_ema.*`) when a complete one is present,
    True requires it, False takes the live weights. Raises SdcoreError (one line) for anything that
    is not a complete SD1.x/SD2.x checkpoint: a missing component, an unknown key, a wrong shape.
    """
    for key, value in state_dict.items():
        if not isinstance(value, np.ndarray):
            raise SdcoreError(f"checkpoint tensor {key} is a {type(value).__name__}, not a NumPy array.")
    keys = list(state_dict)
    family = _family(keys)

    ignored: dict[str, str] = {}  # key -> the rule that leaves it out
    for key in keys:
        why = _ignore_rule(key)
        if why is not None:
            ignored[key] = why
    known = (UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX, OPENCLIP_PREFIX, EMA_PREFIX)
    unknown = [k for k in keys if k not in ignored and not k.startswith(known)]
    if unknown:
        raise SdcoreError(
            f"unknown key {unknown[0]} ({len(unknown)} unknown in all): not part of a Stable Diffusion 1.x/2.x "
            "checkpoint."
        )

    notes: list[str] = []
    live = _strip(state_dict, UNET_PREFIX)
    text_encoder, text_cfg = _convert_text_encoder(state_dict, family, ignored, notes)
    unet_tensors, used_ema = _choose_unet_weights(state_dict, live, use_ema, ignored, notes)
    unet, unet_cfg = _convert_unet(unet_tensors, family, notes)
    vae, vae_cfg = _convert_vae(_strip(state_dict, VAE_PREFIX), unet_cfg["sample_size"], notes)

    inpainting = weights.check_components({"unet": unet_cfg, "vae": vae_cfg, "text_encoder": text_cfg})
    if inpainting:
        notes.append(f"inpainting UNet: conv_in takes {unet_cfg['in_channels']} channels "
                     "(latents, mask, masked image).")

    for why in dict.fromkeys(ignored.values()):
        count = sum(1 for w in ignored.values() if w == why)
        notes.append(f"ignored {count} tensor(s): {why}.")
    return OriginalSplit(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        unet_config=unet_cfg,
        vae_config=vae_cfg,
        text_encoder_config=text_cfg,
        family=family,
        inpainting=inpainting,
        used_ema=used_ema,
        ignored_keys=sorted(ignored),
        notes=notes,
    )
