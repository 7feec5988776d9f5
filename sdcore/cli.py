"""The `sdcore` command: `sdcore convert SRC --output DIR` (more subcommands arrive with the pipeline).

Every user error ends in one line on stderr and a non-zero exit: 2 for bad arguments, 1 for bad
input files; never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sdcore.errors import SdcoreError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2 (argparse prints the usage block too)
        raise SdcoreError(f"{self.prog}: {message} (see --help)", exit_code=2)


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdcore", description="Stable Diffusion in Apache TVM Relax.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log compile and cache details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_convert(sub)
    return parser


COMMANDS = {"convert": _run_convert}


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
