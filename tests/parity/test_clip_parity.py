"""sdcore's CLIP text encoder against transformers' CLIPTextModel with the same seeded random weights.

Every row of the printed table (`pytest -s`) is one submodule (embeddings, each encoder layer, the
final LayerNorm) or a final output (last_hidden_state, pooled_output), scored by sdcore.parity.compare.
clip_skip is checked against diffusers' recipe: final_layer_norm(hidden_states[-(clip_skip + 1)]).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sdcore.clip import CLIPTextConfig, check_input_ids
from sdcore.errors import SdcoreError
from sdcore.presets import preset

torch = pytest.importorskip("torch", reason="torch is the reference's runtime (pip install -e .[test])")
transformers = pytest.importorskip("transformers", reason="transformers' CLIPTextModel is the reference")

from sdcore.clip import CLIPTextModel, clip_spec, parity_layer_names  # noqa: E402 (loads TVM)
from sdcore.parity import build_tapped, compare, format_table, reference_taps  # noqa: E402

# Real SD text_encoder/config.json files (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1).
SD15_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
    "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}
SD21_CONFIG = dict(
    SD15_CONFIG, _name_or_path="hf-models/stable-diffusion-v2-768x768/text_encoder", hidden_act="gelu",
    hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23, projection_dim=512,
    torch_dtype="float16", transformers_version="4.25.0.dev0",
)


def _reference(config_kwargs: dict, seed: int):
    """A transformers CLIPTextModel with every parameter random (LayerNorm affine and biases too)."""
    torch.manual_seed(seed)
    cfg = transformers.CLIPTextConfig(**config_kwargs)
    cfg._attn_implementation = "eager"
    ref = transformers.CLIPTextModel(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embedding" in name:
                p.copy_(0.5 * noise)
            else:  # Linear [out, in]: unit-variance activations
                p.copy_(noise / p.shape[1] ** 0.5)
    return ref


def _with_text_model_prefix(ref):
    """The reference seen under sdcore's (and the SD checkpoints') names, `text_model.<...>`.

    transformers 4 has `CLIPTextModel.text_model`; transformers 5 flattened it (and strips the prefix
    on load). Holding a v5 model as `.text_model` gives state-dict keys and module names that equal
    sdcore's one to one, with no renaming.
    """
    if hasattr(ref, "text_model"):
        return ref
    holder = torch.nn.Module()
    holder.text_model = ref
    return holder


def _token_ids(batch: int, seq_len: int, vocab: int, bos: int, eos: int, eos_at: list[int], pads: list[int],
               seed: int) -> np.ndarray:
    """Rows like the CLIP tokenizer's: bos, words, eos at eos_at[b], then pads[b] to the end."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab - 2, size=(batch, seq_len))
    ids[ids == eos] = 3  # the only eos of a row is the one placed below
    ids[:, 0] = bos
    for b in range(batch):
        ids[b, eos_at[b]] = eos
        ids[b, eos_at[b] + 1:] = pads[b]
    return ids.astype(np.int32)


def _eos_positions(ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """transformers' pooling positions: legacy eos_token_id 2 -> argmax of ids, else first eos."""
    key = ids if eos_token_id == 2 else (ids == eos_token_id).astype(np.int32)
    return key.argmax(axis=-1)


def _run_parity(config_kwargs: dict, *, clip_skip: int | None, ids: np.ndarray, seed: int, tmp_path):
    ref = _reference(config_kwargs, seed)
    holder = _with_text_model_prefix(ref)
    text_model = holder.text_model
    config = CLIPTextConfig.from_dict(ref.config.to_dict())  # also exercises the ignore list
    batch, seq_len = ids.shape
    check_input_ids(config, ids)

    model = CLIPTextModel(config, clip_skip=clip_skip)
    names = parity_layer_names(config, clip_skip)
    compiled, n_out = build_tapped(model, clip_spec(config, batch, seq_len), names, name="clip-test",
                                   cache_dir=tmp_path, use_cache=False)
    assert n_out == 2
    compiled.set_params({k: v.numpy() for k, v in holder.state_dict().items()})  # strict, same names
    outs = compiled.forward(ids)
    last, pooled, taps = outs[0], outs[1], outs[2:]

    ids_t = torch.from_numpy(ids.astype(np.int64))
    result, ref_taps = reference_taps(holder, names, lambda: ref(input_ids=ids_t, output_hidden_states=True))
    with torch.no_grad():
        if clip_skip:
            # diffusers' StableDiffusionPipeline.encode_prompt with clip_skip
            ref_last = text_model.final_layer_norm(result.hidden_states[-(clip_skip + 1)]).numpy()
            positions = _eos_positions(ids, config.eos_token_id)
            ref_pooled = ref_last[np.arange(batch), positions]
        else:
            ref_last = result.last_hidden_state.numpy()
            ref_pooled = result.pooler_output.numpy()

    rows = [compare(n, t, ref_taps[n]) for n, t in zip(names, taps)]
    rows += [compare("last_hidden_state", last, ref_last), compare("pooled_output", pooled, ref_pooled)]
    print(format_table(rows, title=f"CLIP {config.hidden_act} hidden {config.hidden_size} heads "
                                   f"{config.num_attention_heads} clip_skip {clip_skip}"))
    assert all(r.ok for r in rows), [r.name for r in rows if not r.ok]
    return config


SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=77, bos_token_id=998, pad_token_id=1)


