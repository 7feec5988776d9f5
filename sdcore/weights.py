"""Strict weight loading for the sdcore model directory (docs/model-format.md).

Weight names in a converted directory are diffusers'/transformers' names, and sdcore's modules
mirror them, so loading is a loop that checks names and shapes (`check_state_dict`, against the
module built from the config: `expected_shapes`). The few names diffusers/transformers files carry
that are not sdcore's parameter names are the table below (`TEXT_MODEL_LEVEL`,
`LEGACY_VAE_ATTENTION`, `IGNORED_KEYS`); the renames of original (CompVis/Stability) checkpoints,
a different layout altogether, are the tables of sdcore/convert/original_*.py, applied once at
conversion.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sdcore import safetensors_file
from sdcore.errors import SdcoreError

# how messages name each component
TITLES = {"text_encoder": "text encoder", "unet": "UNet", "vae": "VAE"}

# component -> (package, config class, model class, weight file stem)
COMPONENTS = {
    "text_encoder": ("sdcore.clip", "CLIPTextConfig", "CLIPTextModel", "model"),
    "unet": ("sdcore.unet", "UNetConfig", "UNet2DConditionModel", "diffusion_pytorch_model"),
    "vae": ("sdcore.vae", "VAEConfig", "AutoencoderKL", "diffusion_pytorch_model"),
}

# ---- The exceptions to identical names, all of them

# The level transformers 4.x and the published SD checkpoints put above CLIPTextModel's names, which
# sdcore's names keep; transformers 5 saves and loads the model without it.
TEXT_MODEL_LEVEL = "text_model."

# The VAE's mid-block attention as diffusers < 0.14 saved it (its deprecated AttentionBlock, Linear
# layers like the current ones) -> the current names; diffusers renames them the same way on load.
LEGACY_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_VAE_ATTENTION = re.compile(r"(?<=\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.")

# Tensors that checkpoints carry but that are not parameters: dropped when found, never required.
IGNORED_KEYS = {
    "text_encoder": {"text_model.embeddings.position_ids"},  # a buffer of arange(77) in older transformers
    "unet": set(),
    "vae": set(),
}


def is_ignored_key(component: str, key: str) -> bool:
    """Whether `key` is a tensor a checkpoint of `component` may carry that is not a parameter.

    The text encoder's keys are matched with or without the "text_model." level (transformers 5
    saves CLIPTextModel without it).
    """
    ignored = IGNORED_KEYS[component]
    return key in ignored or (component == "text_encoder" and TEXT_MODEL_LEVEL + key in ignored)


def sdcore_names(component: str, state: dict[str, Any]) -> dict[str, Any]:
    """A diffusers/transformers state dict under sdcore's names: the text encoder's keys get the
    "text_model." level transformers 5 leaves out, the VAE's legacy attention names become the
    current ones; every other name is already sdcore's."""
    if component == "text_encoder":
        return {k if k.startswith(TEXT_MODEL_LEVEL) else TEXT_MODEL_LEVEL + k: v for k, v in state.items()}
    if component == "vae":
        return {_LEGACY_VAE_ATTENTION.sub(lambda m: f".{LEGACY_VAE_ATTENTION[m[1]]}.", k): v for k, v in state.items()}
    return state


def model_classes(component: str):
    """(ConfigClass, ModelClass) of a component."""
    package, config_name, model_name, _ = COMPONENTS[component]
    config_mod = importlib.import_module(package + ".config")
    model_mod = importlib.import_module(package + ".model")
    return getattr(config_mod, config_name), getattr(model_mod, model_name)


def build_module(component: str, config: dict, **kwargs):
    """The sdcore nn.Module of a component for a diffusers/transformers config dict."""
    config_cls, model_cls = model_classes(component)
    return model_cls(config_cls.from_dict(config), **kwargs)


