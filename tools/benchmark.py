"""sdcore against diffusers (PyTorch) on the CPU, side by side, same weights, threads and shapes.

    python tools/benchmark.py [--config sd15|sd21|tiny] [--size 512 ...] [--steps 20] [--runs 5]
        [--threads N] [--rows unet,vae,text,txt2img] [--tome-ratio 0.5 ...] [--write docs/performance.md]

For each size it builds diffusers' UNet, VAE and text encoder with seeded random weights (speed does
not depend on the values), binds the same weights into sdcore's networks, and times both sides in
one process, alternating sdcore and PyTorch call by call, taking the median of `--runs` runs each.
The headline is the ratio sdcore / PyTorch: absolute times on a shared machine drift, a ratio taken
in the same minute does much less. Rows:

- unet: one denoising step with guidance (batch 2, 77 tokens)
  (with `--tome-ratio R ...` also with token merging at each ratio: sdcore's graph with ToMe
  compiled in against diffusers' UNet patched by tomesd, use_rand off on both sides)
- vae: VAE decode of one latent
- text: text encoding of a prompt and a negative prompt (batch 2)
- txt2img: a whole generation of S steps, each side in its own subprocess (so each has its own peak
  resident memory), through sdcore's `StableDiffusion` and diffusers' `StableDiffusionPipeline`
  on the same random-weight checkpoint
- compile: sdcore's cold compile of the three networks (empty cache) and warm start (cache hit:
  export, hash, load), measured on the networks built for the first size

`--config tiny` is the seconds-long smoke run CI uses. `--write FILE` writes the table as Markdown
with the machine, thread count, versions and date. Needs the test extra (torch, diffusers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {  # name: (preset, sizes in pixels, default steps)
    "sd15": ("sd15", (256, 512), 20),
    "sd21": ("sd21", (512, 768), 20),
    "tiny": ("tiny-sd1", (64,), 2),
}
ALL_ROWS = ("unet", "vae", "text", "txt2img", "compile")


def _threads(n: int | None) -> int:
    return n or len(os.sched_getaffinity(0))


def _median_alternating(fn_a, fn_b, runs: int, sync=None, warmups: int = 1) -> tuple[float, float]:
    """Median seconds of fn_a and fn_b, called alternately after `warmups` calls each; `sync()`
    (a device synchronization) ends every timed call when given."""
    sync = sync or (lambda: None)
    for _ in range(warmups):
        fn_a()
        fn_b()
        sync()
    ta, tb = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn_a()
        sync()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fn_b()
        sync()
        tb.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def _state(module) -> dict:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _build_all(p: dict, size: int, cache_dir: str, use_cache: bool = True):
    """sdcore's three networks for `size` pixels, each with its build seconds."""
    from sdcore import weights
    from sdcore.clip.model import clip_spec
    from sdcore.compile import build
    from sdcore.unet.model import unet_spec
    from sdcore.vae.model import vae_spec

    lat = size // 8
    nets, seconds = {}, {}
    unet = weights.build_module("unet", p["unet"])
    t0 = time.perf_counter()
    nets["unet"] = build(unet, unet_spec(unet.config, 2, lat, lat), name="bench-unet", cache_dir=cache_dir,
                         use_cache=use_cache)
    seconds["unet"] = time.perf_counter() - t0
    vae = weights.build_module("vae", p["vae"], functions=("decode",))
    t0 = time.perf_counter()
    nets["vae"] = build(vae, vae_spec(vae.config, 1, size, size, functions=("decode",)), name="bench-vae",
                        cache_dir=cache_dir, use_cache=use_cache)
    seconds["vae"] = time.perf_counter() - t0
    clip = weights.build_module("text_encoder", p["text_encoder"])
    t0 = time.perf_counter()
    nets["text"] = build(clip, clip_spec(clip.config, 2), name="bench-text", cache_dir=cache_dir,
                         use_cache=use_cache)
    seconds["text"] = time.perf_counter() - t0
    return nets, seconds


