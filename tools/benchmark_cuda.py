"""sdcore against diffusers (PyTorch) on one NVIDIA GPU, side by side: same weights, shapes, GPU.

    python tools/benchmark_cuda.py [--config sd15|sd21|tiny] [--size 512] [--runs 10] [--steps 20]
        [--tome-ratio 0.5 ...] [--torch-compile] [--rows unet,vae,text,txt2img,compile]
        [--write docs/performance.md]

Written for issue 8; needs a CUDA GPU (sdcore's target "cuda") and the test extra (torch with CUDA,
diffusers; tomesd for the ToMe rows). Seeded random weights (speed does not depend on the values),
the UNet and text encoder in float16 on both sides, the VAE in float32 on both sides (diffusers'
force_upcast). Timings are medians of `--runs` calls, sdcore and PyTorch alternating, each call
ending in a device synchronization (sdcore returns NumPy arrays: the copy back is included).

Rows: UNet step (batch 2, CFG) as ms and it/s, against PyTorch eager (SDPA attention) and, with
`--torch-compile`, torch.compile; ToMe at each `--tome-ratio` against diffusers patched by tomesd;
VAE decode; text encode (batch 2); txt2img with Euler (each side in its own process, device memory
peak sampled every 10 ms with cudaMemGetInfo, minus the process's idle baseline); sdcore's compile,
cold and warm. A parity row per network: sdcore's output against PyTorch float32 on the same GPU,
scored by sdcore.parity.compare with the float16 thresholds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmark import (  # tools/benchmark.py: this script's folder is on sys.path
    CONFIGS,
    _median_alternating,
    _state,
    run_txt2img_children,
    txt2img_cells,
    write_report,
)

ALL_ROWS = ("unet", "vae", "text", "txt2img", "compile")


def _timed_pair(fn_a, fn_b, runs: int, sync) -> tuple[float, float]:
    """Median seconds of fn_a and fn_b (each followed by `sync()`), alternating, after 2 warm-ups."""
    return _median_alternating(fn_a, fn_b, runs, sync=sync, warmups=2)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _build(module, spec, name: str, cache_dir: str):
    from sdcore.compile import build

    t0 = time.perf_counter()
    net = build(module, spec, name=name, target="cuda", cache_dir=cache_dir)
    return net, time.perf_counter() - t0


def _networks(p: dict, size: int, cache_dir: str, tome=None) -> dict:
    """sdcore's networks on cuda: {row: (CompiledModel, build seconds)}."""
    from sdcore import weights
    from sdcore.clip.model import clip_spec
    from sdcore.unet.model import unet_spec
    from sdcore.vae.model import vae_spec

    lat = size // 8
    unet = weights.build_module("unet", p["unet"], dtype="float16", tome=tome)
    vae = weights.build_module("vae", p["vae"], functions=("decode",))
    clip = weights.build_module("text_encoder", p["text_encoder"], dtype="float16")
    tag = f"-{tome.tag()}" if tome is not None else ""
    return {
        "unet": _build(unet, unet_spec(unet.config, 2, lat, lat, dtype="float16", tome=tome), f"cuda-unet{tag}",
                       cache_dir),
        "vae": _build(vae, vae_spec(vae.config, 1, size, size, functions=("decode",)), "cuda-vae", cache_dir),
        "text": _build(clip, clip_spec(clip.config, 2), "cuda-text", cache_dir),
    }


