"""Kernel selection: the networks' plain Relax ops rewritten for a target, before legalization.

The networks (sdcore/unet, vae, clip and sdcore/layers.py) describe math only: attention is one
`R.nn.attention` op, a convolution `R.nn.conv2d` plus its bias add, the VAE's accurate GroupNorm a
graph of sums (sdcore.layers.GroupNorm). `DispatchKernels(target)` applies the table of rules for
the target's kind, in order, each to what the earlier ones left. A rule is a Relax pattern
(tvm.relax.dpl) and a rewrite that returns the replacement, or None where its kernel does not
apply (the match then stays as it is). A new backend (bf16 on AMX, say) is one more table.

    llvm   FusedAttention   float32 attention, static shapes -> one kernel (attention.py)
           Winograd         3x3 stride-1 float32 conv + bias, large enough -> F(2x2, 3x3) (winograd.py)
           FusedGroupNorm   the accurate GroupNorm (+ the SiLU after it) -> one kernel (groupnorm.py)
           AttentionGraph   the attention left -> matmuls and a softmax
    cuda   AttentionGraph   every attention -> matmuls and a softmax, for dlight's GPU rules

The build without schedules (`schedule=False`) runs no dispatch: TVM legalizes every op itself.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, tirx
from tvm.relax import PyExprMutator, expr_functor
from tvm.relax.dpl import DFPattern, WildcardPattern, is_const, is_op, wildcard

from sdcore import layers
from sdcore.schedule import attention, groupnorm, winograd
from sdcore.schedule.common import vector_lanes


class Kernels:
    """What a rule needs of the module being rewritten: a place for the PrimFuncs it calls, and
    the target's float32 vector lanes."""

    def __init__(self, builder: relax.BlockBuilder, lanes: int):
        self.builder = builder
        self.lanes = lanes

    def call(self, func: tirx.PrimFunc, name: str, args: list, shape) -> relax.Call:
        """call_tir of `func` (added to the module once per distinct function) -> float32 `shape`."""
        return relax.call_tir(self.builder.add_func(func, name), args, relax.TensorType(shape, "float32"))


def _static(expr: relax.Expr, dtype: str = "float32") -> list[int] | None:
    """The shape of `expr` as ints when it is a `dtype` tensor of static shape, else None."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.dtype != dtype or ty.shape is None:
        return None
    values = ty.shape.values
    return [int(v) for v in values] if all(isinstance(v, tirx.IntImm) for v in values) else None


class FusedAttention:
    """Float32 attention with static shapes -> sdcore.schedule.attention's kernel (causal only as
    self-attention, n == m, as CLIP's)."""

    def __init__(self):
        self.q, self.k, self.v = wildcard(), wildcard(), wildcard()
        self.pattern = is_op("relax.nn.attention")(self.q, self.k, self.v)

    def rewrite(self, kernels: Kernels, call: relax.Call, matched: dict) -> relax.Expr | None:
        q, k, v = matched[self.q], matched[self.k], matched[self.v]
        q_shape, k_shape, v_shape = _static(q), _static(k), _static(v)
        causal = call.attrs.causal_mask
        if None in (q_shape, k_shape, v_shape) or k_shape != v_shape or causal not in (None, "TopLeft"):
            return None
        (b, n, heads, d), m = q_shape, k_shape[1]
        if causal and n != m:
            return None
        scale = 1.0 / d**0.5 if call.attrs.scale is None else float(call.attrs.scale.value)
        func = attention.attention_kernel(b, n, m, heads, d, scale, kernels.lanes, causal is not None)
        k_heads = relax.op.permute_dims(k, (0, 2, 1, 3))  # [B, H, M, D]
        v_heads = relax.op.permute_dims(v, (0, 2, 1, 3))  # [B, H, M, D]
        return kernels.call(func, "fused_attention", [q, k_heads, v_heads], (b, n, heads, d))  # [B, N, H, D]