def bench_size(preset_name: str, size: int, rows, runs: int, cache_dir: str, log, tome_ratios=()) -> dict:
    """Timings of the per-network rows at one size: {row: (sdcore s, torch s)} plus compile seconds;
    with `tome_ratios`, {"tome": {ratio: (sdcore s, diffusers+tomesd s)}} for the UNet step too."""
    import numpy as np
    import torch

    from sdcore.presets import preset
    from sdcore.testing.checkpoints import build_models

    p = preset(preset_name)
    _, unet_t, vae_t, text_t = build_models(preset_name, False, seed=0)
    log(f"[{size}px] building sdcore networks (cache {cache_dir})")
    nets, seconds = _build_all(p, size, cache_dir)
    out = {"build_seconds": seconds}
    nets["unet"].set_params(_state(unet_t))
    nets["vae"].set_params({n: v for n, v in _state(vae_t).items() if n in nets["vae"].param_names})
    # transformers 5 drops the "text_model." prefix from CLIPTextModel's state dict keys
    names = set(nets["text"].param_names)
    nets["text"].set_params({(k if k in names else "text_model." + k): v for k, v in _state(text_t).items()})

    rng = np.random.default_rng(0)
    lat = size // 8
    hidden = p["text_encoder"]["hidden_size"]
    sample = rng.standard_normal((2, 4, lat, lat)).astype("float32")
    timestep = np.full((2,), 981.0, dtype="float32")
    context = rng.standard_normal((2, 77, p["unet"]["cross_attention_dim"])).astype("float32")
    z = rng.standard_normal((1, 4, lat, lat)).astype("float32")
    ids = rng.integers(0, p["text_encoder"]["vocab_size"], (2, 77)).astype("int32")
    del hidden
    with torch.no_grad():
        if "unet" in rows:
            ts = torch.from_numpy(sample), torch.from_numpy(timestep), torch.from_numpy(context)
            out["unet"] = _median_alternating(lambda: nets["unet"].forward(sample, timestep, context),
                                              lambda: unet_t(ts[0], ts[1], encoder_hidden_states=ts[2]).sample,
                                              runs)
            log(f"[{size}px] unet {out['unet']}")
        if tome_ratios:
            out["tome"] = _bench_tome(p, unet_t, size, tome_ratios, (sample, timestep, context), runs, cache_dir, log)
        if "vae" in rows:
            zt = torch.from_numpy(z)
            out["vae"] = _median_alternating(lambda: nets["vae"].decode(z), lambda: vae_t.decode(zt).sample, runs)
            log(f"[{size}px] vae {out['vae']}")
        if "text" in rows:
            it = torch.from_numpy(ids.astype("int64"))
            out["text"] = _median_alternating(lambda: nets["text"].forward(ids), lambda: text_t(it), runs)
            log(f"[{size}px] text {out['text']}")
    return out


def _bench_tome(p: dict, unet_t, size: int, ratios, inputs, runs: int, cache_dir: str, log) -> dict:
    """UNet step with token merging: sdcore's graph with ToMe compiled in against diffusers' UNet
    patched by tomesd, same ratio, tomesd's other defaults, use_rand off on both sides (so the two
    merge the same tokens)."""
    import tomesd
    import torch

    from sdcore import weights
    from sdcore.compile import build
    from sdcore.tome import ToMeConfig
    from sdcore.unet.model import unet_spec

    lat = size // 8
    state = _state(unet_t)
    ts = [torch.from_numpy(x) for x in inputs]
    out = {}
    for ratio in ratios:
        tome = ToMeConfig(ratio=ratio, use_rand=False)
        module = weights.build_module("unet", p["unet"], tome=tome)
        net = build(module, unet_spec(module.config, 2, lat, lat, tome=tome), name=f"bench-unet-{tome.tag()}",
                    cache_dir=cache_dir)
        net.set_params(state)
        tomesd.apply_patch(unet_t, ratio=ratio, use_rand=False)
        try:
            out[ratio] = _median_alternating(lambda: net.forward(*inputs),  # noqa: B023 - called here
                                             lambda: unet_t(ts[0], ts[1], encoder_hidden_states=ts[2]).sample, runs)
        finally:
            tomesd.remove_patch(unet_t)
        log(f"[{size}px] unet tome {ratio} {out[ratio]}")
    return out


def bench_compile(preset_name: str, size: int, cache: str, log) -> dict:
    """Cold compile into the empty `cache` and warm start (a second build from it), in seconds."""
    from sdcore.presets import preset

    p = preset(preset_name)
    if any(Path(cache).iterdir()):
        raise RuntimeError(f"{cache} is not empty: a cold compile needs an empty cache")
    t0 = time.perf_counter()
    _, cold = _build_all(p, size, cache)
    cold_total = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, warm = _build_all(p, size, cache)
    warm_total = time.perf_counter() - t0
    log(f"[{size}px] compile cold {cold_total:.1f} s {cold}, warm {warm_total:.1f} s")
    return {"cold": cold_total, "warm": warm_total, "cold_parts": cold, "warm_parts": warm}


# ----------------------------------------------------------------------------------------------
# whole txt2img, one subprocess per side (own peak RSS)


