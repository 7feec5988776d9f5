"""ToMe in the UNet graph: the state one traced forward shares with its transformer blocks, and
`compute_merge`, which gives each BasicTransformerBlock its merge/unmerge functions.

The graph-building twin of tomesd 0.1.3's `tomesd/patch.py` (`_tome_info`, `compute_merge`,
`make_diffusers_tome_block`); nothing is patched here: `BasicTransformerBlock.forward` calls
`compute_merge` itself when the UNet was built with a ToMeConfig. Imports tvm.
"""

from __future__ import annotations

from typing import Callable, Sequence

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import op

from sdcore.errors import SdcoreError
from sdcore.tome.config import ToMeBlockPlan, ToMeConfig, random_input_size
from sdcore.tome.merge import bipartite_soft_matching_random2d

Merge = Callable[[nn.Tensor], nn.Tensor]


def do_nothing(x: nn.Tensor) -> nn.Tensor:
    return x


class ToMeInfo:
    """tomesd's `_tome_info` for one traced forward: the options, the per-block plans (taken from the
    latent size once, on the host), and the `tome_rand` input the random destinations come from.

    Blocks call `compute_merge` in execution order, the order of `plans`; each takes the next plan
    and, if it merges with use_rand, the next slice of `tome_rand`.
    """

    def __init__(self, config: ToMeConfig, plans: Sequence[tuple[str, ToMeBlockPlan]],
                 tome_rand: nn.Tensor | None):
        self.config = config
        self.plans = list(plans)
        self._next = 0
        shapes = [plan.rand_shape for _, plan in self.plans if plan.rand_shape is not None]
        size = random_input_size(self.plans)
        if (tome_rand is None) != (size == 0) or (tome_rand is not None and tuple(tome_rand.shape) != (size,)):
            got = None if tome_rand is None else tuple(tome_rand.shape)
            raise SdcoreError(f"ToMe: the tome_rand input must have shape {(size,) if size else None}, got {got}.")
        self._rand: list[nn.Tensor] = []
        if shapes:
            sections = []
            for shape in shapes[:-1]:
                sections.append((sections[-1] if sections else 0) + shape[0] * shape[1])
            parts = op.split(tome_rand, sections, axis=0) if sections else [tome_rand]
            self._rand = [op.reshape(part, shape) for part, shape in zip(parts, shapes)]  # [h//sy, w//sx, 1]

    def compute_merge(self, x: nn.Tensor) -> tuple[Merge, Merge, Merge, Merge, Merge, Merge]:
        """(m_a, m_c, m_m, u_a, u_c, u_m) for the block whose input is `x` [B, N, C], as tomesd's
        compute_merge: the matching uses the block's input tokens, before norm1."""
        if self._next >= len(self.plans):
            raise SdcoreError("ToMe: more transformer blocks were traced than planned.")
        name, plan = self.plans[self._next]
        self._next += 1
        if int(x.shape[1]) != plan.tokens:
            raise SdcoreError(f"ToMe: {name} has {int(x.shape[1])} tokens, the plan says {plan.tokens}.")
        if not plan.merges:
            return (do_nothing,) * 6
        rand_idx = self._rand.pop(0) if plan.rand_shape is not None else None
        c = self.config
        m, u = bipartite_soft_matching_random2d(x, plan.w, plan.h, c.sx, c.sy, plan.r, rand_idx)
        m_a, u_a = (m, u) if c.merge_attn else (do_nothing, do_nothing)
        m_c, u_c = (m, u) if c.merge_crossattn else (do_nothing, do_nothing)
        m_m, u_m = (m, u) if c.merge_mlp else (do_nothing, do_nothing)
        return m_a, m_c, m_m, u_a, u_c, u_m

    def finish(self) -> None:
        """Check that every planned block was traced (the plans and the network agree)."""
        if self._next != len(self.plans):
            raise SdcoreError(f"ToMe: {len(self.plans)} transformer blocks planned, {self._next} traced.")
