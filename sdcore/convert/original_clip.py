"""The text encoder of an original-format checkpoint -> transformers CLIPTextModel names.

SD1.x (`cond_stage_model.transformer.*`): ldm's FrozenCLIPEmbedder wraps a transformers
CLIPTextModel (openai/clip-vit-large-patch14), so the names already are transformers' own; old
checkpoints lack the `text_model.` level. SD2.x (`cond_stage_model.model.*`): FrozenOpenCLIPEmbedder
wraps OpenCLIP's ViT-H/14 text tower (open_clip/transformer.py: `resblocks` of nn.MultiheadAttention
with q, k, v fused in `in_proj_*`). SD2.x conditions on the penultimate resblock's output followed by
`ln_final`, so diffusers' text_encoder (stabilityai/stable-diffusion-2-1) is a CLIPTextModel with one
layer fewer than the tower: the last resblock is never used.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from sdcore.convert.original_common import ModuleRename, get, indices, require_contiguous
from sdcore.errors import SdcoreError

COMPONENT = "text encoder"

# Both towers use 64-wide heads (ViT-L/14 text: 768 / 12, ViT-H/14 text: 1024 / 16); the head count
# is not visible in the weights.
HEAD_WIDTH = 64

OPENCLIP_LAYER_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn": "self_attn",  # q_proj/k_proj/v_proj (split below) and out_proj keep their names
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}

# What differs between the two families beyond the weights (values of the real text_encoder configs
# of stable-diffusion-v1-5 and stable-diffusion-2-1).
FAMILY_SETTINGS = {
    "sd1": {"hidden_act": "quick_gelu", "projection_dim": None},  # None: the hidden size (768)
    "sd2": {"hidden_act": "gelu", "projection_dim": 512},
}


def hf_clip_table(legacy: bool, n_layers: int) -> list[ModuleRename]:
    """SD1.x: the names are transformers' already, only the `text_model.` level may be missing."""
    source = "" if legacy else "text_model."
    return [
        ModuleRename(f"{source}embeddings", "text_model.embeddings"),
        ModuleRename(f"{source}final_layer_norm", "text_model.final_layer_norm"),
    ] + [ModuleRename(f"{source}encoder.layers.{i}", f"text_model.encoder.layers.{i}") for i in range(n_layers)]


def open_clip_table(n_layers: int) -> list[ModuleRename]:
    """SD2.x: every OpenCLIP text-tower tensor that the 23-layer text_encoder uses, with its name."""
    return [
        ModuleRename("token_embedding", "text_model.embeddings.token_embedding"),
        ModuleRename("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        ModuleRename("ln_final", "text_model.final_layer_norm"),
    ] + [
        ModuleRename(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", OPENCLIP_LAYER_RENAMES)
        for i in range(n_layers)
    ]


def read_hf_clip(tensors: Mapping[str, np.ndarray], prefix: str) -> tuple[bool, dict]:
    """(legacy names without `text_model.`, sizes) of an SD1.x text encoder."""
    with_level = [name for name in tensors if name.startswith("text_model.")]
    if with_level and len(with_level) != len(tensors):
        odd = next(name for name in tensors if not name.startswith("text_model."))
        raise SdcoreError(f"unknown key {prefix}{odd}: the other text encoder keys are under {prefix}text_model.")
    legacy = not with_level
    source = "" if legacy else "text_model."
    token = get(COMPONENT, tensors, f"{source}embeddings.token_embedding.weight", prefix, 2)
    position = get(COMPONENT, tensors, f"{source}embeddings.position_embedding.weight", prefix, 2)
    n_layers = require_contiguous(COMPONENT, "encoder layers", indices(tensors, f"{source}encoder.layers."))
    fc1 = get(COMPONENT, tensors, f"{source}encoder.layers.0.mlp.fc1.weight", prefix, 2)
    sizes = {
        "vocab_size": int(token.shape[0]),
        "hidden_size": int(token.shape[1]),
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": n_layers,
        "max_position_embeddings": int(position.shape[0]),
    }
    return legacy, sizes


def read_open_clip(tensors: Mapping[str, np.ndarray], prefix: str) -> tuple[int, dict]:
    """(number of resblocks, sizes of the text_encoder) of an SD2.x OpenCLIP text tower."""
    token = get(COMPONENT, tensors, "token_embedding.weight", prefix, 2)
    position = get(COMPONENT, tensors, "positional_embedding", prefix, 2)
    n_blocks = require_contiguous(COMPONENT, "resblocks", indices(tensors, "transformer.resblocks."))
    if n_blocks < 2:
        raise SdcoreError(
            f"text encoder: {prefix}transformer.resblocks has {n_blocks} block(s); SD2.x needs at least 2 "
            "(it uses the penultimate one)."
        )
    fc = get(COMPONENT, tensors, "transformer.resblocks.0.mlp.c_fc.weight", prefix, 2)
    sizes = {
        "vocab_size": int(token.shape[0]),
        "hidden_size": int(token.shape[1]),
        "intermediate_size": int(fc.shape[0]),
        "num_hidden_layers": n_blocks - 1,
        "max_position_embeddings": int(position.shape[0]),
    }
    return n_blocks, sizes


def split_in_proj(tensors: Mapping[str, np.ndarray], prefix: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """nn.MultiheadAttention's fused `attn.in_proj_weight` [3H, H] / `in_proj_bias` [3H] -> q, k, v.

    Returns the tensors with each fused one replaced by `attn.q_proj.*`, `attn.k_proj.*`,
    `attn.v_proj.*` (row slices: views, no copy), and the fused key each piece came from.
    """
    out: dict[str, np.ndarray] = {}
    sources: dict[str, str] = {}
    for name, array in tensors.items():
        block, fused, kind = name.rpartition(".attn.in_proj_")
        if not fused:
            out[name] = array
            continue
        if array.ndim not in (1, 2) or array.shape[0] % 3:
            raise SdcoreError(
                f"text encoder key {prefix}{name}: expected 3 stacked projections, found shape {tuple(array.shape)}."
            )
        width = array.shape[0] // 3
        for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
            piece = f"{block}.attn.{part}.{kind}"
            out[piece] = array[i * width:(i + 1) * width]  # rows [i*H, (i+1)*H) of [3H, ...]
            sources[piece] = prefix + name
    return out, sources


def text_encoder_config(family: str, sizes: dict) -> dict:
    """transformers CLIPTextConfig dict (text_encoder/config.json) for the sizes read off the weights."""
    hidden = sizes["hidden_size"]
    if hidden % HEAD_WIDTH:
        raise SdcoreError(f"text encoder width {hidden} is not a multiple of the CLIP head width {HEAD_WIDTH}.")
    settings = FAMILY_SETTINGS[family]
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": sizes["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": sizes["intermediate_size"],
        "projection_dim": settings["projection_dim"] or hidden,
        "num_hidden_layers": sizes["num_hidden_layers"],
        "num_attention_heads": hidden // HEAD_WIDTH,
        "max_position_embeddings": sizes["max_position_embeddings"],
        "hidden_act": settings["hidden_act"],
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        # The token ids of the original configs (eos 2 makes transformers pool at the largest id,
        # which is <|endoftext|>); they do not change the hidden states SD uses.
        "pad_token_id": 1,
        "bos_token_id": 0,
        "eos_token_id": 2,
    }
