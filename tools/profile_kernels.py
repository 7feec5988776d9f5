"""Time every compiled kernel of one sdcore network, one by one: where a UNet step or a VAE decode goes.

    python tools/profile_kernels.py --config sd15 --size 512 --network unet|vae|text [--top 25]

TVM 0.27's Relax VM has no profiler, so this runs sdcore's CPU pipeline up to the schedule rules
(sdcore.compile.scheduling_passes), reads the `call_tir` calls of the forward function with
their argument shapes, compiles each PrimFunc on its own and times it on random inputs (median of
`--runs`). The sum is close to, not equal to, the network's time (no memory planning, caches warm
per kernel). Random weights and inputs: speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import numpy as np


def scheduled_module(network: str, config: str, size: int):
    """(IRModule after FuseTIR and the schedule rules, name of the forward function)."""
    import tvm
    from tvm import relax

    from sdcore import presets, weights
    from sdcore.clip.model import clip_spec
    from sdcore.compile import export, make_target, scheduling_passes
    from sdcore.unet.model import unet_spec
    from sdcore.vae.model import vae_spec

    p = presets.preset(config)
    if network == "unet":
        module = weights.build_module("unet", p["unet"])
        spec = unet_spec(module.config, 2, size // 8, size // 8)
    elif network == "text":
        module = weights.build_module("text_encoder", p["text_encoder"])
        spec = clip_spec(module.config, 2)
    else:
        module = weights.build_module("vae", p["vae"], functions=("decode",))
        spec = vae_spec(module.config, 1, size, size, functions=("decode",))
    target = make_target("llvm")
    # scheduling_passes starts with the dispatch pass, which tiles the hand-written kernels for
    # this target's vector width
    mod, _ = export(module, spec)
    mod = relax.transform.LiftTransformParams()(mod)
    with target:
        mod = tvm.transform.Sequential(scheduling_passes(target))(mod)
    return mod, list(spec)[0], target


def kernel_calls(mod, function: str):
    """[(PrimFunc name, [argument shapes and dtypes incl. outputs])] in call order."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprVisitor, visitor

    calls = []

    @visitor
    class Visitor(PyExprVisitor):
        def visit_call_(self, call):
            if call.op.name == "relax.call_tir":
                gv, args = call.args[0], call.args[1]
                infos = [a.ty for a in args.fields] if isinstance(args, relax.Tuple) else [args.ty]
                out = call.ty
                outs = out.fields if isinstance(out, relax.TupleType) else [out]
                shapes = [(tuple(int(s) for s in i.shape.values), str(i.dtype)) if isinstance(i, relax.TensorType)
                          else (None, str(i.dtype)) for i in infos + list(outs)]  # None: a scalar
                calls.append((gv.name_hint, shapes))
            super().visit_call_(call)

    Visitor().visit_expr(mod[function])
    return calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--network", choices=("unet", "vae", "text"), default="unet")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    import tvm

    mod, function, target = scheduled_module(args.network, args.config, args.size)
    calls = kernel_calls(mod, function)
    rng = np.random.default_rng(0)
    compiled, seconds = {}, collections.defaultdict(float)
    counts = collections.Counter()
    first_shapes = {}
    for name, shapes in calls:
        first_shapes.setdefault(name, shapes)
        key = (name, tuple(shapes))
        if key not in compiled:
            func = mod[name].with_attr("global_symbol", "main")
            lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
            tensors = []
            for shape, dtype in shapes:
                if shape is None:
                    tensors.append(0)
                    continue
                data = (rng.integers(0, 8, shape) if "int" in dtype else rng.standard_normal(shape)).astype(dtype)
                tensors.append(tvm.runtime.tensor(data))
            lib["main"](*tensors)
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                lib["main"](*tensors)
                times.append(time.perf_counter() - t0)
            compiled[key] = float(np.median(times))
        seconds[name] += compiled[key]
        counts[name] += 1
    total = sum(seconds.values())
    print(f"{args.network} {args.config} {args.size}x{args.size}: {len(calls)} kernel calls, sum {total * 1e3:.0f} ms")
    print("| ms | share | calls | kernel | shapes (inputs -> output) |\n|---|---|---|---|---|")
    for name, s in sorted(seconds.items(), key=lambda kv: -kv[1])[:args.top]:
        shapes = ["x".join(map(str, sh)) if sh is not None else "scalar" for sh, _ in first_shapes[name]]
        print(f"| {s * 1e3:.1f} | {100 * s / total:.1f}% | {counts[name]} | {name} | "
              f"{', '.join(shapes[:-1])} -> {shapes[-1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