class AttentionGraph:
    """Any attention -> matmuls, a scale, the causal mask and a softmax (sdcore.layers.attention_graph)."""

    def __init__(self):
        self.q, self.k, self.v = wildcard(), wildcard(), wildcard()
        self.pattern = is_op("relax.nn.attention")(self.q, self.k, self.v)

    def rewrite(self, kernels: Kernels, call: relax.Call, matched: dict) -> relax.Expr | None:
        if call.attrs.causal_mask not in (None, "TopLeft") or call.attrs.window_size is not None:
            return None
        scale = None if call.attrs.scale is None else float(call.attrs.scale.value)
        return layers.attention_graph(matched[self.q], matched[self.k], matched[self.v],
                                      causal=call.attrs.causal_mask is not None, upcast=False, scale=scale)


class Winograd:
    """conv2d 3x3 (stride 1, padding 1, float32, NCHW) + bias -> Winograd F(2x2, 3x3): input
    transform, GEMM, output transform with the bias, where `winograd.takes` says it pays."""

    def __init__(self):
        self.x, self.weight, self.bias = wildcard(), wildcard(), wildcard()
        self.conv = is_op("relax.nn.conv2d")(self.x, self.weight)
        self.pattern = is_op("relax.add")(self.conv, self.bias)

    def rewrite(self, kernels: Kernels, call: relax.Call, matched: dict) -> relax.Expr | None:
        x, weight, bias = matched[self.x], matched[self.weight], matched[self.bias]
        attrs = matched[self.conv].attrs
        x_shape, w_shape, b_shape = _static(x), _static(weight), _static(bias)
        if None in (x_shape, w_shape, b_shape) or not (
                [int(s) for s in attrs.strides] == [1, 1] and [int(p) for p in attrs.padding] == [1, 1, 1, 1]
                and [int(s) for s in attrs.dilation] == [1, 1] and int(attrs.groups) == 1
                and (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) == ("NCHW", "OIHW", "NCHW")
                and attrs.out_dtype in (None, "float32")):
            return None
        n, c, h, w = x_shape
        k = w_shape[0]
        if w_shape != [k, c, 3, 3] or b_shape != [1, k, 1, 1] or not winograd.takes(n, c, k, h, w, kernels.lanes):
            return None
        t_all = winograd.tiles(n, h, w)[2]
        v = kernels.call(winograd.input_transform(n, c, h, w, kernels.lanes), "winograd_input", [x],
                         (16, t_all, c))  # [16, T, C]
        coef = relax.const(winograd.u_coefficients())  # [16, 9]
        m = kernels.call(winograd.gemm_kernel(t_all, c, k), "winograd_gemm", [v, weight, coef], (16, t_all, k))
        return kernels.call(winograd.output_transform(n, k, h, w, kernels.lanes), "winograd_output", [m, bias],
                            (n, k, h, w))


