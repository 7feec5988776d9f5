"""Convert a Stable Diffusion checkpoint into an sdcore model directory.

    python tools/convert_weights.py SRC --output DIR [--dtype float32|float16]
        [--prediction-type epsilon|v_prediction] [--ema | --no-ema] [--overwrite]

SRC is a diffusers pipeline folder or a single-file SD1.x/SD2.x .safetensors/.ckpt. The same as
`sdcore convert`; the logic lives in sdcore/convert/.
"""

import sys

from sdcore.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
