"""Vectorizable float32 exp for the CPU: softmax, sigmoid and SiLU rewritten before legalization.

TVM lowers `exp` on llvm targets to the `llvm.exp` intrinsic, which LLVM turns into one libm call
per lane: a vectorized softmax or SiLU then runs at scalar speed. This pass replaces, in float32
only, `softmax`, `exp`, `sigmoid` and `silu` with the same functions written over a polynomial exp
(Cephes' expf, as TOPI's `fast_exp`: range reduction by ln 2, a degree-5 polynomial, the power of
two built in the exponent bits; relative error about 1e-6, i.e. well inside the fp32 parity
tolerances). Other dtypes are untouched.
`gelu` is rewritten the same way over a rational erf (Eigen's float erf: x clamped to [-4, 4], odd
degree-13 over even degree-8 polynomial, error about 1e-7): TVM lowers `erf` to one libm call per
lane as well. Timings of both: docs/performance.md ("What the compile step does").
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx, topi
from tvm.relax import Call, Expr, PyExprMutator, expr_functor

_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)


def fast_exp(x):
    """exp(x) for a float32 PrimExpr (topi's fast_exp_float32, written out so it can be inlined)."""
    f32 = "float32"
    c = lambda v: tirx.const(v, f32)  # noqa: E731
    xc = tirx.max(tirx.min(x, c(88.3762626647950)), c(-88.3762626647949))
    n = tirx.floor(xc * c(1.44269504088896341) + c(0.5))
    f = xc - n * c(0.6931471805599453)
    y = c(_P[0])
    for p in _P[1:]:
        y = y * f + c(p)
    y = y * f * f + f + c(1.0)
    two_n = tirx.reinterpret(f32, tirx.shift_left(tirx.Cast("int32", n + c(127.0)), tirx.const(23, "int32")))
    return tirx.max(two_n * y, x)


_ERF_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
               -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
              -1.42647390514189e-02)


def fast_erf(x):
    """erf(x) for a float32 PrimExpr: a rational approximation, vectorizable (see the module docstring)."""
    c = lambda v: tirx.const(v, "float32")  # noqa: E731
    xc = tirx.max(tirx.min(x, c(4.0)), c(-4.0))
    x2 = xc * xc
    p = c(_ERF_ALPHA[0])
    for a in _ERF_ALPHA[1:]:
        p = p * x2 + c(a)
    q = c(_ERF_BETA[0])
    for b in _ERF_BETA[1:]:
        q = q * x2 + c(b)
    return xc * p / q


def _gelu(x: te.Tensor) -> te.Tensor:
    half = tirx.const(0.5, "float32")
    return te.compute(x.shape, lambda *i: x(*i) * (half + half * fast_erf(x(*i) * tirx.const(0.7071067811865476,
                                                                                                "float32"))),
                      name="gelu")


def _sigmoid(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: tirx.const(1.0, "float32") / (tirx.const(1.0, "float32")
                                                                          + fast_exp(-x(*i))), name="sigmoid")


def _silu(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: x(*i) / (tirx.const(1.0, "float32") + fast_exp(-x(*i))), name="silu")


def _exp(x: te.Tensor) -> te.Tensor:
    return te.compute(x.shape, lambda *i: fast_exp(x(*i)), name="exp")


def _softmax(x: te.Tensor, axis: int) -> te.Tensor:
    return topi.nn.fast_softmax(x, axis)


@expr_functor.mutator
class _FastMath(PyExprMutator):
    def visit_call_(self, call: Call) -> Expr:
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op) or not call.args:
            return call
        info = getattr(call.args[0], "ty", None)
        if not isinstance(info, relax.TensorType) or info.dtype != "float32":
            return call
        name = call.op.name
        if name == "relax.nn.softmax":
            axis = int(call.attrs.axis)
            ndim = info.ndim
            return self.builder_.call_te(_softmax, call.args[0], axis if axis >= 0 else axis + ndim,
                                         primfunc_name_hint="softmax")
        if name == "relax.exp":
            return self.builder_.call_te(_exp, call.args[0], primfunc_name_hint="exp")
        if name == "relax.sigmoid":
            return self.builder_.call_te(_sigmoid, call.args[0], primfunc_name_hint="sigmoid")
        if name == "relax.nn.gelu":
            return self.builder_.call_te(_gelu, call.args[0], primfunc_name_hint="gelu")
        if name == "relax.nn.silu":
            return self.builder_.call_te(_silu, call.args[0], primfunc_name_hint="silu")
        return call


@tvm.transform.module_pass(opt_level=0, name="SdcoreFastExp")
class FastExp:
    """Relax pass: float32 softmax/exp/sigmoid/silu/gelu over the polynomial exp (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        mutator = _FastMath(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gv, mutator.visit_expr(func))
        return mutator.builder_.get()
