"""Original single-file checkpoints -> diffusers components: sdcore.convert.original against diffusers.

Seeded random diffusers/transformers models (tiny configs) are written in the original layout by
sdcore/testing/original_format.py, then
  (a) diffusers' own single-file conversion (diffusers/loaders/single_file_utils.py) must read them
      back into exactly the models' tensors: the written dicts look like real checkpoints;
  (b) `split_original` must return exactly the same tensors (names, shapes, dtypes, values), and
      configs that build the same architectures.
Comparisons are exact (no tolerance): the conversion only renames, reshapes and slices.
The full-size SD1.5/SD2.1 layouts are checked on the meta device (shapes only, no memory).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils as diffusers_single_file
from transformers import CLIPTextConfig, CLIPTextModel

from sdcore.convert.original import split_original
from sdcore.errors import SdcoreError
from sdcore.presets import preset
from sdcore.testing import original_format as fmt

# Tiny configs. SD1.x: conv proj_in, 8 heads, 3 levels; SD2.x: linear proj_in, 64-wide heads,
# upcast attention. sample_size is what split_original assumes (the weights cannot say).
TINY_UNET = {
    "sd1": dict(
        block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=8, cross_attention_dim=128,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=64,
    ),
    "sd2": dict(
        block_out_channels=(64, 128), layers_per_block=1, attention_head_dim=(1, 2), cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        use_linear_projection=True, upcast_attention=True, sample_size=96,
    ),
}
TINY_VAE = dict(
    block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
)
TINY_TEXT = {
    "sd1": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                hidden_act="quick_gelu"),
    "sd2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, hidden_act="gelu"),
}
TINY_TEXT_COMMON = dict(vocab_size=1000, max_position_embeddings=77, pad_token_id=1, bos_token_id=0, eos_token_id=2)
# What the configs must agree on for the text encoder to be the same network.
TEXT_ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps")


@dataclasses.dataclass(frozen=True)
class Case:
    family: str
    inpainting: bool = False
    ema: bool = False
    dtype: torch.dtype = torch.float32
    legacy_clip: bool = False  # SD1.x text encoder names without the text_model. level

    def __str__(self):
        flags = [self.family, "inpaint" if self.inpainting else "", "ema" if self.ema else "",
                 str(self.dtype).removeprefix("torch."), "legacy-clip" if self.legacy_clip else ""]
        return "-".join(f for f in flags if f)


CASES = [
    Case("sd1"),
    Case("sd1", ema=True, dtype=torch.float16),
    Case("sd2"),
    Case("sd2", ema=True, dtype=torch.float16),
    Case("sd1", inpainting=True, legacy_clip=True),
    Case("sd2", inpainting=True, ema=True),
]


@dataclasses.dataclass
class Models:
    unet: UNet2DConditionModel
    ema_unet: UNet2DConditionModel  # same config, other weights: the model_ema.* copy
    vae: AutoencoderKL
    text: CLIPTextModel


def _randomize(model: torch.nn.Module, seed: int):
    """Distinct values in every tensor (default inits leave all norms at 1/0, hiding swapped names)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return model.eval()


@functools.lru_cache(maxsize=None)
def tiny_models(family: str, inpainting: bool) -> Models:
    unet_cfg = dict(TINY_UNET[family], in_channels=9 if inpainting else 4)
    if inpainting:
        unet_cfg["sample_size"] = 64
    vae_cfg = dict(TINY_VAE, sample_size=unet_cfg["sample_size"] * 4)
    return Models(
        unet=_randomize(UNet2DConditionModel(**unet_cfg), 0),
        ema_unet=_randomize(UNet2DConditionModel(**unet_cfg), 1),
        vae=_randomize(AutoencoderKL(**vae_cfg), 2),
        text=_randomize(CLIPTextModel(CLIPTextConfig(**TINY_TEXT_COMMON, **TINY_TEXT[family])), 3),
    )


def _cast(state: dict, dtype) -> dict:
    return {k: v.to(dtype) for k, v in state.items()}


