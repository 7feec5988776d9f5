"""Token merging on the CPU: sdcore's UNet with ToMe compiled in vs diffusers' UNet patched by tomesd.

For each ratio: the UNet step (batch 2, as with guidance) of both, timed alternately in this one
process (median of --runs), and the PSNR of sdcore's final txt2img image against its own ratio-0
image from the same x_T (random weights, so this is a measure of how much merging moves the
result, not of quality). Writes its table between the `tome` markers of docs/performance.md.

    python tools/bench_tome.py --size 512 --runs 3 --write docs/performance.md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchmark import _median_alternating, write_report  # tools/benchmark.py: this script's folder is on sys.path

START, END = "<!-- tome:start -->", "<!-- tome:end -->"


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sd15", help="sdcore.presets name (random weights)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--ratios", default="0,0.3,0.5,0.6")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="txt2img steps for the PSNR column (0: skip it)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--write", type=Path)
    args = parser.parse_args(argv)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)

    import tomesd
    import torch

    from sdcore.convert import convert
    from sdcore.pipeline import StableDiffusion
    from sdcore.testing.checkpoints import write_diffusers
    from sdcore.tome import ToMeConfig

    torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    lat = args.size // 8
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    with tempfile.TemporaryDirectory() as tmp:
        src, model = Path(tmp) / "diffusers", Path(tmp) / "sdcore"
        write_diffusers(src, args.preset, False, seed=0, prediction_type="epsilon")
        convert(src, model, log=lambda *_: None)
        from diffusers import UNet2DConditionModel

        unet_t = UNet2DConditionModel.from_pretrained(src / "unet").eval()
        pipe = StableDiffusion.load(model, cache_dir=args.cache_dir)
        rng = np.random.default_rng(0)
        sample = rng.standard_normal((2, 4, lat, lat)).astype(np.float32)
        timestep = np.full((2,), 501.0, np.float32)
        context = rng.standard_normal((2, 77, unet_t.config.cross_attention_dim)).astype(np.float32)
        ts = [torch.from_numpy(x) for x in (sample, timestep, context)]
        x_t = np.random.Generator(np.random.PCG64(1)).standard_normal((1, 4, lat, lat), dtype=np.float32)

        rows, base_image = [], None
        for ratio in ratios:
            tome = ToMeConfig(ratio=ratio, use_rand=False) if ratio else None
            log(f"ratio {ratio}: compiling")
            unet = pipe.unet(2, lat, lat, 77, tome)
            tomesd.remove_patch(unet_t)
            if ratio:
                tomesd.apply_patch(unet_t, ratio=ratio, use_rand=False)
            with torch.no_grad():
                ours, theirs = _median_alternating(lambda: unet.forward(sample, timestep, context),  # noqa: B023
                                                   lambda: unet_t(*ts[:2], encoder_hidden_states=ts[2]).sample,
                                                   args.runs)
            log(f"ratio {ratio}: sdcore {ours:.2f} s, diffusers+tomesd {theirs:.2f} s")
            psnr = None
            if args.steps:
                image = np.asarray(pipe.txt2img("a photo", steps=args.steps, seed=1, latents=x_t, width=args.size,
                                                height=args.size, progress=False, tome=tome).images[0])
                base_image = image if base_image is None else base_image
                psnr = _psnr(image, base_image)
            rows.append((ratio, ours, theirs, psnr))

    first = rows[0]
    lines = [f"{args.preset} shapes, {args.size}x{args.size} ({lat}x{lat} latents), UNet batch 2, fp32, "
             f"{args.threads} threads, median of {args.runs} alternating runs, {time.strftime('%Y-%m-%d')}; "
             f"ToMe options: tomesd's defaults (max_downsample 1, 2x2 stride, merge_attn) with use_rand off. "
             f"PSNR: final {args.steps}-step DPM++ 2M Karras image vs ratio 0, same x_T, random weights.", "",
             "| ratio | sdcore UNet step | diffusers+tomesd | sdcore / PyTorch | sdcore speed-up vs ratio 0 "
             "| PSNR vs ratio 0 |", "|---|---|---|---|---|---|"]
    for ratio, ours, theirs, psnr in rows:
        p = "" if psnr is None else ("inf" if math.isinf(psnr) else f"{psnr:.1f} dB")
        lines.append(f"| {ratio:g} | {ours * 1000:.0f} ms | {theirs * 1000:.0f} ms | {ours / theirs:.2f}x "
                     f"| {first[1] / ours:.2f}x | {p} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        write_report(args.write, table, " ".join(sys.argv[1:] if argv is None else argv), start=START, end=END,
                     tool="bench_tome.py", heading="## Token merging (ToMe)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
