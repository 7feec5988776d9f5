"""The user-facing parity tool on a converted (tiny) model: it prints a table per network and exits 0."""

from __future__ import annotations

from sdcore.cli import main as cli_main
from sdcore.parity import main


def test_parity_tool_on_converted_model(checkpoints, compile_cache, capsys):
    model = checkpoints.converted("tiny-sd2")
    code = main([str(model), "--cache-dir", str(compile_cache), "--width", "128", "--height", "96"])
    out = capsys.readouterr().out
    assert code == 0, out
    for title in ("text_encoder (", "unet (batch 2, 12x16 latents", "vae (128x96"):
        assert title in out
    assert "| noise prediction |" in out and "| decode.sample |" in out and "| last_hidden_state |" in out
    assert "all layers within tolerance" in out


def test_parity_tool_bad_input(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.startswith("error: model directory")
    assert cli_main(["parity", str(tmp_path), "--components", "unet"]) == 1  # not a converted model
    assert "no sdcore.json" in capsys.readouterr().err


def test_parity_tool_float16_needs_cuda(checkpoints, capsys):
    model = checkpoints.converted("tiny-sd1")
    capsys.readouterr()  # drop what building the fixture printed
    assert main([str(model), "--dtype", "float16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "float16 needs --target cuda" in err[0], err
