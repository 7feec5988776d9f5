"""Checkpoint conversion: every tensor of a converted directory equals the reference model's (diffusers /
transformers, built from the same seed), from all three source kinds; every bad input ends in one
line, a non-zero exit and no output."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sdcore import weights
from sdcore.cli import main

PRESETS = [("tiny-sd1", False), ("tiny-sd2", False), ("tiny-sd1", True)]


def _reference_state(src, component):
    """The state dict diffusers/transformers load from a diffusers folder, as NumPy."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[component]
    model = cls.from_pretrained(src / component)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if component == "text_encoder":  # transformers 5 drops the "text_model." level sdcore keeps
        state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    return state


def _run(argv, capsys):
    capsys.readouterr()  # what building a fixture checkpoint printed (a transformers warning, say)
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(code, err, expected_code, *fragments):
    assert code == expected_code, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary folder left behind"


@pytest.mark.parametrize("preset,inpainting", PRESETS)
def test_diffusers_folder_round_trip(checkpoints, tmp_path, capsys, preset, inpainting):
    src = checkpoints.diffusers(preset, inpainting)
    out = tmp_path / "model"
    code, stdout, err = _run(["convert", src, "--output", out], capsys)
    assert code == 0, err
    info = weights.read_model_info(out)
    assert info["family"] == ("sd2" if preset == "tiny-sd2" else "sd1")
    assert info["inpainting"] is inpainting
    assert info["prediction_type"] == "epsilon"
    assert "prediction type: epsilon (from scheduler/scheduler_config.json)" in stdout
    copied = sorted(p.name for p in (src / "tokenizer").iterdir())
    assert copied and sorted(p.name for p in (out / "tokenizer").iterdir()) == copied
    for f in copied:
        assert (out / "tokenizer" / f).read_bytes() == (src / "tokenizer" / f).read_bytes()
    for component in weights.COMPONENTS:
        _config, ours = weights.load_component(out, component)
        ref = _reference_state(src, component)
        ref = {k: v for k, v in ref.items() if k not in weights.IGNORED_KEYS[component]}
        assert sorted(ours) == sorted(ref)
        for name, value in ref.items():
            np.testing.assert_array_equal(ours[name], value, err_msg=f"{component}.{name}")


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("preset,inpainting", PRESETS)
def test_single_file_equals_diffusers_folder(checkpoints, tmp_path, fmt, preset, inpainting):
    from sdcore.convert import convert

    single = convert(checkpoints.single_file(preset, inpainting, fmt), tmp_path / "single",
                     prediction_type="epsilon", log=lambda *_: None)
    folder = checkpoints.converted(preset, inpainting)
    for component in weights.COMPONENTS:
        config_a, a = weights.load_component(single, component)
        config_b, b = weights.load_component(folder, component)
        assert sorted(a) == sorted(b), component
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{component}.{name}")
    info = weights.read_model_info(single)
    assert info["family"] == ("sd2" if preset == "tiny-sd2" else "sd1") and info["inpainting"] is inpainting
    assert len(info["source"]["sha256_10"]) == 10
    # single files carry no tokenizer: the shipped vocabulary, padded as the family's tokenizer pads
    pad = json.loads((single / "tokenizer" / "tokenizer_config.json").read_text())["pad_token"]
    pad = pad["content"] if isinstance(pad, dict) else pad
    assert pad == ("!" if preset == "tiny-sd2" else "<|endoftext|>")


def test_legacy_vae_attention_names(checkpoints, tmp_path):
    """diffusers < 0.14 saved the VAE's mid-block attention as query/key/value/proj_attn; they convert
    to the same weights as the current names (weights.LEGACY_VAE_ATTENTION)."""
    from safetensors.numpy import load_file, save_file

    from sdcore.convert import convert

    src = tmp_path / "legacy"
    shutil.copytree(checkpoints.diffusers("tiny-sd1"), src)
    path = src / "vae" / "diffusion_pytorch_model.safetensors"
    current = {v: k for k, v in weights.LEGACY_VAE_ATTENTION.items()}
    state = load_file(path)
    legacy = {}
    for key, value in state.items():
        for new, old in current.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = value
    assert any(".proj_attn." in k for k in legacy)
    save_file(legacy, path)
    out = convert(src, tmp_path / "out", log=lambda *_: None)
    _config, ours = weights.load_component(out, "vae")
    _config, ref = weights.load_component(checkpoints.converted("tiny-sd1"), "vae")
    assert sorted(ours) == sorted(ref)
    for name in ref:
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)


def test_unsupported_config_value_is_one_line(checkpoints, tmp_path, capsys):
    src = tmp_path / "shifted"
    shutil.copytree(checkpoints.diffusers("tiny-sd1"), src)
    config = json.loads((src / "vae" / "config.json").read_text())
    config["shift_factor"] = 0.1159  # SD3's: the pipeline applies scaling_factor only
    (src / "vae" / "config.json").write_text(json.dumps(config))
    code, _, err = _run(["convert", src, "--output", tmp_path / "out"], capsys)
    _assert_one_line_error(code, err, 1, "shift_factor=0.1159")
    _assert_nothing_written(tmp_path / "out")


def test_fp16_source_is_upcast(checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    from sdcore.convert import convert

    src = checkpoints.single_file("tiny-sd1", False, "safetensors")
    half = tmp_path / "half.safetensors"
    save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in load_file(src).items()}, half)
    out = convert(half, tmp_path / "model", log=lambda *_: None)
    _config, state = weights.load_component(out, "unet")
    ref = load_file(half)["model.diffusion_model.input_blocks.0.0.weight"]
    assert state["conv_in.weight"].dtype == np.float32
    np.testing.assert_array_equal(state["conv_in.weight"], ref.astype(np.float32))


