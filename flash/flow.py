"""Rectified-flow schedule and samplers (SD3 / SD3.5), as plain functions with the math in view.

Forward process (Esser et al. 2024, "Scaling Rectified Flow Transformers", Sec. 2 and Eq. 1 with the
rectified-flow path of Sec. 3.1): x_t = (1 - sigma) x0 + sigma eps, sigma in [0, 1], and the network
predicts the velocity v = dx_t/dsigma = eps - x0. So x0 = x_t - sigma v, and the probability-flow ODE is
integrated by Euler steps x <- x + (sigma_next - sigma) v from sigma = 1 (pure noise) down to 0.

The timestep the network is given is t = 1000 sigma (diffusers' FlowMatchEulerDiscreteScheduler
convention). SD3's `shift` (Sec. 5.3.2, "resolution-dependent shifting", 3.0 for the released models)
moves the grid towards high noise: sigma' = shift sigma / (1 + (shift - 1) sigma).

Samplers:
  euler   FlowMatchEulerDiscreteScheduler: n steps on the linspace grid, shifted, ending at sigma = 0.
  flash   a Flash student's few-step sampler: at each of its trained timesteps predict x0 = x - sigma v,
          then re-noise it to the next timestep with FRESH noise (the flow form of the consistency /
          LCM multistep sampler of flash/schedule.py); the last x0 is the sample. The timesteps are the
          modes the student was trained on: the authors' flash_sd3 recipe starts its students at grid
          indices i (K // n) of the K = 32 step teacher grid (their timestep mixture), so n = 4 steps
          run at indices 0, 8, 16, 24. (diffusers' FlashFlowMatchEulerDiscreteScheduler, which their
          released Flash SD3 runs with, lives in a diffusers fork; its step is this re-noising rule.)

Parity with diffusers is the contract (tests/test_sd3_pipeline.py): sigmas are computed in the same
precision (fp32 training grid, float64 inference grid rounded to fp32) and the Euler step uses the fp32
difference of fp32 sigmas, as FlowMatchEulerDiscreteScheduler does. The latent state is kept in fp32
(diffusers keeps it in the model dtype between steps). Config fields that would change the grid in ways
not implemented here (dynamic shifting, Karras / exponential / beta sigmas, inverted sigmas, a terminal
shift, stochastic sampling) are refused by name.
"""
from dataclasses import dataclass

import numpy as np
import torch

from flash.schedule import randn

FLOW_SAMPLERS = ("euler", "flash")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlashFlowMatchEulerDiscreteScheduler")
FLASH_TEACHER_STEPS = 32  # K of the authors' flash_sd3 recipe: the grid the student's start times come from
# Fields of FlowMatchEulerDiscreteScheduler's config and the only value each may take here.
UNSUPPORTED = {"use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None,
               "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
               "stochastic_sampling": False}


@dataclass
class FlowSchedule:
    """The rectified-flow noise grid; field names are FlowMatchEulerDiscreteScheduler's config keys."""
    num_train_timesteps: int = 1000
    shift: float = 1.0

    @classmethod
    def from_config(cls, config):
        """A scheduler_config.json dict. Values that change the grid in ways not implemented here are
        refused with a one-line ValueError naming the field."""
        for key, allowed in UNSUPPORTED.items():
            value = config.get(key, allowed)
            if value != allowed and not (allowed is False and value is None):
                raise ValueError(f"scheduler config: {key}={value!r} is not supported by the flow sampler "
                                 f"(only {allowed!r})")
        return cls(num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                   shift=float(config.get("shift", 1.0)))

    def shifted(self, sigma):
        """SD3's shift of a sigma grid (torch or numpy, computed in that array's precision)."""
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def sigmas(self, steps):
        """(steps + 1,) fp32: the inference grid of FlowMatchEulerDiscreteScheduler.set_timesteps, then 0.

        The end points come from the fp32 training grid sigma_i = shift(i / T), i = T..1; between them the
        grid is linear in t (float64), shifted, rounded to fp32, as diffusers computes it."""
        T = self.num_train_timesteps
        train = self.shifted(torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T)
        t = np.linspace(train[0].item() * T, train[-1].item() * T, steps)
        sig = torch.from_numpy(self.shifted(t / T)).to(torch.float32)
        return torch.cat([sig, torch.zeros(1)])

    def timestep(self, sigma):
        """The network's time input for a sigma, t = T sigma in fp32 (a Python float holding that value)."""
        return (torch.as_tensor(sigma, dtype=torch.float32) * self.num_train_timesteps).item()


def flash_sigmas(schedule, steps, teacher_steps=FLASH_TEACHER_STEPS):
    """The Flash student's timesteps as sigmas (steps + 1,), fp32, ending at 0: indices i (K // steps) of
    the K-step teacher grid (K = 32): 1 -> [0], 2 -> [0, 16], 4 -> [0, 8, 16, 24]."""
    if not isinstance(steps, int) or not 1 <= steps <= teacher_steps:
        raise ValueError(f"flash: steps must be an integer in [1, {teacher_steps}], got {steps!r}")
    grid = schedule.sigmas(teacher_steps)
    idx = torch.arange(steps) * (teacher_steps // steps)
    return torch.cat([grid[idx], torch.zeros(1)])


def sample_flow_euler(model_fn, noise, sigmas, schedule):
    """Euler steps of the flow ODE from x = noise at sigmas[0] (= 1 for SD3's grid) through `sigmas`."""
    x = noise.float()
    for i in range(len(sigmas) - 1):
        v = model_fn(x, schedule.timestep(sigmas[i])).float()
        x = x + (sigmas[i + 1] - sigmas[i]) * v        # fp32 step size, as diffusers' `dt`
    return x.to(noise.dtype)


def sample_flow_flash(model_fn, noise, sigmas, schedule, generator=None):
    """Predict x0 = x - sigma v at each sigma; re-noise it to the next sigma with fresh noise from
    `generator` (one draw of x's shape per step); return the last x0."""
    x = noise.float()
    for i in range(len(sigmas) - 1):
        v = model_fn(x, schedule.timestep(sigmas[i])).float()
        x0 = x - sigmas[i] * v
        if sigmas[i + 1] > 0:
            eps = randn(x.shape, generator, x.device, x.dtype)
            x = sigmas[i + 1] * eps + (1 - sigmas[i + 1]) * x0
    return x0.to(noise.dtype)


def sample_flow(name, model_fn, noise, steps, schedule, generator=None):
    """Run flow sampler `name` ("euler" or "flash") for `steps` model calls from noise ~ N(0, I)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if name == "euler":
        return sample_flow_euler(model_fn, noise, schedule.sigmas(steps), schedule)
    if name == "flash":
        return sample_flow_flash(model_fn, noise, flash_sigmas(schedule, steps), schedule, generator)
    raise ValueError(f"sampler {name!r} is not available for a flow model; choose one of {', '.join(FLOW_SAMPLERS)}")


def is_flow_config(scheduler_config):
    """Whether a scheduler_config.json is a rectified-flow one (SD3 / SD3.5 ship FlowMatchEuler)."""
    return scheduler_config.get("_class_name") in FLOW_SCHEDULERS
