"""ToMe options and the per-block plan: which transformer blocks merge, how many tokens, on which grid.

Mirrors tomesd 0.1.3 (`tomesd/patch.py`: `apply_patch` for the options, `compute_merge` for the plan).
tomesd decides everything at run time from `x.shape[1]`; sdcore compiles static shapes, so the same
decisions are taken here, once, when the UNet is built for a latent size. Where tomesd would crash
(a token grid its rounding cannot rebuild, a grid smaller than one stride window) or silently cap a
ratio, this module raises UsageError (the caller's options cannot run) instead.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from sdcore.errors import UsageError

MAX_DOWNSAMPLES = (1, 2, 4, 8)


@dataclasses.dataclass(frozen=True)
class ToMeBlockPlan:
    """What one BasicTransformerBlock does at a given latent size.

    `h`, `w` are the token grid tomesd hands to the matching (`ceil(latent / downsample)`); `tokens`
    is the block's real sequence length N. `r` tokens are merged away, leaving `tokens - r`.
    """

    level: int  # number of 2x downsamplings above the block (0 for down_blocks.0 / up_blocks.3 in SD)
    tokens: int
    downsample: int  # tomesd's estimate: ceil(sqrt(latent_tokens // tokens)), not always a power of 2
    merges: bool
    h: int
    w: int
    r: int
    use_rand: bool
    # The random destination input's shape, (h // sy, w // sx, 1), when the block merges with use_rand.
    rand_shape: tuple[int, int, int] | None = None

    @property
    def tokens_after(self) -> int:
        return self.tokens - self.r


@dataclasses.dataclass(frozen=True)
class ToMeConfig:
    """tomesd's `apply_patch` options (same names, same defaults).

    ratio: fraction of a merging block's tokens removed, 0 <= ratio <= 1 - 1/(sx*sy).
    max_downsample: merge only in blocks whose downsampling is at most this (1, 2, 4 or 8).
    sx, sy: destination stride; one destination token per sx-by-sy window.
    use_rand: pick each window's destination at random (a host-side seed) instead of its top-left.
    merge_attn / merge_crossattn / merge_mlp: which of attn1 / attn2 / ff run on merged tokens.
    """

    ratio: float = 0.5
    max_downsample: int = 1
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False

    def __post_init__(self):
        self.validate()

    @property
    def max_ratio(self) -> float:
        # One destination per window: at most N - N/(sx*sy) source tokens exist to be merged.
        # tomesd documents this bound and silently caps r at the source count above it.
        return 1.0 - 1.0 / (self.sx * self.sy)

    @property
    def enabled(self) -> bool:
        return self.ratio > 0 and (self.merge_attn or self.merge_crossattn or self.merge_mlp)

    def validate(self) -> "ToMeConfig":
        for name in ("sx", "sy", "max_downsample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"ToMe {name} must be an integer, got {value!r}.")
        if self.sx < 1 or self.sy < 1:
            raise UsageError(f"ToMe stride sx={self.sx}, sy={self.sy} must be at least 1.")
        if self.max_downsample not in MAX_DOWNSAMPLES:
            raise UsageError(
                f"ToMe max_downsample={self.max_downsample} is not supported: use one of {MAX_DOWNSAMPLES}."
            )
        for name in ("use_rand", "merge_attn", "merge_crossattn", "merge_mlp"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"ToMe {name} must be true or false, got {getattr(self, name)!r}.")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or math.isnan(self.ratio):
            raise UsageError(f"ToMe ratio must be a number, got {self.ratio!r}.")
        if self.ratio < 0:
            raise UsageError(f"ToMe ratio {self.ratio} is negative: use 0 (off) up to {self.max_ratio:g}.")
        if self.ratio > self.max_ratio:
            raise UsageError(
                f"ToMe ratio {self.ratio} is above the maximum {self.max_ratio:g} for a {self.sx}x{self.sy} "
                f"stride (one token in {self.sx * self.sy} must stay a destination): lower the ratio or "
                "enlarge sx/sy."
            )
        return self

    def plan_for_tokens(self, latent_size: tuple[int, int], tokens: int, batch_size: int,
                        level: int = -1) -> ToMeBlockPlan:
        """The plan for a block of `tokens` tokens in a UNet run on latents of `latent_size` (h, w).

        Exactly tomesd's `compute_merge`: downsample = ceil(sqrt(h*w // N)); the block merges when
        that is <= max_downsample and r = int(N * ratio) > 0, on a grid of ceil(h/ds) x ceil(w/ds).
        An odd batch turns use_rand off, as in tomesd (a batch with cond and uncond halves is even).
        """
        latent_h, latent_w = latent_size
        downsample = int(math.ceil(math.sqrt((latent_h * latent_w) // tokens)))
        h = int(math.ceil(latent_h / downsample))
        w = int(math.ceil(latent_w / downsample))
        r = int(tokens * self.ratio)
        merges = self.enabled and downsample <= self.max_downsample and r > 0
        use_rand = self.use_rand and batch_size % 2 == 0
        if merges:
            if h * w != tokens:
                # tomesd's rounding rebuilds a different grid than the UNet's; it fails in a gather.
                raise UsageError(
                    f"ToMe cannot merge the {tokens}-token block (level {level}) of a {latent_h}x{latent_w} "
                    f"latent: tomesd's grid estimate {h}x{w} does not match; lower max_downsample."
                )
            num_dst = (h // self.sy) * (w // self.sx)
            if num_dst == 0:
                raise UsageError(
                    f"ToMe cannot merge the {h}x{w}-token block (level {level}) of a {latent_h}x{latent_w} "
                    f"latent: it is smaller than one {self.sx}x{self.sy} window; lower max_downsample."
                )
            if r > tokens - num_dst:
                raise UsageError(
                    f"ToMe ratio {self.ratio} asks to merge {r} of {tokens} tokens, but only "
                    f"{tokens - num_dst} are sources on the {h}x{w} grid; lower the ratio."
                )
        rand_shape = (h // self.sy, w // self.sx, 1) if merges and use_rand else None
        return ToMeBlockPlan(level=level, tokens=tokens, downsample=downsample, merges=merges,
                             h=h, w=w, r=r if merges else 0, use_rand=use_rand, rand_shape=rand_shape)

    def tag(self) -> str:
        """The options that change the compiled graph, as a short label for build names and logs,
        e.g. "tome0.5-md1-2x2-rand-attn1"; "" when ToMe is off (the plain graph).

        The compile cache keys on the exported IR, which already differs with every option that
        changes the graph; this only makes cache file names and log lines readable.
        """
        if not self.enabled:
            return ""
        merges = "+".join(n for n, on in (("attn1", self.merge_attn), ("attn2", self.merge_crossattn),
                                          ("ff", self.merge_mlp)) if on)
        return (f"tome{self.ratio:g}-md{self.max_downsample}-{self.sx}x{self.sy}-"
                f"{'rand' if self.use_rand else 'topleft'}-{merges}")

    def plan_blocks(self, latent_size: tuple[int, int], blocks: Sequence[tuple[str, int]],
                    batch_size: int) -> list[tuple[str, ToMeBlockPlan]]:
        """(name, plan) for every transformer block, given as (name, token count) in execution order;
        [] when ToMe is off."""
        if not self.enabled:
            return []
        return [(name, self.plan_for_tokens(latent_size, tokens, batch_size)) for name, tokens in blocks]

    def random_indices(self, plans: Sequence[tuple[str, ToMeBlockPlan]], seed: int | Sequence[int]):
        """The random destinations of every block that merges with use_rand, flattened and concatenated
        in execution order: the compiled UNet's int32 `tome_rand` input, or None when it has none.

        Block i draws from `(*seed, i)`, so each block gets its own choice, as tomesd's generator
        gives; pass e.g. (seed, step) to vary it per sampling step as well.
        """
        import numpy as np

        from sdcore.tome.reference import random_destination_indices

        seed = (seed,) if isinstance(seed, int) else tuple(seed)
        parts = [random_destination_indices((*seed, i), plan.h, plan.w, self.sx, self.sy).reshape(-1)
                 for i, (_, plan) in enumerate(plans) if plan.rand_shape is not None]
        return np.concatenate(parts) if parts else None


def log_lines(plans: Sequence[tuple[str, ToMeBlockPlan]]) -> list[str]:
    """One line per merging block, e.g. "down_blocks.0.attentions.0.transformer_blocks.0: 4096 -> 2048
    tokens"; blocks that do not merge are not listed."""
    return [f"{name}: {plan.tokens} -> {plan.tokens_after} tokens" for name, plan in plans if plan.merges]


def random_input_size(plans: Sequence[tuple[str, ToMeBlockPlan]]) -> int:
    """Length of the compiled UNet's `tome_rand` input (0: the function takes none)."""
    return sum(math.prod(plan.rand_shape) for _, plan in plans if plan.rand_shape is not None)
