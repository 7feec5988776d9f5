"""Sampler names (A1111's, case-insensitive, with a few k-diffusion/diffusers aliases) and
`make_sampler`, which builds one from a checkpoint's scheduler config.

The name picks the diffusers scheduler and the options A1111's name implies (the table in
diffusers' docs, api/schedulers/overview.md); everything else comes from the config.
"""

from __future__ import annotations

import copy
import functools

import numpy as np

from sdcore.errors import UsageError
from sdcore.sampling.base import Sampler
from sdcore.sampling.ddim import DDIMSampler
from sdcore.sampling.dpmsolver_multistep import DPMSolverMultistepSampler
from sdcore.sampling.dpmsolver_sde import DPMSolverSDESampler
from sdcore.sampling.euler import EulerAncestralSampler, EulerSampler
from sdcore.sampling.lms import LMSSampler
from sdcore.sampling.pndm import PLMSSampler

_DPM = DPMSolverMultistepSampler
# display name -> (sampler class, config overrides implied by the name)
SAMPLERS: dict[str, tuple[type[Sampler], dict]] = {
    "DDIM": (DDIMSampler, {}),
    "PLMS": (PLMSSampler, {}),
    "Euler": (EulerSampler, {"use_karras_sigmas": False}),
    "Euler a": (EulerAncestralSampler, {}),
    "LMS": (LMSSampler, {"use_karras_sigmas": False}),
    "LMS Karras": (LMSSampler, {"use_karras_sigmas": True}),
    "DPM++ 2M": (_DPM, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M Karras": (_DPM, {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ 2M SDE": (_DPM, {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": False}),
    "DPM++ 2M SDE Karras": (_DPM, {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "DPM++ SDE": (DPMSolverSDESampler, {"use_karras_sigmas": False}),
    "DPM++ SDE Karras": (DPMSolverSDESampler, {"use_karras_sigmas": True}),
}
SAMPLER_NAMES = tuple(SAMPLERS)

# normalised alias -> display name (normalisation: lower case, "_" as space, "dpmpp" as "dpm++")
_ALIASES = {
    "pndm": "PLMS",
    "euler ancestral": "Euler a",
    "k euler": "Euler",
    "k euler a": "Euler a",
    "k euler ancestral": "Euler a",
    "k lms": "LMS",
}


def _normalise(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("dpmpp", "dpm++").split())


_LOOKUP = {_normalise(n): n for n in SAMPLERS} | _ALIASES


def canonical_name(name: str) -> str:
    """The display name for `name` ("euler_a" -> "Euler a"); UsageError listing the known ones."""
    if not isinstance(name, str) or _normalise(name) not in _LOOKUP:
        raise UsageError(f"Unknown sampler {name!r}; known samplers: {', '.join(SAMPLER_NAMES)}.")
    return _LOOKUP[_normalise(name)]


@functools.lru_cache(maxsize=64)
def _prototype(name: str, config, steps: int, eta: float | None) -> Sampler:
    cls = SAMPLERS[name][0]
    sampler = cls(config, steps, eta=eta) if eta is not None else cls(config, steps)
    sampler.name = name
    for value in vars(sampler).values():
        if isinstance(value, np.ndarray):
            value.setflags(write=False)  # shared by every copy made from this prototype
    return sampler


def make_sampler(name: str, scheduler_config: dict, steps: int, *, eta: float | None = None) -> Sampler:
    """A fresh sampler `name` for `steps` inference steps on a diffusers scheduler_config.json dict.

    `eta` is DDIM's noise weight (0 when omitted; > 0 makes the sampler need noise); other samplers
    refuse it. Schedules are computed once per (name, config, steps, eta) and shared, read-only.
    """
    name = canonical_name(name)
    cls, overrides = SAMPLERS[name]
    if eta is not None and cls is not DDIMSampler:
        raise UsageError(f"eta applies to DDIM only, not to the {name} sampler.")
    config = cls.Config.from_dict(scheduler_config, **overrides)
    sampler = copy.copy(_prototype(name, config, steps, None if eta is None else float(eta)))
    sampler.reset()
    return sampler
