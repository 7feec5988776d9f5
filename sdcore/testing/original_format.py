"""Write diffusers/transformers models in the original single-file (CompVis / Stability) layout.

Test-side only (tests/parity/test_convert_original.py, sdcore.testing.checkpoints): the inverse of
sdcore/convert/original*.py, written separately and from the original module trees (ldm
`openaimodel.py` UNetModel, ldm `model.py` Encoder/Decoder, transformers CLIPTextModel as wrapped by
FrozenCLIPEmbedder, open_clip's text Transformer as wrapped by FrozenOpenCLIPEmbedder).
test_convert_original.py checks that diffusers' own single-file conversion reads these dicts back
into the models they came from, which shows they look like real checkpoints.
Works on torch tensors (meta tensors included: nothing here reads values); torch is imported by the
functions that make tensors, so importing this module needs no torch.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."
OPENCLIP = "cond_stage_model.model."

# diffusers ResnetBlock2D -> ldm ResBlock sub-modules.
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _resnet(rest: str) -> str:
    module, _, param = rest.partition(".")
    return f"{_RESNET[module]}.{param}"


def _unet_key(name: str, per_block: int, up_attention: list[bool]) -> str:
    module, _, param = name.rpartition(".")
    if module in _UNET_FIXED:
        return f"{_UNET_FIXED[module]}.{param}"
    # Flat numbering: input_blocks.0 is conv_in; each down level takes per_block entries plus one
    # for its downsampler; each up level takes per_block + 1 entries.
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"input_blocks.{1 + int(m[1]) * (per_block + 1) + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
        return f"input_blocks.{1 + int(m[1]) * (per_block + 1) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", name):
        return f"input_blocks.{(int(m[1]) + 1) * (per_block + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d)\.(.+)", name):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", name):
        return f"output_blocks.{int(m[1]) * (per_block + 1) + int(m[2])}.0.{_resnet(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", name):
        return f"output_blocks.{int(m[1]) * (per_block + 1) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", name):
        block = int(m[1])
        slot = 2 if up_attention[block] else 1  # after the attention, when the block has one
        return f"output_blocks.{block * (per_block + 1) + per_block}.{slot}.conv.{m[2]}"
    raise KeyError(f"no original name for UNet parameter {name}")


def unet_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    up_attention = [t == "CrossAttnUpBlock2D" for t in config["up_block_types"]]
    return {UNET + _unet_key(k, config["layers_per_block"], up_attention): v for k, v in state.items()}


def ema_entries(unet_original: dict[str, torch.Tensor], num_updates: int = 1234) -> dict[str, torch.Tensor]:
    """LitEma's copy: "model_ema." + the name below "model." without dots, plus its two counters."""
    import torch

    out = {"model_ema." + k[len("model."):].replace(".", ""): v for k, v in unet_original.items()}
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.num_updates"] = torch.tensor(num_updates, dtype=torch.int32)
    return out


def schedule_buffers(steps: int = 1000) -> dict[str, torch.Tensor]:
    """The buffers LatentDiffusion.register_schedule stores (scaled-linear betas)."""
    import torch

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
    buffers = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
    }
    return {k: v.float() for k, v in buffers.items()}


