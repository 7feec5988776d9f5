"""Write a random-weight Stable Diffusion checkpoint with diffusers, for tests, benchmarks and demos.

    python tools/make_random_checkpoint.py OUT [--preset tiny-sd1|tiny-sd2|sd15|sd21] [--inpainting]
        [--format diffusers|safetensors|ckpt] [--seed 0] [--prediction-type epsilon|v_prediction]

`diffusers` writes a pipeline folder (what `save_pretrained` writes); `safetensors`/`ckpt` write one
file in the original CompVis/Stability key layout (what civitai-style single files contain).
Needs the test extra (torch, diffusers, transformers): `pip install -e ".[test]"`.
The weights are seeded random numbers: the model paints noise. It exists to exercise conversion,
compilation and parity with real shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdcore.presets import PRESETS, preset  # noqa: E402


def build_models(preset_name: str, inpainting: bool, seed: int):
    """(unet, vae, text_encoder) torch modules with seeded random weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    p = preset(preset_name, inpainting=inpainting)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**p["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**p["vae"])
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**p["text_encoder"]))
    return p, unet.eval(), vae.eval(), text_encoder.eval()


def write_diffusers(out: Path, preset_name: str, inpainting: bool, seed: int, prediction_type: str) -> None:
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from sdcore.tokenizer import write_vocab_files

    p, unet, vae, text_encoder = build_models(preset_name, inpainting, seed)
    with tempfile.TemporaryDirectory() as tmp:
        write_vocab_files(tmp, pad_token="!" if p["family"] == "sd2" else "<|endoftext|>")
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                              prediction_type=prediction_type)
    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)


def write_single_file(out: Path, preset_name: str, inpainting: bool, seed: int, fmt: str) -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "parity"))
    from original_format import to_original  # the test suite's diffusers -> original writer

    p, unet, vae, text_encoder = build_models(preset_name, inpainting, seed)
    state = to_original(unet.state_dict(), vae.state_dict(), text_encoder.state_dict(), family=p["family"],
                        unet_config=unet.config, vae_config=vae.config, text_config=text_encoder.config)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    else:
        torch.save({"state_dict": state, "global_step": 0}, str(out))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", default="tiny-sd1", choices=sorted(PRESETS))
    parser.add_argument("--inpainting", action="store_true")
    parser.add_argument("--format", default="diffusers", choices=["diffusers", "safetensors", "ckpt"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"])
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} already exists", file=sys.stderr)
        return 1
    if args.format == "diffusers":
        write_diffusers(args.out, args.preset, args.inpainting, args.seed, args.prediction_type)
    else:
        write_single_file(args.out, args.preset, args.inpainting, args.seed, args.format)
    print(json.dumps({"wrote": str(args.out), "preset": args.preset, "inpainting": args.inpainting,
                      "format": args.format}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
