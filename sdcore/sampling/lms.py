"""LMS: the linear multistep (Adams-Bashforth on non-uniform sigma steps) sampler of k-diffusion's
sample_lms, order 4.

Mirrors diffusers/schedulers/scheduling_lms_discrete.py (LMSDiscreteScheduler). diffusers
integrates each Lagrange basis polynomial with scipy.integrate.quad; the basis of order <= 4 has
degree <= 3, so 2-point Gauss-Legendre quadrature integrates it exactly and scipy is not needed.

One deliberate difference: diffusers takes the order as min(step_index + 1, 4) with the absolute
step index, so an img2img run that starts at step k > 0 uses a 4th-order coefficient on a history
of one derivative. sdcore counts the derivatives it actually has (k-diffusion's behaviour). From
step 0 both are identical.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from sdcore.sampling.base import x0_from_sigma
from sdcore.sampling.config import SchedulerConfig
from sdcore.sampling.euler import SigmaSampler, euler_schedule, init_noise_sigma

LMS_ORDER = 4
# nodes and weights on [-1, 1]; exact for polynomials of degree <= 3
_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(2)


@dataclasses.dataclass(frozen=True)
class LMSConfig(SchedulerConfig):
    """LMSDiscreteScheduler's keys and defaults (use_karras_sigmas is set by the sampler's name)."""

    use_karras_sigmas: bool = False

    UNSUPPORTED: ClassVar[dict] = {"use_exponential_sigmas": False, "use_beta_sigmas": False}
    PREDICTION_TYPES: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")
    SAMPLER: ClassVar[str] = "LMS"


def lms_coefficient(sigmas: np.ndarray, i: int, order: int, j: int) -> float:
    """integral from sigmas[i] to sigmas[i+1] of the Lagrange basis polynomial that is 1 at
    sigmas[i - j] and 0 at the other nodes sigmas[i - k], k < order, k != j."""
    a, b = sigmas[i], sigmas[i + 1]
    tau = (b - a) / 2 * _GAUSS_NODES + (a + b) / 2
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float((b - a) / 2 * np.dot(_GAUSS_WEIGHTS, basis))


class LMSSampler(SigmaSampler):
    Config = LMSConfig
    name = "LMS"

    def __init__(self, config: LMSConfig, steps: int):
        super().__init__(config, steps)
        self.timesteps, self.sigmas = euler_schedule(config, steps)
        self.init_noise_sigma = init_noise_sigma(self.sigmas.astype(np.float32), config.timestep_spacing)

    def reset(self) -> None:
        super().reset()
        self._derivatives: list[np.ndarray] = []  # newest last

    def _step(self, model_output, i, x, noise):
        sigma = self.sigmas[i]
        x0 = x0_from_sigma(model_output, x, sigma, self.config.prediction_type)
        self._derivatives = self._derivatives[-(LMS_ORDER - 1):] + [(x - x0) / sigma]
        order = len(self._derivatives)
        out = x
        for j, derivative in enumerate(reversed(self._derivatives)):
            out = out + lms_coefficient(self.sigmas, i, order, j) * derivative
        return out