def _peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM where /proc has it. Not ru_maxrss: on Linux a
    child started by fork + exec inherits its parent's peak, so a benchmark parent that had loaded
    both pipelines' networks (12 GB) made every child report at least that."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _child(args) -> int:
    import numpy as np

    out = {}
    size = args.size[0]
    t0 = time.perf_counter()
    if args.child == "sdcore":
        from sdcore.pipeline import StableDiffusion

        sd = StableDiffusion.load(args.model_dir, cache_dir=args.cache_dir)
        kw = dict(steps=args.steps, width=size, height=size, seed=0, sampler="Euler", progress=False)
        sd.txt2img("a photo of a cat", **kw)  # compiles or loads, warms up
        out["first"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sd.txt2img("a photo of a cat", **kw)
    else:
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

        torch.set_num_threads(args.threads)
        pipe = StableDiffusionPipeline.from_pretrained(args.model_dir, torch_dtype=torch.float32)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        kw = dict(num_inference_steps=args.steps, width=size, height=size, output_type="np")
        pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **kw)
        out["first"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), **kw)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = _peak_rss_mb()
    del np
    print("RESULT " + json.dumps(out))
    return 0


def bench_txt2img(preset_name: str, size: int, steps: int, threads: int, cache_dir: str, log) -> dict:
    """{side: {"seconds", "peak_rss_mb"} or {"error": text}} for sdcore and diffusers."""
    return run_txt2img_children(__file__, preset_name, size, log,
                                ["--steps", str(steps), "--threads", str(threads), "--cache-dir", cache_dir])