@pytest.mark.parametrize(
    "case",
    [
        # legacy eos_token_id 2 (SD1.x/SD2.x configs): pooling at the largest id (999 = <|endoftext|>)
        dict(hidden_act="quick_gelu", clip_skip=None, eos_token_id=2, seq_len=77),
        dict(hidden_act="quick_gelu", clip_skip=1, eos_token_id=2, hidden_size=60, num_attention_heads=5,
             num_hidden_layers=5, seq_len=77),
        # eos_token_id 500: pooling at the first 500, not at the largest id
        dict(hidden_act="gelu", clip_skip=0, eos_token_id=500, hidden_size=60, num_attention_heads=3, seq_len=20),
        dict(hidden_act="gelu", clip_skip=1, eos_token_id=2, num_hidden_layers=4, seq_len=77),
    ],
    ids=["quick_gelu-legacy-eos", "quick_gelu-skip1-5heads", "gelu-eos500-3heads-len20", "gelu-skip1"],
)
def test_clip_matches_transformers(case, tmp_path):
    case = dict(case)
    clip_skip, seq_len = case.pop("clip_skip"), case.pop("seq_len")
    kwargs = dict(SMALL, **case)
    eos_id = 999 if kwargs["eos_token_id"] == 2 else kwargs["eos_token_id"]
    # Row 0 pads with eos (SD1.x tokenizer), row 1 with id 0 ("!", SD2.x tokenizer); eos at different places.
    ids = _token_ids(2, seq_len, kwargs["vocab_size"], kwargs["bos_token_id"], eos_id,
                     eos_at=[seq_len // 2, seq_len - 3], pads=[eos_id, 0], seed=7)
    if kwargs["eos_token_id"] != 2:  # bos (998) and other ids exceed 500: the two pooling rules disagree
        assert (_eos_positions(ids, eos_id) != _eos_positions(ids, 2)).all()
    _run_parity(kwargs, clip_skip=clip_skip, ids=ids, seed=3, tmp_path=tmp_path)


def test_clip_float16(tmp_path):
    """dtype="float16": against the float32 reference holding the same fp16-rounded weights."""
    from sdcore.compile import build

    ref = _reference(dict(SMALL, eos_token_id=2, hidden_act="gelu"), seed=3)
    holder = _with_text_model_prefix(ref)
    config = CLIPTextConfig.from_dict(ref.config.to_dict())
    weights = {k: v.numpy().astype(np.float16) for k, v in holder.state_dict().items()}
    compiled = build(CLIPTextModel(config, dtype="float16"), clip_spec(config, 2), name="clip-fp16",
                     cache_dir=tmp_path, use_cache=False)
    compiled.set_params(weights)
    ids = _token_ids(2, 77, 1000, 998, 999, eos_at=[30, 70], pads=[999, 0], seed=7)
    last, pooled = compiled.forward(ids)
    assert last.dtype == pooled.dtype == np.float16
    with torch.no_grad():
        holder.load_state_dict({k: torch.from_numpy(w.astype(np.float32)) for k, w in weights.items()})
        result = ref(input_ids=torch.from_numpy(ids.astype(np.int64)))
    rows = [compare("last_hidden_state", last, result.last_hidden_state.numpy(), "float16"),
            compare("pooled_output", pooled, result.pooler_output.numpy(), "float16")]
    print(format_table(rows, title="CLIP float16"))
    assert all(r.ok for r in rows)


def test_skipped_layers_are_not_computed_but_load():
    config = CLIPTextConfig.from_dict(dict(SMALL, eos_token_id=2))
    model = CLIPTextModel(config, clip_skip=1)
    last = f"text_model.encoder.layers.{config.num_hidden_layers - 1}"
    assert f"{last}.mlp.fc2.weight" in dict(model.named_parameters())  # kept, so a full checkpoint loads
    with pytest.raises(KeyError, match="never called"):
        build_tapped(model, clip_spec(config, 1, 8), [last], name="clip-skip", use_cache=False)


def test_config_reads_sd_configs():
    sd15 = CLIPTextConfig.from_dict(SD15_CONFIG)
    assert (sd15.hidden_size, sd15.num_hidden_layers, sd15.hidden_act, sd15.eos_token_id) == (768, 12, "quick_gelu", 2)
    sd21 = CLIPTextConfig.from_dict(SD21_CONFIG)
    assert (sd21.hidden_size, sd21.num_hidden_layers, sd21.num_attention_heads) == (1024, 23, 16)
    assert sd21.hidden_act == "gelu"
    # the published files and sdcore's presets (what the tools and the converter use) agree
    assert (sd15, sd21) == tuple(CLIPTextConfig.from_dict(preset(n)["text_encoder"]) for n in ("sd15", "sd21"))
    # transformers' own defaults are ours
    assert CLIPTextConfig.from_dict(transformers.CLIPTextConfig().to_dict()) == CLIPTextConfig()


def test_config_from_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SD15_CONFIG))
    assert CLIPTextConfig.from_json(path) == CLIPTextConfig.from_dict(SD15_CONFIG)
    with pytest.raises(SdcoreError, match="cannot read"):
        CLIPTextConfig.from_json(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_act": "relu"}, "hidden_act 'relu'"),
        ({"some_new_key": 1}, "unknown keys: some_new_key"),
        ({"model_type": "clip_vision_model"}, "model_type"),
        ({"use_attention_mask": True}, "use_attention_mask"),
        ({"num_attention_heads": 7}, "not a multiple"),
        ({"eos_token_id": [2, 3]}, "eos_token_id"),
    ],
)
def test_config_rejects(change, message):
    with pytest.raises(SdcoreError, match=message):
        CLIPTextConfig.from_dict(dict(SD15_CONFIG, **change))