def expected_shapes(component: str, config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape that the sdcore module of `component` has for `config`."""
    module = build_module(component, config)
    return {name: tuple(int(s) for s in p.shape) for name, p in module.named_parameters()}


def check_state_dict(component: str, state: dict[str, Any], expected: dict[str, tuple[int, ...]],
                     source: str = "", origin: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Strict match of a state dict against the expected parameters; returns it without ignored keys.

    Every tensor must be an expected parameter with its shape (or an ignored key), and every
    expected parameter must be present. `origin(name)` gives the key a tensor was read as, when
    the checkpoint names it differently (original-format checkpoints). Errors are one line naming
    the first offending key.
    """
    title = TITLES[component]
    where = f" in {source}" if source else ""

    def named(name: str) -> tuple[str, str]:  # (the checkpoint's key, " (would be ...)" or "")
        key = origin(name) if origin is not None else name
        return key, (f" ({title} {name})" if key != name else "")

    state = {k: v for k, v in state.items() if not is_ignored_key(component, k)}
    unknown = [k for k in state if k not in expected]
    if unknown:
        key, alias = named(unknown[0])
        raise SdcoreError(f"{title}: unknown key {key}{alias}{where}: not a parameter of the model its config "
                          f"describes ({len(unknown)} such tensor(s)).")
    for name, array in state.items():
        if tuple(array.shape) != expected[name]:
            key, _ = named(name)
            source_key = f" (from {key})" if key != name else ""
            raise SdcoreError(f"{title} key {name}{source_key}{where}: expected shape {expected[name]}, found "
                              f"{tuple(array.shape)}.")
    missing = [name for name in expected if name not in state]
    if missing:
        key, alias = named(missing[0])
        raise SdcoreError(f"{title} is missing {len(missing)} tensor(s), first {key}{alias}{where}: the checkpoint "
                          f"is truncated or does not match its config ({len(expected)} expected, {len(state)} found).")
    return state


def check_components(configs: dict[str, dict]) -> bool:
    """The three configs must make one model: the UNet's channels fit the VAE's latents, its
    cross-attention the text encoder's width. Returns whether the UNet is an inpainting one (latents,
    mask and masked-image latents in)."""
    unet, vae, text = (model_classes(c)[0].from_dict(configs[c]) for c in ("unet", "vae", "text_encoder"))
    latent = vae.latent_channels
    if unet.out_channels != latent or unet.in_channels not in (latent, 2 * latent + 1):
        raise SdcoreError(
            f"UNet takes {unet.in_channels} and gives {unet.out_channels} channels, the VAE has {latent} latent "
            f"channels: only text-to-image ({latent} in) and inpainting ({2 * latent + 1} in) UNets are supported.")
    if text.hidden_size != unet.cross_attention_dims[0]:
        raise SdcoreError(
            f"text encoder width {text.hidden_size} does not match the UNet's cross_attention_dim "
            f"{unet.cross_attention_dims[0]}: the components come from different models.")
    return unet.in_channels == 2 * latent + 1


def read_config(model_dir: str | Path, component: str) -> dict:
    path = Path(model_dir) / component / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SdcoreError(f"{path} is missing: is {model_dir} a converted sdcore model directory?") from None
    except json.JSONDecodeError as err:
        raise SdcoreError(f"{path} is not valid JSON ({err}).") from None


def weight_path(model_dir: str | Path, component: str) -> Path:
    return Path(model_dir) / component / (COMPONENTS[component][3] + ".safetensors")


def load_component(model_dir: str | Path, component: str, dtype: str = "float32",
                   convert: Callable[[np.ndarray], Any] | None = None) -> tuple[dict, dict[str, Any]]:
    """(config dict, checked state dict in `dtype`) of one component of a converted model directory.

    The names and shapes are checked from the file's header before any tensor is read; then each
    tensor is read with plain file reads (no memory map: its pages would stay resident until the
    file is closed) and passed through `convert` (e.g. to a device array) before the next one is
    read, so loading never holds two copies of the weights. `convert` must copy: the array it gets
    is a view of a buffer the next tensor overwrites.
    """
    config = read_config(model_dir, component)
    path = weight_path(model_dir, component)
    if not path.exists():
        raise SdcoreError(f"{path} is missing: is {model_dir} a converted sdcore model directory?")
    try:
        entries, _metadata = safetensors_file.read_header(path)
    except SdcoreError as err:
        raise SdcoreError(f"{err}; convert the model again.") from None
    entries = check_state_dict(component, entries, expected_shapes(component, config), source=str(path))
    state = {}
    # with `convert`, every tensor is read into one scratch buffer of the largest size: a fresh NumPy
    # array per tensor, freed after the copy, leaves the heap fragmented between the device arrays
    # (glibc keeps such holes)
    scratch = (np.empty(max((e.nbytes for e in entries.values()), default=0), np.uint8)
               if convert is not None else None)
    with open(path, "rb") as f:
        for name, entry in entries.items():
            array = safetensors_file.read_tensor(f, entry, scratch, path=str(path))
            if array.dtype.kind == "f":
                array = array.astype(dtype, copy=False)
            state[name] = convert(array) if convert is not None else array
    return config, state


def read_model_info(model_dir: str | Path) -> dict:
    """The directory's sdcore.json (family, prediction type, ...)."""
    path = Path(model_dir) / "sdcore.json"
    if not Path(model_dir).is_dir():
        raise SdcoreError(f"model directory {model_dir} does not exist.")
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise SdcoreError(f"{model_dir} is not an sdcore model directory (no sdcore.json): convert it first with "
                          f"`sdcore convert SRC --output DIR`.") from None
    except json.JSONDecodeError as err:
        raise SdcoreError(f"{path} is not valid JSON ({err}).") from None
    if info.get("format") != 1:
        raise SdcoreError(f"{path}: unknown format {info.get('format')!r} (this sdcore reads format 1).")
    return info