def _child_env() -> dict:
    """The subprocesses' environment: this checkout's sdcore first on the path, so the children
    import the code being measured whichever checkout (if any) is pip-installed (an editable
    install of another checkout made every txt2img child fail with "No module named 'sdcore'")."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_txt2img_children(script: str, preset_name: str, size: int, log, extra_args: list[str]) -> dict:
    """Write a random-weight checkpoint of `preset_name` (diffusers folder, and converted for
    sdcore), then run `script --child SIDE --model-dir DIR --size SIZE extra_args...` for diffusers
    and for sdcore, each in its own process: {side: the JSON of its RESULT line, or {"error": text}}."""
    res = {}
    env = _child_env()
    with tempfile.TemporaryDirectory() as tmp:
        src, model = Path(tmp) / "diffusers", Path(tmp) / "sdcore"
        tools = ROOT / "tools"
        for cmd in ([sys.executable, str(tools / "make_random_checkpoint.py"), str(src), "--preset", preset_name],
                    [sys.executable, str(tools / "convert_weights.py"), str(src), "--output", str(model)]):
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if done.returncode:
                error = done.stderr.strip().splitlines()[-1:] or ["failed"]
                return {s: {"error": error} for s in ("sdcore", "diffusers")}
        for side, model_dir in (("diffusers", src), ("sdcore", model)):
            cmd = [sys.executable, script, "--child", side, "--model-dir", str(model_dir), "--size", str(size),
                   *extra_args]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode or not lines:
                tail = (done.stderr.strip().splitlines() or ["failed"])[-1]
                res[side] = {"error": tail[:200]}
            else:
                res[side] = json.loads(lines[-1][len("RESULT "):])
            log(f"[{size}px] txt2img {side}: {res[side]}")
    return res


# ----------------------------------------------------------------------------------------------
# report


def _ratio(a: float, b: float) -> str:
    return f"**{a / b:.2f}x**"


def format_table(config: str, results: dict, compile_res: dict | None, threads: int, steps: int, runs: int) -> str:
    import torch
    import tvm

    import sdcore

    lines = [
        f"Machine: {platform.processor() or platform.machine()} ({_cpu_name()}), {threads} threads for both sides; "
        f"{time.strftime('%Y-%m-%d')}; sdcore {sdcore.__version__}, TVM {tvm.__version__}, torch {torch.__version__}; "
        f"config {config}, fp32, random weights, median of {runs} alternating runs.",
        "",
        "| row | size | sdcore | PyTorch | sdcore / PyTorch |",
        "|---|---|---|---|---|",
    ]
    names = {"unet": "UNet step (batch 2, CFG)", "vae": "VAE decode (batch 1)", "text": "text encode (batch 2)"}
    for size, res in results.items():
        for row in ("unet", "vae", "text"):
            if row in res:
                a, b = res[row]
                lines.append(f"| {names[row]} | {size}x{size} | {a * 1e3:.0f} ms | {b * 1e3:.0f} ms | {_ratio(a, b)} |")
            if row == "unet":
                for ratio, (a, b) in res.get("tome", {}).items():
                    lines.append(f"| UNet step, ToMe {ratio:g} (vs diffusers+tomesd) | {size}x{size} | "
                                 f"{a * 1e3:.0f} ms | {b * 1e3:.0f} ms | {_ratio(a, b)} |")
        if "txt2img" in res:
            for name, a, b, ratio in txt2img_cells(res["txt2img"], f"txt2img, {steps} steps (warm)",
                                                   "peak_rss_mb", "peak resident memory, txt2img"):
                lines.append(f"| {name} | {size}x{size} | {a} | {b} | {ratio} |")
    if compile_res:
        size = compile_res["size"]
        lines.append(f"| compile, cold (UNet+VAE decode+text) | {size}x{size} | {compile_res['cold']:.0f} s | | |")
        lines.append(f"| start, warm cache (same three) | {size}x{size} | {compile_res['warm']:.1f} s | | |")
    return "\n".join(lines) + "\n"


def txt2img_cells(res: dict, label: str, memory_key: str, memory_label: str) -> list[tuple[str, str, str, str]]:
    """(row, sdcore, PyTorch, ratio) cells of the txt2img time and memory rows of run_txt2img_children's result."""
    s, d = res["sdcore"], res["diffusers"]
    if "error" in s or "error" in d:
        why = "; ".join(f"{k}: {v['error']}" for k, v in (("sdcore", s), ("diffusers", d)) if "error" in v)
        return [(label, "unavailable", "", why)]
    return [(label, f"{s['seconds']:.2f} s", f"{d['seconds']:.2f} s", _ratio(s["seconds"], d["seconds"])),
            (memory_label, f"{s[memory_key]:.0f} MB", f"{d[memory_key]:.0f} MB", _ratio(s[memory_key], d[memory_key]))]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sd15", choices=sorted(CONFIGS))
    parser.add_argument("--size", type=int, nargs="+", help="image sizes in pixels (default: per config)")
    parser.add_argument("--steps", type=int, help="txt2img steps (default: per config)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, help="threads for both sides (default: all cores)")
    parser.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma list of {ALL_ROWS}")
    parser.add_argument("--cache-dir", help="sdcore compile cache for the timed builds (default: a temporary one)")
    parser.add_argument("--write", type=Path, help="write the table as Markdown to this file")
    parser.add_argument("--json", type=Path, help="write the raw figures as JSON")
    parser.add_argument("--tome-ratio", type=float, nargs="+", default=[],
                        help="also time the UNet step with token merging at these ratios (sdcore vs diffusers+tomesd)")
    parser.add_argument("--child", choices=["sdcore", "diffusers"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    threads = _threads(args.threads)
    os.environ["TVM_NUM_THREADS"] = str(threads)  # before TVM's thread pool starts
    args.threads = threads
    if args.child:
        return _child(args)

    import torch

    torch.set_num_threads(threads)
    preset_name, sizes, steps = CONFIGS[args.config]
    sizes = args.size or sizes
    steps = args.steps or steps
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ALL_ROWS))
    if unknown:
        parser.error(f"unknown rows {unknown}")
    bad = [r for r in args.tome_ratio if not 0.0 < r < 1.0]
    if bad:
        parser.error(f"--tome-ratio must be between 0 and 1 (exclusive), got {bad}")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    own_cache = None
    if args.cache_dir is None:
        own_cache = tempfile.TemporaryDirectory()
        args.cache_dir = own_cache.name
    results, compile_res = {}, None
    try:
        if "compile" in rows:
            if own_cache is not None:  # still empty: the timed builds below then load from it
                compile_res = bench_compile(preset_name, sizes[0], args.cache_dir, log)
            else:
                with tempfile.TemporaryDirectory() as cold_cache:
                    compile_res = bench_compile(preset_name, sizes[0], cold_cache, log)
            compile_res["size"] = sizes[0]
        for size in sizes:
            res = {}
            if {"unet", "vae", "text"} & set(rows):
                res = bench_size(preset_name, size, rows, args.runs, args.cache_dir, log,
                                 args.tome_ratio if "unet" in rows else ())
            if "txt2img" in rows:
                res["txt2img"] = bench_txt2img(preset_name, size, steps, threads, args.cache_dir, log)
            results[size] = res
    finally:
        if own_cache is not None:
            own_cache.cleanup()

    table = format_table(args.config, results, compile_res, threads, steps, args.runs)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"results": {str(k): v for k, v in results.items()},
                                         "compile": compile_res}, indent=1, default=str))
    if args.write:
        write_report(args.write, table, " ".join(sys.argv[1:] if argv is None else argv))
    return 0


START, END = "<!-- benchmark:start -->", "<!-- benchmark:end -->"


def write_report(path: Path, table: str, command: str, *, start: str = START, end: str = END,
                 tool: str = "benchmark.py", heading: str = "") -> None:
    """Put `table` between the `start`/`end` markers of `path` (the notes around them stay), or
    append the block (under `heading`, if given) to the file, creating it if needed."""
    block = f"{start}\nWritten by `python tools/{tool} {command}`.\n\n{table}{end}"
    text = path.read_text() if path.exists() else "# Performance\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