def test_options_and_inputs_rejected():
    config = CLIPTextConfig.from_dict(dict(SMALL, eos_token_id=2))
    for bad in (-1, config.num_hidden_layers + 1, 1.5):
        with pytest.raises(SdcoreError, match="clip_skip"):
            CLIPTextModel(config, clip_skip=bad)
    with pytest.raises(SdcoreError, match="sequence length 78"):
        clip_spec(config, 1, 78)
    with pytest.raises(SdcoreError, match="input id 1000"):
        check_input_ids(config, np.array([[1, 1000]]))
    with pytest.raises(SdcoreError, match="integer array"):
        check_input_ids(config, np.zeros((2, 3), np.float32))


def test_import_is_light():
    code = "import sys, sdcore.clip; sdcore.clip.CLIPTextConfig(); " \
           "assert not {'tvm', 'torch', 'transformers', 'diffusers'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_clip_full_size(name, tmp_path):
    """Full SD1.5 (ViT-L/14, quick_gelu) and SD2.1 (OpenCLIP ViT-H, 23 layers, gelu) shapes, batch 2."""
    source = SD15_CONFIG if name == "sd15" else SD21_CONFIG
    kwargs = {k: source[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "max_position_embeddings", "hidden_act",
                                     "layer_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")}
    # The real CLIP vocabulary: <|startoftext|> 49406, <|endoftext|> 49407 (largest id, legacy pooling).
    ids = _token_ids(2, 77, 49408, 49406, 49407, eos_at=[9, 60], pads=[49407, 0], seed=11)
    _run_parity(kwargs, clip_skip=None, ids=ids, seed=5, tmp_path=tmp_path)