def write_original(models: Models, family: str, *, ema: bool, dtype, legacy_clip: bool = False) -> dict:
    """The models as one original-format checkpoint (torch tensors), as a user's file would hold them."""
    ckpt = dict(fmt.schedule_buffers())
    ckpt.update(fmt.unet_to_original(_cast(models.unet.state_dict(), dtype), models.unet.config))
    if ema:
        ema_unet = fmt.unet_to_original(_cast(models.ema_unet.state_dict(), dtype), models.unet.config)
        ckpt.update(fmt.ema_entries(ema_unet))
    ckpt.update(fmt.vae_to_original(_cast(models.vae.state_dict(), dtype), models.vae.config))
    text = _cast(models.text.state_dict(), dtype)
    if family == "sd1":
        ckpt.update(fmt.clip_to_original(text, legacy=legacy_clip))
    else:
        hidden, inner = models.text.config.hidden_size, models.text.config.intermediate_size
        meta = next(iter(text.values())).is_meta
        generator = torch.Generator().manual_seed(4)

        def tensor(shape):
            if meta:
                return torch.empty(shape, dtype=dtype, device="meta")
            return torch.randn(shape, generator=generator).to(dtype)

        last = {k: tensor(s) for k, s in fmt.open_clip_block_shapes(hidden, inner).items()}
        head = {"text_projection": tensor((hidden, hidden)), "logit_scale": tensor(())}
        ckpt.update(fmt.open_clip_to_original(text, last, head))
    return ckpt


def expected_components(models: Models, *, ema: bool, dtype) -> dict[str, dict]:
    """The diffusers/transformers tensors each component must come back as (text: on-disk names)."""
    return {
        "unet": _cast((models.ema_unet if ema else models.unet).state_dict(), dtype),
        "vae": _cast(models.vae.state_dict(), dtype),
        "text_encoder": {"text_model." + k: v for k, v in _cast(models.text.state_dict(), dtype).items()},
    }


def to_numpy(ckpt: dict) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in ckpt.items()}


def assert_same_tensors(actual: dict, expected: dict, what: str):
    """Same names; per tensor the same shape, dtype and values, exactly."""
    assert sorted(actual) == sorted(expected), (
        f"{what}: missing {sorted(set(expected) - set(actual))[:5]}, extra {sorted(set(actual) - set(expected))[:5]}"
    )
    bad = []
    for name, want in expected.items():
        got = actual[name]
        got = got.numpy() if isinstance(got, torch.Tensor) else got
        want = want.numpy()
        if got.shape != want.shape or got.dtype != want.dtype or not np.array_equal(got, want):
            bad.append(f"{name}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}")
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


def resolved_config(model) -> dict:
    """A diffusers model's full config (defaults included), JSON-normalized (tuples -> lists)."""
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


def expected_ignored(ckpt: dict, family: str, ema: bool) -> set[str]:
    ignored = set(fmt.schedule_buffers())
    if ema:
        ignored |= {k for k in ckpt if k.startswith(fmt.UNET)} | {"model_ema.decay", "model_ema.num_updates"}
    if family == "sd1":
        ignored |= {k for k in ckpt if k.endswith("embeddings.position_ids")}
    else:
        last = max(int(k.split(".")[4]) for k in ckpt if ".resblocks." in k)
        ignored |= {k for k in ckpt if f".resblocks.{last}." in k}
        ignored |= {fmt.OPENCLIP + "text_projection", fmt.OPENCLIP + "logit_scale"}
    return ignored


