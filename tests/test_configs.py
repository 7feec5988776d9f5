"""Every field of diffusers' `UNet2DConditionModel` and `AutoencoderKL` configs and of transformers'
`CLIPTextConfig` (read off their `__init__` signatures and saved configs, so a field a new release
adds shows up here) is honoured, ignored with a stated reason, or refused in one line by
sdcore's configs (sdcore/config.py), never a traceback and never silently dropped.

Honoured fields that shape the network are checked against the reference directly: a tiny config
with a non-default value builds an sdcore module whose parameter names and shapes equal the
reference model's (no compile, milliseconds). Fields that change values but no shape are named in
VALUE_FIELDS with the parity test that compares sdcore's outputs with the reference for a
non-default value.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest

diffusers = pytest.importorskip("diffusers", reason="diffusers is the reference whose config fields are walked")
transformers = pytest.importorskip("transformers", reason="transformers is the reference of the text encoder config")
torch = pytest.importorskip("torch")

from sdcore import weights  # noqa: E402
from sdcore.clip.config import CLIPTextConfig  # noqa: E402
from sdcore.errors import SdcoreError  # noqa: E402
from sdcore.unet.config import UNetConfig  # noqa: E402
from sdcore.vae.config import VAEConfig  # noqa: E402

# Tiny bases: two levels, one attention level, every code path in milliseconds.
UNET_BASE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
                 attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
VAE_BASE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
CLIP_BASE = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=16)

# Honoured fields that change parameter shapes -> a non-default value (on top of the base).
UNET_SHAPE_VARIANTS = {
    "in_channels": 9,
    "out_channels": 3,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (16, 48),
    "layers_per_block": (2, 1),
    "norm_num_groups": 16,
    "cross_attention_dim": 24,
    "transformer_layers_per_block": 2,
    "use_linear_projection": True,
    "only_cross_attention": True,  # attn1 attends to the text: its to_k/to_v take cross_attention_dim
    "time_embedding_dim": 48,
    "conv_in_kernel": 5,
    "conv_out_kernel": 1,
}
VAE_SHAPE_VARIANTS = {
    "in_channels": 4,
    "out_channels": 1,
    "block_out_channels": (8, 16),
    "layers_per_block": 2,
    "latent_channels": 8,
    "norm_num_groups": 4,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": False,
    "down_block_types": ("DownEncoderBlock2D",) * 3,  # with three of each, three levels
}
CLIP_SHAPE_VARIANTS = {
    "vocab_size": 50,
    "hidden_size": 48,
    "intermediate_size": 40,
    "num_hidden_layers": 3,
    "max_position_embeddings": 24,
}
_VAE_VARIANT_EXTRAS = {
    "down_block_types": dict(up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16)),
}

# Honoured fields that change values, not shapes -> where sdcore reads them, and the parity test that
# compares sdcore with the reference for a non-default value.
VALUE_FIELDS = {
    "unet": {
        "flip_sin_to_cos": "Timesteps; test_unet_parity.py sd2-style (False)",
        "freq_shift": "Timesteps; test_unet_parity.py sd2-style (1)",
        "mid_block_type": "one value implemented (UNetMidBlock2DCrossAttn), others refused",
        "downsample_padding": "Downsample2D; test_unet_parity.py sd2-style (0)",
        "mid_block_scale_factor": "UNetMidBlock2DCrossAttn; test_unet_parity.py sd2-style (1.5)",
        "act_fn": "silu/swish implemented, others refused",
        "norm_eps": "every GroupNorm; test_unet_parity.py",
        "attention_head_dim": "the head count; test_unet_parity.py sd1-style (3), sd2-style (per block)",
        "upcast_attention": "float32 attention scores; test_unet_parity.py sd2-style",
        "sample_size": "the pipeline's default image size (int or [h, w]); not part of the network",
    },
    "vae": {
        "act_fn": "silu/swish implemented, others refused",
        "up_block_types": "one value implemented (UpDecoderBlock2D), others refused",
        "sample_size": "the training resolution (int or [h, w]); not part of the network",
        "scaling_factor": "host-side latent scaling in the pipeline (pipeline tests)",
        "shift_factor": "only null implemented (the pipeline applies scaling_factor only), others refused",
    },
    "text_encoder": {
        "num_attention_heads": "the head split of every attention; test_clip_parity.py",
        "hidden_act": "quick_gelu/gelu; test_clip_parity.py (both)",
        "layer_norm_eps": "every LayerNorm; test_clip_parity.py",
        "eos_token_id": "the pooled position; test_clip_parity.py (2 and a real id)",
    },
}

CLASSES = {"unet": UNetConfig, "vae": VAEConfig, "text_encoder": CLIPTextConfig}


def _reference_fields(component: str) -> set[str]:
    """Every key a reference config may hold: its constructor's parameters and what it saves."""
    if component == "text_encoder":
        cls = transformers.CLIPTextConfig
        params = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
        saved = set(cls().to_dict())
        # PretrainedConfig's own constructor takes the generic fields every model config carries
        generic = set(inspect.signature(transformers.PretrainedConfig.__init__).parameters) - {"self", "kwargs"}
        return params | saved | generic
    cls = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL}[component]
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    base = UNET_BASE if component == "unet" else VAE_BASE
    with torch.device("meta"):
        saved = set(cls(**base).config) | set(dict(cls(**base).config))
    return params | saved | {"_class_name", "_diffusers_version", "_name_or_path"}


