"""Outputs of named submodules, on both sides of a comparison.

- sdcore side: `build_tapped` compiles a model whose exported function also returns the output of
  every named submodule asked for (a debug build; the normal build is untouched and pays nothing).
  It works by wrapping the chosen submodules' `forward` while the graph is traced, so the model
  code carries no parity hooks at all.
- reference side: `reference_taps` runs a torch module with forward hooks on the same names
  (diffusers/transformers names equal sdcore's, by design) and returns their outputs. torch is
  imported lazily, inside it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

# ----------------------------------------------------------------------------------------------
# sdcore side


def named_modules(module, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(dotted name, submodule) for every nn.Module under `module`, like torch's named_modules."""
    from tvm.relax.frontend import nn

    yield prefix, module
    if isinstance(module, nn.ModuleList):
        children = [(str(i), m) for i, m in enumerate(module)]
    else:
        children = [(k, v) for k, v in vars(module).items() if isinstance(v, (nn.Module, nn.ModuleList))]
    for key, child in children:
        yield from named_modules(child, f"{prefix}.{key}" if prefix else key)


def _first_tensor(out):
    from tvm.relax.frontend import nn

    if isinstance(out, nn.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    raise TypeError(f"cannot tap an output of type {type(out).__name__}")


@contextlib.contextmanager
def _tapping(model, names: Sequence[str], taps: list):
    modules = dict(named_modules(model))
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise KeyError(f"no submodules named {unknown[:5]}")
    patched = []
    for name in names:
        sub = modules[name]
        original = sub.forward

        @functools.wraps(original)
        def tapped(*args, __original=original, __name=name, **kwargs):
            out = __original(*args, **kwargs)
            taps.append((__name, _first_tensor(out)))
            return out

        sub.forward = tapped
        patched.append(sub)
    try:
        yield
    finally:
        for sub in patched:
            del sub.forward  # back to the class's method


def build_tapped(model, spec: dict, names: Sequence[str], *, function: str = "forward", **build_kwargs):
    """Build `model` so that `function` returns (outputs..., tap_0, tap_1, ...) for `names` in order.

    Returns (CompiledModel, number of regular outputs). The taps are the first tensor each named
    submodule's forward returns, recorded in call order and then sorted back into `names` order.
    """
    from sdcore.compile import build

    taps: list = []
    original = getattr(model, function)
    n_out = []

    @functools.wraps(original)
    def forward_with_taps(*args, **kwargs):
        taps.clear()
        with _tapping(model, names, taps):
            out = original(*args, **kwargs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        n_out.append(len(outs))
        by_name = {}
        for name, tensor in taps:
            by_name.setdefault(name, tensor)  # a module called twice: its first call
        missing = [n for n in names if n not in by_name]
        if missing:
            raise KeyError(f"submodules never called: {missing[:5]}")
        return tuple(outs + [by_name[n] for n in names])

    setattr(model, function, forward_with_taps)
    try:
        compiled = build(model, spec, **build_kwargs)
    finally:
        delattr(model, function)
    return compiled, n_out[0]


# ----------------------------------------------------------------------------------------------
# reference side (torch, lazily)


def reference_taps(torch_module, names: Iterable[str],
                   run: Callable[[], object]) -> tuple[object, dict[str, np.ndarray]]:
    """Run `run()` with forward hooks on `names` of `torch_module`; return (its result, {name: output})."""
    import torch

    modules = dict(torch_module.named_modules())
    outputs: dict[str, np.ndarray] = {}
    handles = []

    def first_tensor(out):
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, (tuple, list)):
            return first_tensor(out[0])
        if hasattr(out, "to_tuple"):
            return first_tensor(out.to_tuple())
        raise TypeError(type(out).__name__)

    for name in names:
        def hook(_mod, _inp, out, __name=name):
            outputs.setdefault(__name, first_tensor(out).detach().float().cpu().numpy())

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            result = run()
    finally:
        for h in handles:
            h.remove()
    return result, outputs