@pytest.mark.parametrize("case", CASES, ids=str)
def test_diffusers_reads_the_written_checkpoint(case):
    """(a) diffusers' single-file conversion turns the written dict back into the models' tensors."""
    models = tiny_models(case.family, case.inpainting)
    ckpt = write_original(models, case.family, ema=case.ema, dtype=case.dtype, legacy_clip=case.legacy_clip)
    want = expected_components(models, ema=case.ema, dtype=case.dtype)

    unet = diffusers_single_file.convert_ldm_unet_checkpoint(ckpt, dict(models.unet.config), extract_ema=case.ema)
    assert_same_tensors(unet, want["unet"], "diffusers UNet")
    vae = diffusers_single_file.convert_ldm_vae_checkpoint(ckpt, dict(models.vae.config))
    assert_same_tensors(vae, want["vae"], "diffusers VAE")
    if case.family == "sd1":
        # diffusers keeps what follows cond_stage_model.transformer.: legacy names lack text_model.
        text = diffusers_single_file.convert_ldm_clip_checkpoint(ckpt)
        text = {"text_model." + k.removeprefix("text_model."): v for k, v in text.items()
                if not k.endswith("position_ids")}
    else:
        text = diffusers_single_file.convert_open_clip_checkpoint(models.text, ckpt, prefix=fmt.OPENCLIP)
        # diffusers drops resblocks.23 and text_projection by name (the real tower's); the tiny tower's
        # last is resblocks.<num_hidden_layers>, which diffusers converts and the model never loads.
        n = models.text.config.num_hidden_layers
        extra = {k for k in text if k not in want["text_encoder"]}
        assert extra and all(k.startswith(f"text_model.encoder.layers.{n}.") for k in extra)
        text = {k: v for k, v in text.items() if k not in extra}
    assert_same_tensors(text, want["text_encoder"], "diffusers text encoder")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_split_original_matches_the_models(case):
    """(b) split_original gives the same tensors, and configs that build the same architectures."""
    models = tiny_models(case.family, case.inpainting)
    ckpt = write_original(models, case.family, ema=case.ema, dtype=case.dtype, legacy_clip=case.legacy_clip)
    want = expected_components(models, ema=case.ema, dtype=case.dtype)

    split = split_original(to_numpy(ckpt))

    assert (split.family, split.inpainting, split.used_ema) == (case.family, case.inpainting, case.ema)
    assert_same_tensors(split.unet, want["unet"], "split UNet")
    assert_same_tensors(split.vae, want["vae"], "split VAE")
    assert_same_tensors(split.text_encoder, want["text_encoder"], "split text encoder")
    assert set(split.ignored_keys) == expected_ignored(ckpt, case.family, case.ema)
    assert split.notes and all("\n" not in note for note in split.notes)

    unet = UNet2DConditionModel(**split.unet_config)
    assert resolved_config(unet) == resolved_config(models.unet)
    unet.load_state_dict({k: torch.from_numpy(v) for k, v in split.unet.items()}, strict=True)
    vae = AutoencoderKL(**split.vae_config)
    assert resolved_config(vae) == resolved_config(models.vae)
    vae.load_state_dict({k: torch.from_numpy(v) for k, v in split.vae.items()}, strict=True)
    text_config = CLIPTextConfig(**split.text_encoder_config)
    for key in TEXT_ARCHITECTURE_KEYS:
        assert getattr(text_config, key) == getattr(models.text.config, key), key
    text = CLIPTextModel(text_config)
    text.load_state_dict(
        {k.removeprefix("text_model."): torch.from_numpy(v) for k, v in split.text_encoder.items()}, strict=True
    )


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_use_ema_false_takes_the_live_weights(family):
    models = tiny_models(family, False)
    ckpt = to_numpy(write_original(models, family, ema=True, dtype=torch.float32))
    split = split_original(ckpt, use_ema=False)
    assert not split.used_ema
    assert_same_tensors(split.unet, expected_components(models, ema=False, dtype=torch.float32)["unet"], "live UNet")
    assert {k for k in ckpt if k.startswith("model_ema.")} <= set(split.ignored_keys)


def test_incomplete_ema_copy():
    models = tiny_models("sd1", False)
    ckpt = to_numpy(write_original(models, "sd1", ema=True, dtype=torch.float32))
    del ckpt["model_ema.diffusion_modelout2weight"]
    split = split_original(ckpt)  # None: an incomplete copy is not used
    assert not split.used_ema and any("incomplete EMA" in note for note in split.notes)
    with pytest.raises(SdcoreError, match="EMA weights were asked for"):
        split_original(ckpt, use_ema=True)


# ---- bad inputs: each is one SdcoreError line that says what is wrong ----


@pytest.fixture(scope="module")
def sd1_checkpoint() -> dict[str, np.ndarray]:
    return to_numpy(write_original(tiny_models("sd1", False), "sd1", ema=False, dtype=torch.float32))


def _edited(ckpt, drop=(), add=None):
    out = {k: v for k, v in ckpt.items() if not k.startswith(tuple(drop))}
    out.update(add or {})
    return out


