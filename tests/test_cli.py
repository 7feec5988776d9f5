"""The `sdcore` command on a converted tiny model: a txt2img run writes a PNG with its parameters, and
every bad argument ends in one line on stderr and exit status 2 (1 for unreadable inputs), before
any compile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from sdcore.cli import main


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (128, 128), (200, 30, 30)).save(root / "init.png")
    mask = np.zeros((128, 128), np.uint8)
    mask[32:96, 32:96] = 255
    Image.fromarray(mask).save(root / "mask.png")
    Image.new("L", (64, 64), 255).save(root / "small-mask.png")
    return root


def test_txt2img_writes_png_with_parameters(checkpoints, compile_cache, tmp_path, capsys):
    model = checkpoints.converted("tiny-sd1")
    out = tmp_path / "out.png"
    code, stdout, err = _run(["txt2img", "--model", model, "--prompt", "a red circle", "--negative-prompt", "blurry",
                              "--steps", "3", "--sampler", "Euler a", "--seed", "42", "--cache-dir", compile_cache,
                              "--no-progress", "--output", out], capsys)
    assert code == 0, err
    assert f"wrote {out}" in stdout
    assert Image.open(out).size == (128, 128)
    text = Image.open(out).text["parameters"]
    assert text.startswith("a red circle\nNegative prompt: blurry\n")
    for fragment in ("Steps: 3", "Sampler: Euler a", "CFG scale: 7.5", "Seed: 42", "Size: 128x128"):
        assert fragment in text, text
    assert not [p for p in tmp_path.iterdir() if p.name != "out.png"], "temporary file left behind"


BAD = {
    "unknown sampler": (["txt2img", "--sampler", "Heun++ 9000"], 2, "sampler"),
    "size not a multiple of 8": (["txt2img", "--width", "100"], 2, "multiple of 8"),
    "size too small": (["txt2img", "--height", "16"], 2, "between 64"),
    "steps zero": (["txt2img", "--steps", "0"], 2, "steps"),
    "guidance negative": (["txt2img", "--guidance-scale", "-1"], 2, "guidance"),
    "batch size zero": (["txt2img", "--batch-size", "0"], 2, "batch size"),
    "seed negative": (["txt2img", "--seed", "-5"], 2, "seed"),
    "threads zero": (["txt2img", "--threads", "0"], 2, "threads"),
    "float16 on the cpu": (["txt2img", "--dtype", "float16"], 2, "float16 needs the cuda target"),
    "unknown dtype": (["txt2img", "--dtype", "bfloat16"], 2, "invalid choice"),
    "clip skip too large": (["txt2img", "--clip-skip", "9"], 2, "clip skip"),
    "not a png": (["txt2img", "--output", "{tmp}/x.jpg"], 2, ".png"),
    "missing output folder": (["txt2img", "--output", "{tmp}/no/x.png"], 2, "does not exist"),
    "latents wrong shape": (["txt2img", "--latents", "{tmp}/lat.npy"], 2, "latents have shape"),
    "missing init image": (["img2img", "--init-image", "{tmp}/none.png"], 2, "does not exist"),
    "missing image": (["img2img", "--image", "{tmp}/none.png"], 2, "--image"),
    "missing mask image": (["inpaint", "--image", "{img}/init.png", "--mask-image", "{tmp}/none.png"], 2,
                           "--mask-image"),
    "strength above 1": (["img2img", "--init-image", "{img}/init.png", "--strength", "1.5"], 2, "strength"),
    "strength zero": (["img2img", "--init-image", "{img}/init.png", "--strength", "0"], 2, "strength"),
    "strength negative": (["img2img", "--init-image", "{img}/init.png", "--strength", "-0.1"], 2, "strength"),
    "mask size mismatch": (["inpaint", "--init-image", "{img}/init.png", "--mask", "{img}/small-mask.png"], 2,
                           "same size"),
    "missing mask": (["inpaint", "--init-image", "{img}/init.png"], 2, "--mask-image"),
    "init image not an image": (["img2img", "--init-image", "{tmp}/lat.npy"], 1, "not a readable image"),
    "txt2img on inpainting model": (["txt2img", "--model", "{inpaint}"], 2, "inpainting model"),
    "unknown option": (["txt2img", "--frobnicate"], 2, "unrecognized"),
    "tome ratio above max": (["txt2img", "--tome-ratio", "0.9"], 2, "above the maximum 0.75"),
    "tome ratio negative": (["txt2img", "--tome-ratio", "-0.2"], 2, "negative"),
    "tome merge unknown": (["txt2img", "--tome-ratio", "0.5", "--tome-merge", "attn,conv"], 2, "--tome-merge"),
    "tome downsample": (["txt2img", "--tome-ratio", "0.5", "--tome-max-downsample", "3"], 2, "invalid choice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments(case, checkpoints, images, tmp_path, capsys):
    argv, expected_code, fragment = BAD[case]
    np.save(tmp_path / "lat.npy", np.zeros((1, 4, 3, 3), np.float32))
    fills = {"tmp": tmp_path, "img": images}
    if "{inpaint}" in argv:
        fills["inpaint"] = checkpoints.converted("tiny-sd1", inpainting=True)
    argv = [a.format(**fills) for a in argv]
    command, rest = argv[0], argv[1:]
    base = [command, "--prompt", "x", "--steps", "4", "--output", str(tmp_path / "o.png")]
    if "--model" not in rest:
        base += ["--model", str(checkpoints.converted("tiny-sd1"))]
    capsys.readouterr()  # drop what building the fixtures printed
    code, _, err = _run(base + rest, capsys)
    lines = [line for line in err.strip().splitlines() if line]
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert not (tmp_path / "o.png").exists()


def test_inpaint_with_diffusers_flag_names(checkpoints, compile_cache, images, tmp_path, capsys):
    """--image and --mask-image (diffusers' image= and mask_image=); --init-image/--mask are the same flags."""
    out = tmp_path / "out.png"
    code, stdout, err = _run(["inpaint", "--model", checkpoints.converted("tiny-sd1"), "--prompt", "a red circle",
                              "--image", images / "init.png", "--mask-image", images / "mask.png", "--steps", "2",
                              "--seed", "3", "--cache-dir", compile_cache, "--no-progress", "--output", out], capsys)
    assert code == 0, err
    assert Image.open(out).size == (128, 128)
    assert "Denoising strength: 1.0" in Image.open(out).text["parameters"]


def _with_sample_size(checkpoints, tmp_path, sample_size):
    model = tmp_path / "model"
    shutil.copytree(checkpoints.converted("tiny-sd1"), model)
    path = model / "unet" / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), sample_size=sample_size)))
    return model


