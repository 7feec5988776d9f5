"""sdcore's UNet2DConditionModel against diffusers' UNet2DConditionModel, block by block.

Same random weights on both sides (diffusers' state_dict bound by name, no renaming), every
resnet, Transformer2DModel, transformer block, down/upsampler and down/mid/up block compared, plus
the noise prediction. Run with `-s` to see the tables. The small configs are seeded and cover every
path sdcore implements; the full SD1.5/SD2.1 shapes are `slow`.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the reference is diffusers, which needs torch")
diffusers = pytest.importorskip("diffusers", reason="the reference is diffusers' UNet2DConditionModel")

from sdcore.errors import SdcoreError  # noqa: E402
from sdcore.parity import build_tapped, compare, format_table, reference_taps  # noqa: E402
from sdcore.presets import preset  # noqa: E402
from sdcore.unet import UNetConfig  # noqa: E402

SD_PATTERN = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)

# name: (diffusers config, batch, latent height, latent width, text sequence length)
SMALL_CONFIGS = {
    # SD1.x style: 1x1-conv projections, attention_head_dim read as an odd head count (3 heads of 16
    # and 32), the 9-channel inpainting conv_in, non-square latents that are not a multiple of the
    # downsampling factor (12x10 -> 6x5 -> 3x3, so the upsamplers must take the skips' sizes).
    # Beyond SD1.x, to exercise implemented options: only_cross_attention on the middle level.
    "sd1-style": (dict(SD_PATTERN, block_out_channels=(48, 96, 96), layers_per_block=1, norm_num_groups=16,
                       cross_attention_dim=32, attention_head_dim=3, in_channels=9,
                       only_cross_attention=(False, True, False)), 2, 12, 10, 77),
    # SD2.x style: Linear projections, per-block head counts giving heads of one size (16), upcast
    # attention, two layers per block, square latents. Beyond SD2.x: two transformer layers per
    # attention, shifted/unflipped time features, a time_embedding_dim override, a mid-block scale,
    # downsample_padding=0 (pad right/bottom, then an unpadded conv).
    "sd2-style": (dict(SD_PATTERN, block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
                       cross_attention_dim=24, attention_head_dim=(2, 4, 4), use_linear_projection=True,
                       upcast_attention=True, transformer_layers_per_block=2, flip_sin_to_cos=False,
                       freq_shift=1, time_embedding_dim=96, mid_block_scale_factor=1.5, downsample_padding=0),
                  2, 8, 8, 20),
}

_SD_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# unet/config.json as published with SD1.5 (diffusers 0.6) and SD2.1 (diffusers 0.10): older files
# omit most keys, so the defaults must be diffusers'.
PUBLISHED_CONFIGS = {
    "sd1.5": dict(_SD_BLOCKS, _class_name="UNet2DConditionModel", _diffusers_version="0.6.0", act_fn="silu",
                  attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
                  cross_attention_dim=768, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
                  in_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05,
                  norm_num_groups=32, out_channels=4, sample_size=64),
    "sd2.1": dict(_SD_BLOCKS, _class_name="UNet2DConditionModel", _diffusers_version="0.10.0.dev0",
                  act_fn="silu", attention_head_dim=[5, 10, 20, 20], block_out_channels=[320, 640, 1280, 1280],
                  center_input_sample=False, cross_attention_dim=1024, downsample_padding=1,
                  dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
                  layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32,
                  num_class_embeds=None, only_cross_attention=False, out_channels=4, sample_size=96,
                  upcast_attention=True, use_linear_projection=True),
}


def _reference(kwargs: dict, seed: int):
    """diffusers' UNet with seeded random weights; norm affines moved off their (1, 0) init so that
    a swapped or missing norm parameter cannot go unnoticed."""
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**kwargs).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return ref


def _run_parity(label: str, kwargs: dict, batch: int, height: int, width: int, seq_len: int, seed: int,
                cache_dir, dtype: str = "float32") -> list:
    """Layer table of sdcore (in `dtype`) against diffusers in float32. float16 is built with TVM's
    default pipeline: sdcore's CPU schedule rules are float32 only (float16 is for cuda)."""
    from sdcore.unet.model import UNet2DConditionModel, parity_layer_names, unet_spec

    ref = _reference(kwargs, seed)
    config = UNetConfig.from_dict(json.loads(json.dumps(dict(ref.config))))  # as read from config.json
    model = UNet2DConditionModel(config, dtype=dtype)
    weights = {k: v.detach().numpy().astype(dtype) for k, v in ref.state_dict().items()}
    ours = {name for name, _ in model.named_parameters()}
    assert ours == set(weights), f"names differ: {sorted(ours ^ set(weights))[:10]}"

    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, config.in_channels, height, width), dtype=np.float32)
    timestep = np.array([981.25, 13.5, 500.0, 0.75][:batch], dtype=np.float32)  # fractional, as Euler uses
    text = rng.standard_normal((batch, seq_len, config.cross_attention_dims[0]), dtype=np.float32)

    names = parity_layer_names(config)
    start = time.perf_counter()
    compiled, n_out = build_tapped(model, unet_spec(config, batch, height, width, seq_len, dtype=dtype), names,
                                   name=f"unet-parity-{label}", cache_dir=cache_dir, use_cache=False,
                                   schedule=dtype == "float32")
    compile_s = time.perf_counter() - start
    compiled.set_params(weights)
    start = time.perf_counter()
    outputs = compiled.forward(sample, timestep, text)
    run_s = time.perf_counter() - start

    result, taps = reference_taps(ref, names, lambda: ref(torch.from_numpy(sample), torch.from_numpy(timestep),
                                                          torch.from_numpy(text)).sample)
    rows = [compare(name, out, taps[name], dtype) for name, out in zip(names, outputs[n_out:])]
    rows.append(compare("noise prediction", outputs[0], result.numpy(), dtype))
    print(format_table(rows, title=f"UNet {label} {dtype}: {batch}x{config.in_channels}x{height}x{width}, "
                                   f"compile {compile_s:.1f} s, forward {run_s:.2f} s"))
    return rows