def test_sd2_single_file_prediction_type(checkpoints, tmp_path, capsys):
    src = checkpoints.single_file("tiny-sd2", False, "safetensors")
    code, stdout, err = _run(["convert", src, "--output", tmp_path / "v"], capsys)
    assert code == 0, err
    assert weights.read_model_info(tmp_path / "v")["prediction_type"] == "v_prediction"
    assert "v_prediction (SD2.x default" in stdout
    code, stdout, err = _run(["convert", src, "--output", tmp_path / "eps", "--prediction-type", "epsilon"], capsys)
    assert code == 0, err
    assert weights.read_model_info(tmp_path / "eps")["prediction_type"] == "epsilon"
    scheduler = json.loads((tmp_path / "eps" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon"


# ------------------------------------------------------------------------------------------------
# bad input: one line, non-zero exit, nothing written


def test_truncated_safetensors(checkpoints, tmp_path, capsys):
    src = checkpoints.single_file("tiny-sd1", False, "safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    code, _, err = _run(["convert", cut, "--output", tmp_path / "out"], capsys)
    _assert_one_line_error(code, err, 1, "cut.safetensors")
    _assert_nothing_written(tmp_path / "out")


def test_truncated_ckpt(checkpoints, tmp_path, capsys):
    src = checkpoints.single_file("tiny-sd1", False, "ckpt")
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size * 2 // 3])
    code, _, err = _run(["convert", cut, "--output", tmp_path / "out"], capsys)
    _assert_one_line_error(code, err, 1, "cut.ckpt")
    _assert_nothing_written(tmp_path / "out")


def test_wrong_file_type(tmp_path, capsys):
    from PIL import Image

    fake = tmp_path / "model.ckpt"
    Image.new("RGB", (8, 8)).save(fake, format="PNG")
    code, _, err = _run(["convert", fake, "--output", tmp_path / "out"], capsys)
    _assert_one_line_error(code, err, 1, "model.ckpt")
    _assert_nothing_written(tmp_path / "out")


def test_unknown_architecture(tmp_path, capsys):
    from safetensors.numpy import save_file

    src = tmp_path / "other.safetensors"
    save_file({"model.layers.0.weight": np.zeros((4, 4), np.float32)}, src)
    code, _, err = _run(["convert", src, "--output", tmp_path / "out"], capsys)
    _assert_one_line_error(code, err, 1)
    _assert_nothing_written(tmp_path / "out")


def test_missing_component(checkpoints, tmp_path, capsys):
    src = tmp_path / "no-vae"
    shutil.copytree(checkpoints.diffusers("tiny-sd1"), src)
    shutil.rmtree(src / "vae")
    code, _, err = _run(["convert", src, "--output", tmp_path / "out"], capsys)
    _assert_one_line_error(code, err, 1, "vae")
    _assert_nothing_written(tmp_path / "out")


def test_shape_mismatch_names_the_key(checkpoints, tmp_path, capsys):
    src = tmp_path / "wrong-shape"
    shutil.copytree(checkpoints.diffusers("tiny-sd1"), src)
    config = json.loads((src / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 40  # the weights have 64
    (src / "unet" / "config.json").write_text(json.dumps(config))
    code, _, err = _run(["convert", src, "--output", tmp_path / "out"], capsys)
    _assert_one_line_error(code, err, 1, "attn2.to_k.weight", "(32, 64)", "(32, 40)")
    _assert_nothing_written(tmp_path / "out")


def test_components_of_different_models(checkpoints, tmp_path, capsys):
    from diffusers import AutoencoderKL

    from sdcore.presets import preset

    src = tmp_path / "mixed"
    shutil.copytree(checkpoints.diffusers("tiny-sd1"), src)
    shutil.rmtree(src / "vae")
    AutoencoderKL(**dict(preset("tiny-sd1")["vae"], latent_channels=8)).save_pretrained(src / "vae")
    code, _, err = _run(["convert", src, "--output", tmp_path / "out"], capsys)
    _assert_one_line_error(code, err, 1, "the VAE has 8 latent channels")
    _assert_nothing_written(tmp_path / "out")


def test_existing_output_needs_overwrite(checkpoints, tmp_path, capsys):
    src = checkpoints.diffusers("tiny-sd1")
    out = tmp_path / "model"
    out.mkdir()
    code, _, err = _run(["convert", src, "--output", out], capsys)
    _assert_one_line_error(code, err, 1, "--overwrite")
    code, _, err = _run(["convert", src, "--output", out, "--overwrite"], capsys)
    assert code == 0, err
    assert weights.read_model_info(out)["family"] == "sd1"


def test_bad_arguments_exit_2(tmp_path, capsys):
    code, _, err = _run(["convert", tmp_path, "--output", tmp_path / "o", "--dtype", "int8"], capsys)
    _assert_one_line_error(code, err, 2, "--dtype")
    code, _, err = _run(["convert"], capsys)
    _assert_one_line_error(code, err, 2)
    code, _, err = _run(["convert", tmp_path / "missing.ckpt", "--output", tmp_path / "o"], capsys)
    _assert_one_line_error(code, err, 1, "does not exist")


def test_shared_helpers_import_without_torch():
    """sdcore.testing (used by tests and tools) imports the reference libraries only when called."""
    import subprocess
    import sys

    code = ("import sys, sdcore.testing.checkpoints, sdcore.testing.original_format, sdcore.testing.prompt_corpus, "
            "sdcore.convert; print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