class FusedGroupNorm:
    """sdcore.layers.GroupNorm's float32 graph (and the SiLU after it, with `silu`) -> one kernel,
    where the rows are a multiple of groupnorm.LANES wide. TVM's own group_norm op (the UNet's)
    is not this graph and is left alone."""

    def __init__(self, silu: bool):
        self.silu = silu
        self.x, self.weight, self.bias, self.eps = wildcard(), wildcard(), wildcard(), is_const()
        self.inv_n = [is_const(), is_const()]  # the 1 / n of the mean and of the variance
        grouped = is_op("relax.reshape")(self.x, wildcard())  # [B, G, C/G * H, W]
        centered = is_op("relax.subtract")(grouped, is_op("relax.reshape")(self._mean(grouped, 0), wildcard()))
        var = self._mean(is_op("relax.multiply")(centered, centered), 1)  # [B, G]
        inv_std = is_op("relax.divide")(is_op("relax.ones")(wildcard()),
                                        is_op("relax.sqrt")(is_op("relax.add")(var, self.eps)))  # [B, G]
        self.normed = is_op("relax.reshape")(
            is_op("relax.multiply")(centered, is_op("relax.reshape")(inv_std, wildcard())), wildcard())  # [B, C, H, W]
        out = is_op("relax.add")(is_op("relax.multiply")(self.normed, self.weight), self.bias)
        self.pattern = is_op("relax.nn.silu")(out) if silu else out

    def _mean(self, t: DFPattern, which: int) -> DFPattern:
        """sum over W, then over the row sums, times 1/n: [B, G, C/G * H, W] -> [B, G]."""
        rows = is_op("relax.sum")(t).has_attr({"axis": [3], "keepdims": False})
        return is_op("relax.multiply")(is_op("relax.sum")(rows).has_attr({"axis": [2], "keepdims": False}),
                                       self.inv_n[which])

    def rewrite(self, kernels: Kernels, call: relax.Call, matched: dict) -> relax.Expr | None:
        x, weight, bias = matched[self.x], matched[self.weight], matched[self.bias]
        x_shape, g_shape = _static(x), _static(matched[self.normed].args[0])
        if None in (x_shape, g_shape) or _static(matched[self.normed]) != x_shape:
            return None
        b, c, h, w = x_shape
        groups = g_shape[1]
        eps = float(matched[self.eps].value.numpy())
        inv_n = {float(matched[p].value.numpy()) for p in self.inv_n}
        if (w % groupnorm.LANES or c % groups or g_shape != [b, groups, c // groups * h, w]
                or _static(weight) != [c, 1, 1] or _static(bias) != [c, 1, 1]
                or inv_n != {float(np.float32(1.0 / (c // groups * h * w)))}):
            return None
        func = groupnorm.group_norm_kernel(b, c, h, w, groups, eps, self.silu)
        return kernels.call(func, "group_norm", [x, weight, bias], (b, c, h, w))


def rules(target) -> list:
    """The rewrites for `target`, in the order they apply."""
    tables = {
        "llvm": lambda: [FusedAttention(), Winograd(), FusedGroupNorm(silu=True), FusedGroupNorm(silu=False),
                         AttentionGraph()],
        "cuda": lambda: [AttentionGraph()],
    }
    if target.kind.name not in tables:
        raise ValueError(f"no kernel dispatch rules for target kind {target.kind.name!r}")
    return tables[target.kind.name]()


@expr_functor.mutator
class _Rewrite(PyExprMutator):
    """One rule over a module: every call its pattern matches (looking through the function's
    bindings) becomes the rule's replacement. A mutator rather than dpl's rewrite_call, which also
    merges identical bindings elsewhere in the function (the UNet's 22 silu(temb) into one) and so
    changes what FuseOps fuses."""

    def __init__(self, mod: tvm.IRModule, rule, lanes: int):
        super().__init__(mod)
        self.rule = rule
        self.kernels = Kernels(self.builder_, lanes)
        self.var2val: dict = {}
        self.val2var: dict = {}

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        matched = self.rule.pattern.extract_matched_expr(call, self.var2val)
        if matched is not None:
            # the match looked through the bindings: a rule's inputs (its wildcards) are given as
            # the variables they are bound to, so that the replacement computes nothing twice
            matched = {p: self.val2var.get(e, e) if isinstance(p, WildcardPattern) else e
                       for p, e in matched.items()}
        new = None if matched is None else self.rule.rewrite(self.kernels, call, matched)
        if new is None:
            return super().visit_call_(call)
        return self.visit_expr(new)

    def run(self) -> tvm.IRModule:
        for gvar, func in self.builder_.get().functions_items():
            if isinstance(func, relax.Function):
                self.var2val = relax.analysis.get_var2val(func)
                self.val2var = {value: var for var, value in self.var2val.items()}
                self.builder_.update_func(gvar, relax.analysis.remove_all_unused(self.visit_expr(func)))
        return self.builder_.get()


@tvm.transform.module_pass(opt_level=0, name="SdcoreDispatchKernels")
class DispatchKernels:
    """Relax pass: the target's rules (see the module docstring), each over the whole module."""

    def __init__(self, target):
        self.target = target

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        lanes = vector_lanes(self.target) if self.target.kind.name == "llvm" else 0
        for rule in rules(self.target):
            mod = _Rewrite(mod, rule, lanes).run()
        return mod
