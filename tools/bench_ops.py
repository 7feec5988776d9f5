"""Single operators, sdcore against PyTorch, in one process: where a schedule rule stands, and A/B
tests of its constants.

    python tools/bench_ops.py --conv 512,512,64 --conv 320,320,64,2 --linear 2,77,3072,768
    python tools/bench_ops.py --conv 512,512,64 --variant unblocked:_RC_BLOCK=4096 --threads 1

`--conv C,O,HW[,BATCH]` is a 3x3 convolution (padding 1) from C to O channels on HW x HW images,
`--linear B,M,K,N` a Linear from K to N features on [B, M, K]. Every variant is built in this
process (sdcore's default schedule as "sdcore", plus each `--variant NAME:ATTR=VALUE[,ATTR=VALUE]`,
which sets module constants of sdcore.schedule's modules while it builds), each checked against PyTorch,
then all are called in turn, PyTorch among them, `--runs` times; the table gives the minimum, its
GFLOP/s and its ratio to PyTorch's minimum. Not a test: times on shared machines drift, compare the
ratios of one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def _parse_variant(text: str) -> tuple[str, dict[str, int]]:
    name, _, settings = text.partition(":")
    values = {}
    for item in filter(None, settings.split(",")):
        attr, _, value = item.partition("=")
        values[attr] = _ints(value, 1, f"--variant {text}")[0]
    return name, values


def _ints(text: str, count, what: str) -> list[int]:
    """The comma-separated positive integers of `text` (as many as one of `count`), else an
    argparse error naming `what`."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    counts = count if isinstance(count, tuple) else (count,)
    if len(values) not in counts or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{what}: expected {' or '.join(map(str, counts))} positive integer(s)")
    return values


def _modules():
    from tvm.relax.frontend import nn

    class Conv(nn.Module):
        def __init__(self, c, o):
            self.conv = nn.Conv2D(c, o, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    class Linear(nn.Module):
        def __init__(self, k, n):
            self.fc = nn.Linear(k, n)

        def forward(self, x):
            return self.fc(x)

    return Conv, Linear


def _cases(convs: list[list[int]], linears: list[list[int]]):
    """[(label, module factory, input shape, parameter dict, torch function, GFLOP)]"""
    import torch

    Conv, Linear = _modules()
    rng = np.random.default_rng(0)
    cases = []
    for c, o, hw, *rest in convs:
        batch = rest[0] if rest else 1
        w = (rng.standard_normal((o, c, 3, 3)) * 0.05).astype("float32")
        b = rng.standard_normal(o).astype("float32")
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        cases.append((f"conv 3x3 {c} -> {o} at {hw}x{hw}, batch {batch}", lambda c=c, o=o: Conv(c, o),
                      (batch, c, hw, hw), {"conv.weight": w, "conv.bias": b},
                      lambda x, tw=tw, tb=tb: torch.nn.functional.conv2d(x, tw, tb, padding=1),
                      2 * batch * c * o * 9 * hw * hw / 1e9))
    for b_, m, k, n in linears:
        w = (rng.standard_normal((n, k)) * 0.05).astype("float32")
        b = rng.standard_normal(n).astype("float32")
        tw, tb = torch.from_numpy(w), torch.from_numpy(b)
        cases.append((f"Linear {b_}x{m}x{k} -> {n}", lambda k=k, n=n: Linear(k, n), (b_, m, k),
                      {"fc.weight": w, "fc.bias": b},
                      lambda x, tw=tw, tb=tb: torch.nn.functional.linear(x, tw, tb), 2 * b_ * m * k * n / 1e9))
    return cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conv", action="append", default=[], metavar="C,O,HW[,BATCH]")
    parser.add_argument("--linear", action="append", default=[], metavar="B,M,K,N")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:ATTR=VALUE[,...]")
    parser.add_argument("--threads", type=int, default=1, help="threads for both sides (default 1)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    if not args.conv and not args.linear:
        parser.error("give at least one --conv or --linear")
    try:
        variants = [("sdcore", {})] + [_parse_variant(v) for v in args.variant]
        convs = [_ints(text, (3, 4), f"--conv {text}") for text in args.conv]
        linears = [_ints(text, 4, f"--linear {text}") for text in args.linear]
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))

    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    import importlib
    import pkgutil

    import torch
    from tvm.relax.frontend import nn

    import sdcore.schedule
    from sdcore.compile import build, set_threads

    modules = [importlib.import_module(f"sdcore.schedule.{m.name}")
               for m in pkgutil.iter_modules(sdcore.schedule.__path__)]

    def home(attr):  # the module a variant's constant lives in
        return next((m for m in modules if hasattr(m, attr)), None)

    for _, values in variants:
        for attr in values:
            if home(attr) is None:
                parser.error(f"no module of sdcore.schedule has {attr}")
    torch.set_num_threads(args.threads)
    set_threads(args.threads)

    print(f"{args.threads} thread(s) per side, min of {args.runs} alternating calls\n")
    print("| operator | " + " | ".join(name for name, _ in variants) + " | PyTorch |")
    print("|---" * (len(variants) + 2) + "|")
    for label, factory, shape, params, torch_fn, gflop in _cases(convs, linears):
        x = np.random.default_rng(1).standard_normal(shape).astype("float32")
        tx = torch.from_numpy(x)
        ref = torch_fn(tx).numpy()
        calls = {}
        for name, values in variants:
            saved = {attr: getattr(home(attr), attr) for attr in values}
            try:
                for attr, value in values.items():
                    setattr(home(attr), attr, value)
                model = build(factory(), {"forward": {"x": nn.spec.Tensor(shape, "float32")}}, name="bench-ops",
                              use_cache=False)
            finally:
                for attr, value in saved.items():
                    setattr(home(attr), attr, value)
            model.set_params(params)
            err = float(np.abs(model.forward(x) - ref).max() / np.abs(ref).max())
            if err > 1e-4:
                print(f"{label}: variant {name} differs from PyTorch (max rel {err:.1e})", file=sys.stderr)
                return 1
            calls[name] = lambda model=model, x=x: model.forward(x)
        calls["PyTorch"] = lambda torch_fn=torch_fn, tx=tx: torch_fn(tx)
        times = {name: [] for name in calls}
        for _ in range(args.runs):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        best = {name: min(t) for name, t in times.items()}
        cells = [f"{best[name] * 1e3:.1f} ms ({gflop / best[name]:.0f} GFLOP/s, {best[name] / best['PyTorch']:.2f}x)"
                 for name, _ in variants]
        torch_cell = f"{best['PyTorch'] * 1e3:.1f} ms ({gflop / best['PyTorch']:.0f} GFLOP/s)"
        print(f"| {label} | " + " | ".join(cells) + f" | {torch_cell} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
