"""DPM-Solver++ that follows the probability-flow ODE at high noise and its SDE form at low noise.

Why: on the demo models the deterministic sampler's deficit is made in the low-noise half of the
trajectory. Fresh noise only below t ~ 600 recovers it, fresh noise above does nothing (docs/benchmarks.md,
sixth session). Both forms share the marginals of the same diffusion, so a trajectory may follow the ODE
down to a noise level and the SDE (Lu et al. 2022, "DPM-Solver++", sec. 5; Karras et al. 2022 restrict
their stochasticity to a noise range too) from there on. Same cost as either: one UNet call per step.
"""

from __future__ import annotations

import inspect

# Saved in a pipeline as ["latent_ddpm.hybrid_solver", "HybridDPMSolverMultistepScheduler"], diffusers finds the
# loading method by looking the base class names up in this module: SchedulerMixin must be importable from it.
from diffusers import (
    DPMSolverMultistepScheduler,
    SchedulerMixin,  # noqa: F401
)

# Switch point, as the noise-to-signal ratio sigma = sqrt((1 - alpha_bar) / alpha_bar) of the step being
# taken: steps from sigma <= this value are stochastic. 6.0 is t ~ 600 of the default linear schedule (sigma
# 6.17 there) and was chosen on the demo set: on the 4000-step demo model t <= 400 / 600 / 800 gave FD 5.44 /
# 4.99 / 5.63. A threshold in sigma, unlike one in t, means the same noise level under any schedule.
SDE_BELOW_SIGMA = 6.0


class HybridDPMSolverMultistepScheduler(DPMSolverMultistepScheduler):
    """diffusers' `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"` (deterministic) while the
    current sigma is above `sde_below_sigma`, and `"sde-dpmsolver++"` (noise from the step's generator) from
    there on. `sde_below_sigma=0` gives the deterministic solver, `inf` the stochastic one, step for step.
    Every other argument is the parent's."""

    def __init__(self, *args, sde_below_sigma: float = SDE_BELOW_SIGMA, **kwargs):
        if kwargs.get("algorithm_type", "dpmsolver++") != "dpmsolver++":
            raise ValueError(f"algorithm_type must be dpmsolver++ (the switch chooses the SDE form), "
                             f"got {kwargs['algorithm_type']!r}")
        if not sde_below_sigma >= 0:
            raise ValueError(f"sde_below_sigma must be >= 0, got {sde_below_sigma}")
        super().__init__(*args, **kwargs)
        self.register_to_config(sde_below_sigma=float(sde_below_sigma))

    def step(self, model_output, timestep, sample, generator=None, variance_noise=None, return_dict: bool = True):
        """One solver step; its form is chosen by the sigma it starts from (kept on the CPU: no device sync)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        stochastic = float(self.sigmas[self.step_index]) <= self.config.sde_below_sigma
        # The parent reads the form from its config in `step` and the update functions.
        self.register_to_config(algorithm_type="sde-dpmsolver++" if stochastic else "dpmsolver++")
        try:
            return super().step(model_output, timestep, sample, generator=generator, variance_noise=variance_noise,
                                return_dict=return_dict)
        finally:
            self.register_to_config(algorithm_type="dpmsolver++")


# diffusers' `from_config` passes a scheduler only the settings its `__init__` signature names, so the
# signature is the parent's plus `sde_below_sigma` (what `inspect.signature` and `configure_scheduler` read).
_parent = inspect.signature(DPMSolverMultistepScheduler.__init__)
HybridDPMSolverMultistepScheduler.__init__.__signature__ = _parent.replace(parameters=[
    *_parent.parameters.values(),
    inspect.Parameter("sde_below_sigma", inspect.Parameter.KEYWORD_ONLY, default=SDE_BELOW_SIGMA,
                      annotation="float")])