BAD_INPUTS = {
    "no-unet": (dict(drop=["model.diffusion_model."]), r"no model\.diffusion_model\.\* keys: not a Stable Diffusion"),
    "no-vae": (dict(drop=["first_stage_model."]), r"no first_stage_model\.\* \(VAE\) keys"),
    "no-text-encoder": (dict(drop=["cond_stage_model."]), "found neither of cond_stage_model"),
    "unet-wrong-shape": (
        dict(add={"model.diffusion_model.output_blocks.0.0.out_layers.3.weight": np.zeros((64, 64, 1, 1), np.float32)}),
        r"UNet key up_blocks\.0\.resnets\.0\.conv2\.weight .*expected shape \(64, 64, 3, 3\), found \(64, 64, 1, 1\)",
    ),
    "vae-wrong-shape": (
        dict(add={"first_stage_model.decoder.mid.attn_1.q.weight": np.zeros((64, 32, 1, 1), np.float32)}),
        r"VAE key decoder\.mid_block\.attentions\.0\.to_q\.weight .*expected shape \(64, 64\)",
    ),
    "text-wrong-shape": (
        dict(add={"cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.bias": np.zeros(3, np.float32)}),
        r"text encoder key text_model\.encoder\.layers\.1\.mlp\.fc2\.bias .*expected shape \(128,\)",
    ),
    "unknown-top-level-key": (dict(add={"embedding_manager.weight": np.zeros(3, np.float32)}),
                              r"unknown key embedding_manager\.weight"),
    "unknown-unet-key": (
        dict(add={"model.diffusion_model.input_blocks.1.0.extra.weight": np.zeros(3, np.float32)}),
        r"unknown key model\.diffusion_model\.input_blocks\.1\.0\.extra\.weight",
    ),
    "unknown-unet-module": (dict(add={"model.diffusion_model.label_emb.0.0.weight": np.zeros(3, np.float32)}),
                            r"unknown key model\.diffusion_model\.label_emb\.0\.0\.weight"),
    "unknown-ema-key": (dict(add={"model_ema.diffusion_modelfoo": np.zeros(3, np.float32)}),
                        r"unknown key model_ema\.diffusion_modelfoo"),
    "both-text-encoders": (dict(add={"cond_stage_model.model.token_embedding.weight": np.zeros((3, 3), np.float32)}),
                           "found both of"),
    "truncated-output-blocks": (dict(drop=["model.diffusion_model.output_blocks.8."]), "output_blocks"),
    "truncated-middle-input-block": (dict(drop=["model.diffusion_model.input_blocks.4."]),
                                     r"input_blocks 4 is missing.*truncated"),
    "missing-one-tensor": (dict(drop=["model.diffusion_model.output_blocks.3.1.proj_out.bias"]),
                           r"UNet is missing 1 tensor\(s\), "
                           r"first model\.diffusion_model\.output_blocks\.3\.1\.proj_out\.bias"),
    "truncated-vae-decoder": (dict(drop=["first_stage_model.decoder.up.2."]), r"VAE is missing .*decoder\.up\.2\."),
    "truncated-text-layers": (dict(drop=["cond_stage_model.transformer.text_model.encoder.layers.0."]),
                              r"encoder layers 0 is missing"),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_raises_one_clear_line(sd1_checkpoint, name):
    edit, message = BAD_INPUTS[name]
    with pytest.raises(SdcoreError, match=message) as info:
        split_original(_edited(sd1_checkpoint, **edit))
    assert "\n" not in str(info.value)


def test_use_ema_true_without_ema_copy(sd1_checkpoint):
    with pytest.raises(SdcoreError, match=r"has 0 of the \d+ EMA tensors"):
        split_original(sd1_checkpoint, use_ema=True)


# ---- full-size layouts (meta device: shapes only) against the standard diffusers configs ----

# the configs of stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 (sdcore.presets)
STANDARD = {"sd1": preset("sd15"), "sd2": preset("sd21")}


def _fake_arrays(ckpt: dict) -> dict[str, np.ndarray]:
    """Zero-memory stand-ins with the real shapes and a real dtype (stride-0 views of one zero)."""
    return {k: np.broadcast_to(np.zeros((), np.float16 if v.is_floating_point() else np.int64), tuple(v.shape))
            for k, v in ckpt.items()}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_layout_gives_the_standard_configs(family):
    std = STANDARD[family]
    with torch.device("meta"):
        models = Models(
            unet=UNet2DConditionModel(**std["unet"]),
            ema_unet=UNet2DConditionModel(**std["unet"]),
            vae=AutoencoderKL(**std["vae"]),
            text=CLIPTextModel(CLIPTextConfig(**std["text_encoder"])),
        )
    ckpt = write_original(models, family, ema=True, dtype=torch.float16)

    # The written layout is what diffusers reads (names and shapes; meta tensors have no values).
    unet = diffusers_single_file.convert_ldm_unet_checkpoint(ckpt, dict(models.unet.config), extract_ema=True)
    assert {k: v.shape for k, v in unet.items()} == {k: v.shape for k, v in models.unet.state_dict().items()}
    vae = diffusers_single_file.convert_ldm_vae_checkpoint(ckpt, dict(models.vae.config))
    assert {k: v.shape for k, v in vae.items()} == {k: v.shape for k, v in models.vae.state_dict().items()}

    split = split_original(_fake_arrays(ckpt))

    assert (split.family, split.inpainting, split.used_ema) == (family, False, True)
    for component in ("unet", "vae", "text_encoder"):
        got = json.loads(json.dumps(getattr(split, f"{component}_config")))
        assert {k: got.get(k) for k in std[component]} == std[component], component
    with torch.device("meta"):
        assert resolved_config(UNet2DConditionModel(**split.unet_config)) == resolved_config(models.unet)
        assert resolved_config(AutoencoderKL(**split.vae_config)) == resolved_config(models.vae)
    for name, model in (("unet", models.unet), ("vae", models.vae)):
        shapes = {k: tuple(v.shape) for k, v in getattr(split, name).items()}
        assert shapes == {k: tuple(v.shape) for k, v in model.state_dict().items()}, name
    text_shapes = {k: tuple(v.shape) for k, v in split.text_encoder.items()}
    assert text_shapes == {"text_model." + k: tuple(v.shape) for k, v in models.text.state_dict().items()}