@pytest.mark.parametrize("label", list(SMALL_CONFIGS))
def test_unet_parity_small(label, tmp_path):
    kwargs, batch, height, width, seq_len = SMALL_CONFIGS[label]
    rows = _run_parity(label, kwargs, batch, height, width, seq_len, seed=0, cache_dir=tmp_path)
    bad = [r.name for r in rows if not r.ok]
    assert not bad, f"layers off the reference: {bad}"


@pytest.mark.parametrize("label", list(SMALL_CONFIGS))
def test_unet_float16_small(label, tmp_path):
    """The float16 graph (what a cuda build runs) against diffusers in float32, within
    sdcore.parity.TOLERANCES["float16"]; sd2-style covers upcast attention."""
    kwargs, batch, height, width, seq_len = SMALL_CONFIGS[label]
    rows = _run_parity(label, kwargs, batch, height, width, seq_len, seed=0, cache_dir=tmp_path, dtype="float16")
    bad = [r.name for r in rows if not r.ok]
    assert not bad, f"layers off the reference: {bad}"


@pytest.mark.slow
@pytest.mark.parametrize("label", list(PUBLISHED_CONFIGS))
def test_unet_parity_full(label, tmp_path):
    """SD1.5 / SD2.1 shapes with random weights, batch 2 (guidance), 64x64 latents (512x512 images)."""
    kwargs = {k: v for k, v in PUBLISHED_CONFIGS[label].items() if not k.startswith("_")}
    rows = _run_parity(label, kwargs, 2, 64, 64, 77, seed=0, cache_dir=tmp_path)
    bad = [r.name for r in rows if not r.ok]
    assert not bad, f"layers off the reference: {bad}"


@pytest.mark.parametrize("channels,flip,shift", [(320, True, 0), (7, False, 1)])
def test_time_proj(channels, flip, shift):
    """The sinusoidal features alone, tight: fractional timesteps up to 999 and an odd width."""
    from diffusers.models.embeddings import get_timestep_embedding
    from tvm.relax.frontend import nn

    from sdcore.compile import build
    from sdcore.unet.blocks import Timesteps

    t = np.array([999.0, 981.25, 500.5, 13.5, 0.75, 0.0], dtype=np.float32)
    spec = {"forward": {"timesteps": nn.spec.Tensor([len(t)], "float32"),
                        "$": {"param_mode": "plain", "effect_mode": "none"}}}
    compiled = build(Timesteps(channels, flip, shift), spec, name="unet-time-proj", use_cache=False)
    compiled.set_params({})
    ours = compiled.forward(t)
    ref = get_timestep_embedding(torch.from_numpy(t), channels, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    row = compare("time_proj", ours, ref.numpy())
    print(format_table([row]))
    assert row.ok


# ----------------------------------------------------------------------------------------------
# config handling (no compilation)


@pytest.mark.parametrize("label", list(PUBLISHED_CONFIGS))
def test_config_reads_published_config(label, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(PUBLISHED_CONFIGS[label]))
    config = UNetConfig.from_json(path)
    heads_dim = [c // h for c, h in zip(config.block_out_channels, config.num_heads)]
    if label == "sd1.5":
        assert config.num_heads == (8, 8, 8, 8) and heads_dim == [40, 80, 160, 160]  # the naming quirk
        assert not config.use_linear_projection
    else:
        assert heads_dim == [64, 64, 64, 64] and config.use_linear_projection and config.upcast_attention
    assert config.time_embed_dim == 1280 and config.num_upsamplers == 3
    # the published file and sdcore's preset (what the tools and the converter use) are one architecture
    assert config == UNetConfig.from_dict(preset({"sd1.5": "sd15", "sd2.1": "sd21"}[label])["unet"])


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text"),
    ("dual_cross_attention", True),
    ("num_class_embeds", 10),
    ("resnet_time_scale_shift", "scale_shift"),
    ("time_embedding_type", "fourier"),
    ("center_input_sample", True),
    ("encoder_hid_dim", 768),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ["AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ("act_fn", "gelu"),
    ("transformer_layers_per_block", [[1, 2], [1, 2], [1, 2], [1, 2]]),
    ("some_future_option", 1),
])
def test_config_refuses_unsupported(key, value):
    with pytest.raises(SdcoreError, match=key):
        UNetConfig.from_dict({key: value})


def test_config_ignores_only_bookkeeping():
    config = UNetConfig.from_dict({"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
                                   "sample_size": 64, "dropout": 0.0, "mid_block_only_cross_attention": None})
    assert config == UNetConfig()
