"""The `sdcore` command: `convert`, `txt2img`, `img2img`, `inpaint`.

Every user error ends in one line on stderr and a non-zero exit: 2 for bad arguments, 1 for bad
input files; never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sdcore.errors import SdcoreError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2 (argparse prints the usage block too)
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a diffusers folder or a .safetensors/.ckpt file into an sdcore model",
                       description="Convert a Stable Diffusion 1.x/2.x checkpoint (diffusers folder, or single-file "
                                   ".safetensors/.ckpt in the original format) into an sdcore model directory.")
    p.add_argument("src", help="diffusers pipeline folder, or a .safetensors / .ckpt file")
    p.add_argument("--output", "-o", required=True, help="model directory to write (written atomically)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"],
                   help="storage dtype of the converted weights (default float32; fp16 sources are upcast)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="override the prediction type (the weights of SD2.x cannot tell it)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_const", const=True,
                     help="use the EMA weights (the default when a full EMA copy is present)")
    ema.add_argument("--no-ema", dest="use_ema", action="store_const", const=False, help="use the non-EMA weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def _run_convert(args) -> int:
    from sdcore.convert import convert

    convert(args.src, args.output, dtype=args.dtype, prediction_type=args.prediction_type,
            use_ema=args.use_ema, overwrite=args.overwrite)
    return 0


def _add_generate(sub, mode: str) -> None:
    helps = {"txt2img": "generate images from a prompt", "img2img": "redraw an init image following a prompt",
             "inpaint": "repaint the white area of a mask"}
    p = sub.add_parser(mode, help=helps[mode], description=helps[mode].capitalize() + ".")
    p.add_argument("--model", default=None,
                   help="converted sdcore model directory (see `sdcore convert`); default: the embedded "
                        "shapes demo model (docs/demo-model.md)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", "--cfg-scale", type=float, default=7.5)
    p.add_argument("--sampler", default="DPM++ 2M Karras", help="e.g. 'Euler a', 'DDIM', 'DPM++ 2M Karras', 'PLMS'")
    p.add_argument("--seed", type=int, default=None, help="random if not given; image i of a batch uses seed+i")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--clip-skip", type=int, default=None,
                   help="diffusers' clip_skip: 1 uses the penultimate text-encoder layer (A1111's 'Clip skip: 2')")
    if mode == "txt2img":
        p.add_argument("--width", type=int, default=None, help="multiple of 8; default: the model's training size")
        p.add_argument("--height", type=int, default=None)
        p.add_argument("--latents", type=Path, help="x_T as a .npy of shape [batch, 4, height/8, width/8]")
    else:
        p.add_argument("--image", "--init-image", type=Path, required=True,
                       help="the image to start from (PNG, JPEG, ...); --init-image is the same (A1111's name)")
        p.add_argument("--strength", type=float, default=0.75 if mode == "img2img" else 1.0,
                       help="0..1: how much to change; int(strength*steps) steps run")
    if mode == "inpaint":
        p.add_argument("--mask-image", "--mask", type=Path, required=True,
                       help="same size as --image; white = repaint")
    tome = p.add_argument_group("token merging (ToMe, as tomesd)")
    tome.add_argument("--tome-ratio", type=float, default=0.0,
                      help="fraction of tokens merged in the merging blocks (0 = off; at most 0.75 with 2x2 stride)")
    tome.add_argument("--tome-max-downsample", type=int, default=1, choices=[1, 2, 4, 8],
                      help="merge in blocks downsampled at most this much (default 1: the highest resolution)")
    tome.add_argument("--tome-stride", type=int, default=2, help="destination stride sx = sy (default 2)")
    tome.add_argument("--tome-merge", default="attn",
                      help="comma list of what runs on merged tokens: attn, crossattn, mlp (default attn)")
    tome.add_argument("--tome-no-rand", action="store_true",
                      help="top-left destination of each window instead of a random one (seeded)")
    p.add_argument("--target", default="cpu", choices=["cpu", "llvm", "cuda", "auto"])
    p.add_argument("--dtype", default=None, choices=["float32", "float16"],
                   help="UNet and text encoder precision (default: float16 on cuda, float32 on the CPU; "
                        "the VAE is float32)")
    p.add_argument("--cache-dir", type=Path, default=None, help="compiled-library cache (default ~/.cache/sdcore)")
    p.add_argument("--low-memory", action="store_true", help="free each network's weights after its stage")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: TVM_NUM_THREADS if set, else every CPU this process may use)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--output", "-o", type=Path, required=True, help="PNG file (batch: FILE-0.png, FILE-1.png, ...)")


def _tome_config(args):
    if not args.tome_ratio:
        return None
    from sdcore.tome import ToMeConfig

    parts = {m.strip() for m in args.tome_merge.split(",") if m.strip()}
    if not parts or parts - {"attn", "crossattn", "mlp"}:
        raise UsageError(f"--tome-merge {args.tome_merge!r}: use a comma list of attn, crossattn, mlp.")
    tome = ToMeConfig(ratio=args.tome_ratio, max_downsample=args.tome_max_downsample, sx=args.tome_stride,
                      sy=args.tome_stride, use_rand=not args.tome_no_rand, merge_attn="attn" in parts,
                      merge_crossattn="crossattn" in parts, merge_mlp="mlp" in parts)
    logging.getLogger("sdcore.tome").setLevel(logging.INFO)  # say which blocks merge, once per compile
    return tome


def _run_generate(args) -> int:
    import numpy as np

    from sdcore.images import save_png
    from sdcore.pipeline import StableDiffusion

    if args.output.suffix.lower() != ".png":
        raise UsageError(f"--output {args.output} must end in .png.")
    if not args.output.parent.exists():
        raise UsageError(f"the folder of --output ({args.output.parent}) does not exist.")
    tome = _tome_config(args)
    for attr in ("image", "mask_image"):
        path = getattr(args, attr, None)
        if path is not None and not path.exists():
            raise UsageError(f"--{attr.replace('_', '-')} {path} does not exist.")
    latents = None
    if getattr(args, "latents", None) is not None:
        try:
            latents = np.load(args.latents, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UsageError(f"--latents {args.latents} is not a readable .npy file ({err}).") from None
    pipe = StableDiffusion.load(args.model, target=args.target, cache_dir=args.cache_dir, low_memory=args.low_memory,
                                threads=args.threads, dtype=args.dtype)
    common = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance_scale=args.guidance_scale,
                  sampler=args.sampler, seed=args.seed, batch_size=args.batch_size, clip_skip=args.clip_skip,
                  progress=not args.no_progress, tome=tome)
    if args.command == "txt2img":
        result = pipe.txt2img(args.prompt, width=args.width, height=args.height, latents=latents, **common)
    elif args.command == "img2img":
        result = pipe.img2img(args.prompt, args.image, strength=args.strength, **common)
    else:
        result = pipe.inpaint(args.prompt, args.image, args.mask_image, strength=args.strength, **common)
    for i, (image, params) in enumerate(zip(result.images, result.parameters)):
        path = args.output if len(result.images) == 1 else args.output.with_name(f"{args.output.stem}-{i}.png")
        save_png(image, path, params)
        print(f"wrote {path} (seed {params['seed']}, {result.timings['total']:.1f} s)")
    return 0


def _run_parity(args) -> int:
    from sdcore.parity import main as parity_main

    return parity_main(args.parity_args)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdcore", description="Stable Diffusion in Apache TVM Relax.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log compile and cache details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_convert(sub)
    for mode in ("txt2img", "img2img", "inpaint"):
        _add_generate(sub, mode)
    p = sub.add_parser("parity", help="compare a converted model with diffusers, layer by layer",
                       description="Same as `python -m sdcore.parity`; its arguments follow (see `sdcore parity -h`).",
                       add_help=False)
    p.add_argument("parity_args", nargs=argparse.REMAINDER)
    return parser


COMMANDS = {"convert": _run_convert, "txt2img": _run_generate, "img2img": _run_generate, "inpaint": _run_generate,
            "parity": _run_parity}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(name)s: %(message)s")
        return COMMANDS[args.command](args)
    except SdcoreError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