def bench_networks(preset_name: str, size: int, rows, runs: int, cache_dir: str, ratios, torch_compile: bool,
                   log) -> dict:
    import numpy as np
    import torch

    from sdcore.parity import compare
    from sdcore.presets import preset
    from sdcore.testing.checkpoints import build_models
    from sdcore.tome import ToMeConfig

    p = preset(preset_name)
    _, unet_t, vae_t, text_t = build_models(preset_name, False, seed=0)
    states = {"unet": _state(unet_t), "vae": _state(vae_t), "text": _state(text_t)}
    nets = _networks(p, size, cache_dir)
    out = {"build_seconds": {k: s for k, (_, s) in nets.items()}}
    nets = {k: n for k, (n, _) in nets.items()}
    nets["unet"].set_params(states["unet"])
    nets["vae"].set_params({n: v for n, v in states["vae"].items() if n in nets["vae"].param_names})
    names = set(nets["text"].param_names)
    nets["text"].set_params({(k if k in names else "text_model." + k): v for k, v in states["text"].items()})

    rng = np.random.default_rng(0)
    lat = size // 8
    sample = rng.standard_normal((2, 4, lat, lat)).astype("float32")
    timestep = np.full((2,), 981.0, dtype="float32")
    context = rng.standard_normal((2, 77, p["unet"]["cross_attention_dim"])).astype("float32")
    z = rng.standard_normal((1, 4, lat, lat)).astype("float32")
    ids = rng.integers(0, p["text_encoder"]["vocab_size"], (2, 77)).astype("int32")

    cuda = torch.device("cuda")
    sync = torch.cuda.synchronize
    unet_t, vae_t, text_t = unet_t.to(cuda), vae_t.to(cuda), text_t.to(cuda)
    ts = [torch.from_numpy(x).to(cuda) for x in (sample, timestep, context)]
    zt, it = torch.from_numpy(z).to(cuda), torch.from_numpy(ids.astype("int64")).to(cuda)
    parity = {}
    with torch.no_grad():
        # parity first, against PyTorch in float32
        parity["unet"] = compare("UNet noise prediction", _first(nets["unet"].forward(sample, timestep, context)),
                                 unet_t(ts[0], ts[1], encoder_hidden_states=ts[2]).sample.cpu().numpy(), "float16")
        parity["vae"] = compare("VAE decode", _first(nets["vae"].decode(z)), vae_t.decode(zt).sample.cpu().numpy(),
                                "float32")
        parity["text"] = compare("text encoder last_hidden_state", _first(nets["text"].forward(ids)),
                                 text_t(it).last_hidden_state.cpu().numpy(), "float16")
        for row in parity.values():
            log(f"[{size}px] parity {row}")
        out["parity"] = parity

        unet_t, text_t = unet_t.half(), text_t.half()
        ts16 = [ts[0].half(), ts[1], ts[2].half()]
        it_unet = lambda: unet_t(ts16[0], ts16[1], encoder_hidden_states=ts16[2]).sample  # noqa: E731
        if "unet" in rows:
            out["unet"] = _timed_pair(lambda: nets["unet"].forward(sample, timestep, context), it_unet, runs, sync)
            log(f"[{size}px] unet {out['unet']}")
            if torch_compile:
                compiled = torch.compile(unet_t)
                out["unet_compile"] = _timed_pair(
                    lambda: nets["unet"].forward(sample, timestep, context),
                    lambda: compiled(ts16[0], ts16[1], encoder_hidden_states=ts16[2]).sample, runs, sync)
                log(f"[{size}px] unet vs torch.compile {out['unet_compile']}")
        if ratios:
            import tomesd

            out["tome"] = {}
            for ratio in ratios:
                tome = ToMeConfig(ratio=ratio, use_rand=False)
                net = _networks(p, size, cache_dir, tome)["unet"][0]
                net.set_params(states["unet"])
                tomesd.apply_patch(unet_t, ratio=ratio, use_rand=False)
                try:
                    out["tome"][ratio] = _timed_pair(lambda: net.forward(sample, timestep, context), it_unet,  # noqa: B023
                                                     runs, sync)
                finally:
                    tomesd.remove_patch(unet_t)
                log(f"[{size}px] unet tome {ratio} {out['tome'][ratio]}")
        if "vae" in rows:
            out["vae"] = _timed_pair(lambda: nets["vae"].decode(z), lambda: vae_t.decode(zt).sample, runs, sync)
            log(f"[{size}px] vae {out['vae']}")
        if "text" in rows:
            out["text"] = _timed_pair(lambda: nets["text"].forward(ids), lambda: text_t(it), runs, sync)
            log(f"[{size}px] text {out['text']}")
    return out


def bench_compile(preset_name: str, size: int, log) -> dict:
    from sdcore.presets import preset

    p = preset(preset_name)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        _networks(p, size, cache)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        _networks(p, size, cache)
        warm = time.perf_counter() - t0
    log(f"[{size}px] compile cold {cold:.1f} s, warm {warm:.1f} s")
    return {"cold": cold, "warm": warm}


# ----------------------------------------------------------------------------------------------
# whole txt2img, one subprocess per side (own device memory)


class _DevicePeak:
    """Peak device memory in use (cudaMemGetInfo, whole GPU) above the level at start, sampled."""

    def __init__(self):
        import torch

        torch.cuda.init()
        free, total = torch.cuda.mem_get_info()
        self.base, self.peak, self._stop = total - free, 0, False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import torch

        while not self._stop:
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free - self.base)
            time.sleep(0.01)

    def stop(self) -> float:
        self._stop = True
        self._thread.join()
        return self.peak / 2**20


def _child(args) -> int:
    size = args.size
    peak = _DevicePeak()
    t0 = time.perf_counter()
    if args.child == "sdcore":
        from sdcore.pipeline import StableDiffusion

        sd = StableDiffusion.load(args.model_dir, target="cuda", cache_dir=args.cache_dir)
        kw = dict(steps=args.steps, width=size, height=size, seed=0, sampler="Euler", progress=False)
        sd.txt2img("a photo of a cat", **kw)  # compiles or loads, warms up
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        sd.txt2img("a photo of a cat", **kw)
    else:
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(args.model_dir, torch_dtype=torch.float16).to("cuda")
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(num_inference_steps=args.steps, width=size, height=size, output_type="np")
        pipe("a photo of a cat", generator=torch.Generator("cuda").manual_seed(0), **kw)
        first = time.perf_counter() - t0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pipe("a photo of a cat", generator=torch.Generator("cuda").manual_seed(0), **kw)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({"first": first, "seconds": seconds, "peak_mb": peak.stop()}))
    return 0