def vae_to_original(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    last = len(config["block_out_channels"]) - 1
    renames = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        # ldm numbers the decoder's up list by resolution: diffusers' up_blocks.0 is up.<last>.
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{last - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{last - int(m[1])}.upsample."),
        (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
        (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
        (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
        (r"\.mid_block\.attentions\.0\.to_(q|k|v)\.", r".mid.attn_1.\1."),
        (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    out = {}
    for name, value in state.items():
        new = name
        for pattern, replacement in renames:
            new = re.sub(pattern, replacement, new)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention is 1x1 convs: [O, I] -> [O, I, 1, 1]
        out[VAE + new] = value
    return out


def clip_to_original(state: dict[str, torch.Tensor], *, legacy: bool = False) -> dict[str, torch.Tensor]:
    """SD1.x: FrozenCLIPEmbedder's transformers CLIPTextModel; `legacy` drops the text_model. level
    (checkpoints saved with transformers < 4.20), and the position_ids buffer is written as they were."""
    import torch

    level = "" if legacy else "text_model."
    out = {f"{CLIP}{level}{k.removeprefix('text_model.')}": v for k, v in state.items()}
    positions = state[next(k for k in state if k.endswith("position_embedding.weight"))].shape[0]
    out[f"{CLIP}{level}embeddings.position_ids"] = torch.arange(positions)[None]
    return out


_OPENCLIP_LAYER = [
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
]


def open_clip_to_original(
    state: dict[str, torch.Tensor], last_block: dict[str, torch.Tensor], head: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """SD2.x: open_clip's text tower. The transformers model has one layer fewer than the tower, so
    `last_block` (open_clip names below resblocks.N.) supplies the unused last resblock, and `head`
    the text_projection/logit_scale SD never uses."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        f"{OPENCLIP}token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        f"{OPENCLIP}positional_embedding": state.pop("embeddings.position_embedding.weight"),
        f"{OPENCLIP}ln_final.weight": state.pop("final_layer_norm.weight"),
        f"{OPENCLIP}ln_final.bias": state.pop("final_layer_norm.bias"),
    }
    n_layers = 1 + max(int(k.split(".")[2]) for k in state)
    for i in range(n_layers):
        layer, block = f"encoder.layers.{i}.", f"{OPENCLIP}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):  # nn.MultiheadAttention stacks q, k, v along dim 0
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{layer}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
        for new, old in _OPENCLIP_LAYER:
            for kind in ("weight", "bias"):
                out[f"{block}{old}.{kind}"] = state.pop(f"{layer}{new}.{kind}")
    assert not state, f"unconverted text encoder tensors: {sorted(state)}"
    out.update({f"{OPENCLIP}transformer.resblocks.{n_layers}.{k}": v for k, v in last_block.items()})
    out.update({f"{OPENCLIP}{k}": v for k, v in head.items()})
    return out


def open_clip_block_shapes(hidden: int, inner: int) -> dict[str, tuple[int, ...]]:
    """The tensors of one open_clip ResidualAttentionBlock (names below resblocks.N.)."""
    return {
        "ln_1.weight": (hidden,), "ln_1.bias": (hidden,),
        "attn.in_proj_weight": (3 * hidden, hidden), "attn.in_proj_bias": (3 * hidden,),
        "attn.out_proj.weight": (hidden, hidden), "attn.out_proj.bias": (hidden,),
        "ln_2.weight": (hidden,), "ln_2.bias": (hidden,),
        "mlp.c_fc.weight": (inner, hidden), "mlp.c_fc.bias": (inner,),
        "mlp.c_proj.weight": (hidden, inner), "mlp.c_proj.bias": (hidden,),
    }


def to_original(unet_state, vae_state, text_state, *, family: str, unet_config, vae_config,
                text_config, seed: int = 4) -> dict[str, torch.Tensor]:
    """A whole single-file checkpoint (UNet, VAE, text encoder, schedule buffers) of one family.

    SD2.x's unused last open_clip block and projection head get seeded random values.
    """
    import torch

    ckpt = {k: v for k, v in schedule_buffers().items()}
    ckpt.update(unet_to_original(unet_state, unet_config))
    ckpt.update(vae_to_original(vae_state, vae_config))
    if family == "sd1":
        ckpt.update(clip_to_original(text_state))
        return ckpt
    generator = torch.Generator().manual_seed(seed)
    hidden, inner = text_config.hidden_size, text_config.intermediate_size
    last = {k: torch.randn(s, generator=generator) for k, s in open_clip_block_shapes(hidden, inner).items()}
    head = {"text_projection": torch.randn((hidden, hidden), generator=generator), "logit_scale": torch.tensor(4.6)}
    ckpt.update(open_clip_to_original(text_state, last, head))
    return ckpt