def _kind(cls, key: str) -> str:
    fields = {f.name for f in dataclasses.fields(cls)}
    kinds = [k for k, table in (("honoured", fields), ("ignored", cls.IGNORED),
                                ("refused unless inert", cls.UNSUPPORTED_OPTIONS),
                                ("class name", {cls.CLASS_KEY[0]})) if key in table]
    assert len(kinds) <= 1, f"{key} is {kinds}"
    return kinds[0] if kinds else "unclassified"


@pytest.mark.parametrize("component", CLASSES)
def test_every_reference_field_is_classified(component):
    cls = CLASSES[component]
    reference = _reference_fields(component)
    unclassified = sorted(k for k in reference if _kind(cls, k) == "unclassified")
    # an unclassified key is refused by from_dict ("unknown keys"), but a reference field must be
    # decided on: honour it, ignore it with a reason, or refuse its non-inert values
    assert not unclassified, f"{component}: reference fields sdcore has not decided on: {unclassified}"
    invented = sorted(f.name for f in dataclasses.fields(cls) if f.name not in reference)
    assert not invented, f"{component}: sdcore config fields the reference does not have: {invented}"
    assert all(why.strip() for why in cls.IGNORED.values())


@pytest.mark.parametrize("component", CLASSES)
def test_every_honoured_field_is_checked(component):
    cls = CLASSES[component]
    shape_variants = {"unet": UNET_SHAPE_VARIANTS, "vae": VAE_SHAPE_VARIANTS, "text_encoder": CLIP_SHAPE_VARIANTS}
    checked = set(shape_variants[component]) | set(VALUE_FIELDS[component])
    fields = {f.name for f in dataclasses.fields(cls)}
    assert fields == checked, (f"{component}: honoured but unchecked {sorted(fields - checked)}, "
                               f"checked but not fields {sorted(checked - fields)}")


def _reference_shapes(component: str, config: dict) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        if component == "unet":
            model = diffusers.UNet2DConditionModel(**config)
        elif component == "vae":
            model = diffusers.AutoencoderKL(**config)
        else:
            model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    state = weights.sdcore_names(component, model.state_dict())
    return {k: tuple(v.shape) for k, v in state.items() if not weights.is_ignored_key(component, k)}


def _variants():
    for component, base, variants in (("unet", UNET_BASE, UNET_SHAPE_VARIANTS), ("vae", VAE_BASE, VAE_SHAPE_VARIANTS),
                                      ("text_encoder", CLIP_BASE, CLIP_SHAPE_VARIANTS)):
        yield pytest.param(component, base, {}, id=f"{component}-base")
        for key, value in variants.items():
            extra = _VAE_VARIANT_EXTRAS.get(key, {}) if component == "vae" else {}
            yield pytest.param(component, base, {key: value, **extra}, id=f"{component}-{key}")


@pytest.mark.parametrize("component,base,change", list(_variants()))
def test_shape_fields_build_the_reference_architecture(component, base, change):
    config = {**base, **change}
    assert weights.expected_shapes(component, config) == _reference_shapes(component, config)