def test_sample_size_as_height_and_width(checkpoints, compile_cache, tmp_path, capsys):
    """diffusers allows a UNet sample_size of [height, width]: the default image size follows it."""
    from sdcore.pipeline import StableDiffusion

    model = _with_sample_size(checkpoints, tmp_path, [8, 12])  # latents: 64 x 96 pixels
    pipe = StableDiffusion.load(model, cache_dir=compile_cache)
    assert (pipe.default_height, pipe.default_width) == (64, 96)
    out = tmp_path / "out.png"
    capsys.readouterr()
    code, _, err = _run(["txt2img", "--model", model, "--prompt", "a red circle", "--steps", "2", "--seed", "1",
                         "--cache-dir", compile_cache, "--no-progress", "--output", out], capsys)
    assert code == 0, err
    assert Image.open(out).size == (96, 64)  # PIL: (width, height)
    assert "Size: 96x64" in Image.open(out).text["parameters"]


@pytest.mark.parametrize("sample_size", [[8, 12, 4], [8, "12"], 0])
def test_bad_sample_size_is_one_line(sample_size, checkpoints, tmp_path, capsys):
    model = _with_sample_size(checkpoints, tmp_path, sample_size)
    capsys.readouterr()
    code, _, err = _run(["txt2img", "--model", model, "--prompt", "x", "--output", tmp_path / "o.png"], capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ") and "sample_size" in err, err


@pytest.mark.parametrize("model", ["empty", "missing"])
def test_bad_model_dir(model, tmp_path, capsys):
    path = tmp_path / "model"
    if model == "empty":
        path.mkdir()
    code, _, err = _run(["txt2img", "--model", path, "--prompt", "x", "--output", tmp_path / "o.png"], capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    assert ("no sdcore.json" if model == "empty" else "does not exist") in err


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_damaged_weight_file(damage, checkpoints, tmp_path, capsys):
    import shutil

    from sdcore import weights

    model = tmp_path / "model"
    shutil.copytree(checkpoints.converted("tiny-sd1"), model)
    path = weights.weight_path(model, "text_encoder")  # the first network loaded
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000] if damage == "truncated" else b"\xff" * 8 + data[8:])
    capsys.readouterr()  # what making the checkpoint printed
    code, _, err = _run(["txt2img", "--model", model, "--prompt", "x", "--output", tmp_path / "o.png"], capsys)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    assert "text_encoder/model.safetensors" in err
    assert not (tmp_path / "o.png").exists()


def test_default_threads_are_every_cpu():
    """TVM alone would start half the CPUs (it takes each pair for one hyper-threaded core)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    code = ("from sdcore.compile import set_threads; n = set_threads(); import tvm, tvm_ffi; "
            "print(n, tvm_ffi.get_global_func('runtime.NumThreads')())")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    cpus = str(len(os.sched_getaffinity(0)))
    assert done.stdout.split() == [cpus, cpus]


def test_bad_thread_variable(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("TVM_NUM_THREADS", "many")
    code, _out, err = _run(["txt2img", "--prompt", "a red circle", "--output", tmp_path / "x.png"], capsys)
    assert code == 2 and "TVM_NUM_THREADS" in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kwargs,message", [
    (dict(tome="half"), "tome must be a ratio"),
    (dict(width="wide"), "width 'wide' is not a number"),
])
def test_python_api_bad_arguments_are_usage_errors(kwargs, message):
    """Arguments only the Python API can pass wrongly: one UsageError line, before anything compiles."""
    from sdcore import StableDiffusion
    from sdcore.errors import UsageError

    with pytest.raises(UsageError, match=message) as err:
        StableDiffusion.load().txt2img("a red circle", **kwargs)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