def bench_txt2img(preset_name: str, size: int, steps: int, cache_dir: str, log) -> dict:
    """{side: {"first", "seconds", "peak_mb"} or {"error": text}} for sdcore and diffusers."""
    return run_txt2img_children(__file__, preset_name, size, log, ["--steps", str(steps), "--cache-dir", cache_dir])


# ----------------------------------------------------------------------------------------------
# report


def _r(a: float, b: float) -> str:
    return f"**{a / b:.2f}x**"


def format_table(config: str, size: int, res: dict, steps: int, runs: int) -> str:
    import torch
    import tvm

    import sdcore

    gpu = torch.cuda.get_device_name(0)
    lines = [
        f"GPU: {gpu}; {time.strftime('%Y-%m-%d')}; sdcore {sdcore.__version__}, TVM {tvm.__version__}, "
        f"torch {torch.__version__}; config {config}, {size}x{size}, UNet and text encoder float16, VAE float32, "
        f"random weights, median of {runs} alternating runs. Ratios are time sdcore / PyTorch "
        "(below 1: sdcore faster).",
        "",
        "| row | sdcore | PyTorch | sdcore / PyTorch |",
        "|---|---|---|---|",
    ]
    if "unet" in res:
        a, b = res["unet"]
        lines.append(f"| UNet step (batch 2, CFG) vs eager SDPA | {a * 1e3:.1f} ms ({1 / a:.2f} it/s) | "
                     f"{b * 1e3:.1f} ms ({1 / b:.2f} it/s) | {_r(a, b)} |")
    if "unet_compile" in res:
        a, b = res["unet_compile"]
        lines.append(f"| UNet step vs torch.compile | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {_r(a, b)} |")
    for ratio, (a, b) in res.get("tome", {}).items():
        lines.append(f"| UNet step, ToMe {ratio:g} (vs diffusers+tomesd) | {a * 1e3:.1f} ms ({1 / a:.2f} it/s) | "
                     f"{b * 1e3:.1f} ms | {_r(a, b)} |")
    if "vae" in res:
        a, b = res["vae"]
        lines.append(f"| VAE decode (float32) | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {_r(a, b)} |")
    if "text" in res:
        a, b = res["text"]
        lines.append(f"| text encode (batch 2) | {a * 1e3:.2f} ms | {b * 1e3:.2f} ms | {_r(a, b)} |")
    if "txt2img" in res:
        for cells in txt2img_cells(res["txt2img"], f"txt2img, {steps} steps, Euler (warm)", "peak_mb",
                                   "peak device memory, txt2img"):
            lines.append("| " + " | ".join(cells) + " |")
    if "compile" in res:
        lines.append(f"| sdcore compile, cold (UNet+VAE decode+text) | {res['compile']['cold']:.0f} s | | |")
        lines.append(f"| sdcore start, warm cache | {res['compile']['warm']:.1f} s | | |")
    lines += ["", "| parity against PyTorch float32 | max rel | PSNR dB | within threshold |", "|---|---|---|---|"]
    for row in res.get("parity", {}).values():
        lines.append(f"| {row.name} | {row.max_rel:.2e} | {row.psnr:.1f} | {'yes' if row.ok else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sd15", choices=sorted(CONFIGS))
    parser.add_argument("--size", type=int, help="image size in pixels (default: the config's largest)")
    parser.add_argument("--steps", type=int, default=20, help="txt2img steps")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--rows", default=",".join(ALL_ROWS))
    parser.add_argument("--tome-ratio", type=float, nargs="*", default=[])
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile's UNet")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--log-schedule", action="store_true",
                        help="log each kernel for which a dlight rule raised and a later rule was used")
    parser.add_argument("--write", type=Path, help="put the table into this Markdown file")
    parser.add_argument("--child", choices=["sdcore", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args)

    import logging

    import tvm

    if args.log_schedule:
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("sdcore.schedule").setLevel(logging.DEBUG)
    if not tvm.cuda(0).exist:
        print("error: no CUDA GPU is visible to TVM; this benchmark runs on the GPU machine.", file=sys.stderr)
        return 2
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ALL_ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}: choose from {', '.join(ALL_ROWS)}")
    if any(not 0 < r <= 0.75 for r in args.tome_ratio):
        parser.error("--tome-ratio values must be in (0, 0.75]")
    preset_name, sizes, _ = CONFIGS[args.config]
    size = args.size or max(sizes)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="sdcore-cuda-bench-")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    res = bench_networks(preset_name, size, rows, args.runs, cache, args.tome_ratio, args.torch_compile, log)
    if "compile" in rows:
        res["compile"] = bench_compile(preset_name, size, log)
    if "txt2img" in rows:
        res["txt2img"] = bench_txt2img(preset_name, size, args.steps, cache, log)
    table = format_table(args.config, size, res, args.steps, args.runs)
    print(table)
    if args.write:
        write_report(args.write, table, " ".join(sys.argv[1:] if argv is None else argv),
                     start=f"<!-- cuda-{args.config}-{size}:start -->", end=f"<!-- cuda-{args.config}-{size}:end -->",
                     tool="benchmark_cuda.py", heading=f"## CUDA: {args.config} {size}x{size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
