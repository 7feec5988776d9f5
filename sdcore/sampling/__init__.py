"""Samplers (noise schedulers) in NumPy float64, mirroring diffusers' schedulers step for step.

`make_sampler(name, scheduler_config, steps)` builds one; see `sdcore.sampling.base.Sampler` for
the interface and docs/samplers.md for the list, the aliases and the known differences.
"""

from sdcore.sampling.base import Sampler
from sdcore.sampling.registry import SAMPLER_NAMES, canonical_name, make_sampler

__all__ = ["SAMPLER_NAMES", "Sampler", "canonical_name", "make_sampler"]