def _non_inert(accepted: tuple):
    """A value outside `accepted` of the kind the option takes."""
    first = accepted[0]
    if isinstance(first, bool):
        return not first
    if isinstance(first, (int, float)):
        return first + 1
    if isinstance(first, str):
        return first + "-other"
    return 1  # the option is off when null: any value turns it on


def _refusals():
    for component, cls in CLASSES.items():
        for key, accepted in cls.UNSUPPORTED_OPTIONS.items():
            yield pytest.param(cls, key, _non_inert(accepted), id=f"{component}-{key}")
        yield pytest.param(cls, "some_future_option", 1, id=f"{component}-unknown-key")
        yield pytest.param(cls, cls.CLASS_KEY[0], "SomeOtherModel", id=f"{component}-{cls.CLASS_KEY[0]}")


@pytest.mark.parametrize("cls,key,value", list(_refusals()))
def test_unsupported_values_are_refused_in_one_line(cls, key, value):
    with pytest.raises(SdcoreError) as info:
        cls.from_dict({key: value})
    message = str(info.value)
    assert key in message and "\n" not in message, message


@pytest.mark.parametrize("component", CLASSES)
def test_inert_values_and_ignored_keys_change_nothing(component):
    cls = CLASSES[component]
    base = {"unet": UNET_BASE, "vae": VAE_BASE, "text_encoder": CLIP_BASE}[component]
    plain = cls.from_dict(base)
    for key, accepted in cls.UNSUPPORTED_OPTIONS.items():
        for value in accepted:
            assert cls.from_dict({**base, key: value}) == plain, key
    for key in cls.IGNORED:
        assert cls.from_dict({**base, key: "any value"}) == plain, key


def test_real_sd_configs_with_null_options_load():
    """SD1.5/2.1 configs as diffusers saves them today carry the VAE's latent options as null."""
    vae = dict(VAE_BASE, shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True,
               _class_name="AutoencoderKL", _diffusers_version="0.30.0")
    assert VAEConfig.from_dict(vae) == VAEConfig.from_dict(VAE_BASE)
    with pytest.raises(SdcoreError, match=r"^VAE config: latents_mean=\[0.1, 0.2\] is not supported"):
        VAEConfig.from_dict(dict(vae, latents_mean=[0.1, 0.2]))


@pytest.mark.parametrize("cls", [UNetConfig, VAEConfig], ids=["unet", "vae"])
def test_sample_size_as_height_width(cls):
    config = cls.from_dict({"sample_size": [64, 96]})
    assert config.sample_size == (64, 96) and config.sample_hw == (64, 96)
    assert cls.from_dict({"sample_size": 64}).sample_hw == (64, 64)
    for bad in ([64, 96, 2], [0, 64], "64", [64.5, 64]):
        with pytest.raises(SdcoreError, match=r"sample_size must be a positive integer or a list of 2 positive"):
            cls.from_dict({"sample_size": bad})


@pytest.mark.parametrize("component", CLASSES)
def test_saved_reference_configs_read_back(component):
    """What the reference itself saves (bookkeeping included) reads without an error."""
    if component == "text_encoder":
        saved = transformers.CLIPTextConfig(**CLIP_BASE).to_dict()
    else:
        cls = {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL}[component]
        with torch.device("meta"):
            saved = dict(cls(**(UNET_BASE if component == "unet" else VAE_BASE)).config)
    CLASSES[component].from_dict(saved)


WRONG_VALUES = [None, "x", [], [None], -1, 0, 1.5, {"a": 1}, True, [1, "a"], [[1, 2]]]


@pytest.mark.parametrize("component", CLASSES)
def test_any_value_of_any_field_is_one_line_or_builds(component):
    """A config.json with a wrong type or size anywhere: one line naming the field, or (when the value
    is legal, such as freq_shift=0) a module that builds; never a traceback or a crash in TVM."""
    cls = CLASSES[component]
    base = {"unet": UNET_BASE, "vae": VAE_BASE, "text_encoder": CLIP_BASE}[component]
    for field in dataclasses.fields(cls):
        for value in WRONG_VALUES:
            config = {**base, field.name: value}
            try:
                cls.from_dict(config)
            except SdcoreError as err:
                assert field.name in str(err) and "\n" not in str(err), str(err)
                continue
            weights.expected_shapes(component, config)


def test_not_a_json_object():
    with pytest.raises(SdcoreError, match="must be a JSON object"):
        UNetConfig.from_dict([1, 2])
