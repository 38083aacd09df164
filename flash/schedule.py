"""Noise schedules and samplers, as plain functions with the math in view.

The discrete-time DDPM schedule (Ho et al. 2020) that SD1.5, SDXL and PixArt-alpha were trained with,
and five ways to integrate it backwards:

  ddim      Song et al. 2020, "Denoising Diffusion Implicit Models", Eq. (12) and (16).
  euler     Karras et al. 2022 (EDM), Algorithm 1 without the Heun correction, in sigma space.
  dpm++2m   Lu et al. 2022, "DPM-Solver++", Algorithm 2 (multistep, second order), final step to sigma 0.
  lcm       Luo et al. 2023 (Latent Consistency Models) / Song et al. 2023 (Consistency Models),
            multistep consistency sampling: predict x0, re-noise with FRESH noise, repeat.
  flash     the same sampler on the timesteps the Flash Diffusion student was trained on (docs/method.md).

Every sampler is `sample_<name>(model_fn, x, timesteps, schedule, ...) -> final latent`, where
`model_fn(x, t) -> model output` (eps or v, as `schedule.prediction_type` says) with `t` a Python number;
the caller folds classifier-free guidance into model_fn (see `cfg`). The latent state is kept in fp32
whatever the model's dtype (fp16 state accumulates rounding error over the steps) and returned in the
dtype of `x`.

Parity with diffusers' schedulers is the contract (tests/test_schedule.py), so these diffusers
behaviours are reproduced on purpose and marked "diffusers:" where they occur:
- DDIM steps to `t - num_train_timesteps // num_steps`, not to the next grid point (they differ for
  trailing / linspace spacing), and ends at `alphas_cumprod[0]` unless `set_alpha_to_one`.
- Each scheduler spaces timesteps its own way (`timesteps(..., solver=)`): DPM-Solver builds n+1 points
  for linspace / leading and drops the last; Euler keeps fractional linspace timesteps.
- Euler scales the initial noise by sigma_max for trailing / linspace spacing but by
  sqrt(sigma_max^2 + 1) (the exact value) for leading spacing.
- LCMScheduler ignores `timestep_spacing` (so a "trailing" config still gives [999, 759, 499, 259]).
Not supported (clear error in `from_config`): cosine / zero-SNR / Karras-type sigma schedules,
thresholding, "sample" prediction. Learned-variance outputs (PixArt) are split off by the caller.
"""
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flash.config_check import checked_kwargs
from flash.io import read_json

SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SAMPLERS = ("flash", "lcm", "ddim", "euler", "dpm++2m")


@dataclass
class NoiseSchedule:
    """The forward process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (DDPM Eq. 4), t = 0..T-1.

    Field names are diffusers' scheduler_config.json names. The defaults are diffusers' scheduler
    defaults except the betas, which default to the Stable Diffusion ones (see SCHEDULES).
    """
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"      # "linear" or "scaled_linear" (linear in sqrt(beta))
    trained_betas: list | None = None         # explicit betas override the three fields above
    prediction_type: str = "epsilon"          # or "v_prediction": v = sqrt(abar) eps - sqrt(1-abar) x0
    timestep_spacing: str = "leading"
    steps_offset: int = 0                     # added to "leading" timesteps (1 in the SD configs)
    set_alpha_to_one: bool = True             # DDIM's last step goes to abar = 1 (else to abar_0)
    clip_sample: bool = False                 # clamp x0 predictions (DDIM, LCM) to +-clip_sample_range
    clip_sample_range: float = 1.0
    original_inference_steps: int = 50        # LCMScheduler's distillation grid
    timestep_scaling: float = 10.0            # LCM boundary condition time scale
    betas: torch.Tensor = field(init=False, repr=False)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        if self.beta_schedule not in ("linear", "scaled_linear") and self.trained_betas is None:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported (linear, scaled_linear)")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported {PREDICTION_TYPES}")
        if self.timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing {self.timestep_spacing!r} is not supported {SPACINGS}")
        T = self.num_train_timesteps
        # fp32 as diffusers computes them, so that every scalar below matches its schedulers bit for bit.
        if self.trained_betas is not None:
            betas = torch.tensor(self.trained_betas, dtype=torch.float32)
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        else:
            betas = torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=torch.float32) ** 2
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)

    @classmethod
    def from_config(cls, config):
        """From a diffusers scheduler config (a dict, or the path of a scheduler_config.json).

        Unknown keys (solver_order, skip_prk_steps, ...) are ignored; values that change the schedule in
        a way this file does not implement raise a ValueError naming the key.
        """
        if isinstance(config, (str, Path)):
            config = read_json(config, "scheduler config")
        if not isinstance(config, dict):
            raise ValueError(f"scheduler config: must be a JSON object, got a {type(config).__name__}")
        unsupported = {"thresholding": False, "rescale_betas_zero_snr": False, "use_karras_sigmas": False,
                       "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
                       "use_flow_sigmas": False, "interpolation_type": "linear", "timestep_type": "discrete",
                       "final_sigmas_type": "zero"}
        for key, ok in unsupported.items():
            if config.get(key, ok) not in (ok, None):
                raise ValueError(f"scheduler config: {key}={config[key]!r} is not supported (only {ok!r})")
        if config.get("lambda_min_clipped", -math.inf) != -math.inf:
            raise ValueError("scheduler config: a finite lambda_min_clipped is not supported")
        kw = checked_kwargs(cls, {k: v for k, v in config.items() if k != "trained_betas"}, "scheduler config")
        betas = config.get("trained_betas")
        if betas is not None:
            if not (isinstance(betas, list) and 2 <= len(betas) <= 100_000 and all(
                    isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
                raise ValueError("scheduler config: trained_betas must be a list of 2 to 100000 numbers in [0, 1)")
            kw["trained_betas"] = betas
        # A missing timestep_spacing takes the default of the scheduler class that wrote the config.
        if "timestep_spacing" not in kw:
            linspace_default = ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                "EulerAncestralDiscreteScheduler")
            kw["timestep_spacing"] = "linspace" if config.get("_class_name") in linspace_default else "leading"
        return cls(**kw)

    # -- coefficients -------------------------------------------------------------------------------

    def abar(self, t, like=None):
        """alphas_cumprod at integer timestep(s) t: a float, or for a tensor t of shape (B,) a tensor
        shaped to broadcast against `like` (B, C, H, W)."""
        if isinstance(t, torch.Tensor) and t.ndim > 0:
            if t.is_floating_point() and not torch.equal(t, t.round()):
                raise ValueError("NoiseSchedule: timesteps must be integers for abar lookups")
            a = self.alphas_cumprod.to(t.device)[t.long()]
            if like is not None:
                a = a.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))
            return a
        t = float(t)
        if t != int(t) or not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"NoiseSchedule: timestep {t} is not an integer in [0, {self.num_train_timesteps})")
        return float(self.alphas_cumprod[int(t)])

    @property
    def sigmas(self):
        """EDM noise levels sigma_t = sqrt((1 - abar_t) / abar_t), t = 0..T-1 (fp32, increasing)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5

    def add_noise(self, x0, eps, t):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM Eq. 4); t an int or a (B,) tensor."""
        a = self.abar(t, x0)
        return _sqrt(a) * x0 + _sqrt(1 - a) * eps

    def pred_x0(self, x_t, model_out, t):
        a = self.abar(t, x_t)
        return x0_from_output(model_out, x_t, _sqrt(a), _sqrt(1 - a), self.prediction_type)

    def pred_eps(self, x_t, model_out, t):
        a = self.abar(t, x_t)
        return eps_from_output(model_out, x_t, _sqrt(a), _sqrt(1 - a), self.prediction_type)

    def velocity(self, x0, eps, t):
        """The v-prediction target v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, Sec. 4)."""
        a = self.abar(t, x0)
        return _sqrt(a) * eps - _sqrt(1 - a) * x0


SCHEDULES = {
    "sd15": NoiseSchedule(steps_offset=1, set_alpha_to_one=False),
    "sdxl": NoiseSchedule(steps_offset=1, set_alpha_to_one=False),
    "pixart": NoiseSchedule(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", timestep_spacing="linspace"),
}


def _sqrt(a):
    return a.sqrt() if isinstance(a, torch.Tensor) else math.sqrt(a)


def x0_from_output(out, x, alpha, sigma, prediction_type):
    """x0 from the model output at x = alpha x0 + sigma eps (variance preserving: alpha^2 + sigma^2 = 1)."""
    if prediction_type == "epsilon":
        return (x - sigma * out) / alpha
    return alpha * x - sigma * out                      # v = alpha eps - sigma x0


def eps_from_output(out, x, alpha, sigma, prediction_type):
    if prediction_type == "epsilon":
        return out
    return alpha * out + sigma * x


def cfg(eps_cond, eps_uncond, w):
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + w (eps_c - eps_u); w = 1 is no guidance."""
    return eps_uncond + w * (eps_cond - eps_uncond)


def boundary_scalings(t, sigma_data=0.5, timestep_scaling=10.0):
    """LCM boundary condition: f(x, t) = c_skip(t) x + c_out(t) x0_pred with c_skip(0) = 1, c_out(0) = 0.

    c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2), c_out = s t / sqrt((s t)^2 + sigma_data^2), s = 10.
    The time scale 10 makes c_skip < 1e-7 for t >= 249: away from t = 0 the output is just x0_pred.
    """
    if isinstance(t, torch.Tensor):
        t = t.float()
    st = t * timestep_scaling
    c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
    c_out = st / (st ** 2 + sigma_data ** 2) ** 0.5
    return c_skip, c_out


# -- timesteps --------------------------------------------------------------------------------------

def timesteps(schedule, num_steps, spacing=None, solver="ddim"):
    """The descending timesteps diffusers' `set_timesteps(num_steps)` gives (Lin et al. 2023, Table 2).

    spacing: "leading" (multiples of T // n, plus steps_offset), "trailing" (round(T - i T/n) - 1, always
    starting at T - 1), "linspace" (linspace(0, T - 1, n), reversed); None takes the schedule's.
    solver: "ddim" (DDIMScheduler), "euler" (EulerDiscreteScheduler: linspace is not rounded, so
    timesteps may be fractional) or "dpm" (DPMSolverMultistepScheduler: linspace and leading lay out
    n + 1 points and drop the last). numpy is used on purpose: it reproduces diffusers' rounding.
    """
    T, n = schedule.num_train_timesteps, num_steps
    spacing = spacing or schedule.timestep_spacing
    if not isinstance(n, int) or not 1 <= n <= T:
        raise ValueError(f"steps must be an integer in [1, {T}], got {num_steps!r}")
    if spacing not in SPACINGS:
        raise ValueError(f"timestep spacing must be one of {SPACINGS}, got {spacing!r}")
    if solver not in ("ddim", "euler", "dpm"):
        raise ValueError(f"solver must be 'ddim', 'euler' or 'dpm', got {solver!r}")
    if spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    elif solver == "dpm" and spacing == "linspace":
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif solver == "dpm":
        ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + schedule.steps_offset
    elif spacing == "linspace" and solver == "euler":
        return [float(t) for t in np.linspace(0, T - 1, n, dtype=np.float32)[::-1]]
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1]
    else:
        ts = (np.arange(0, n) * (T // n)).round()[::-1] + schedule.steps_offset
    return [int(t) for t in ts]


def lcm_timesteps(schedule, steps, original_steps=None):
    """LCMScheduler's timesteps: `steps` evenly spaced indices into its distillation grid
    [T/k - 1, 2T/k - 1, ..., T - 1] (k = original_steps = 50), reversed: 4 -> [999, 759, 499, 259]."""
    original_steps = original_steps or schedule.original_inference_steps
    T = schedule.num_train_timesteps
    if not 1 <= steps <= original_steps:
        raise ValueError(f"lcm: steps must be in [1, {original_steps}], got {steps}")
    grid = (np.arange(1, original_steps + 1) * (T // original_steps) - 1)[::-1]
    idx = np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in grid[idx]]


def flash_timesteps(steps, num_train_timesteps=1000):
    """The modes the Flash student is trained on: 1 -> [999], 2 -> [999, 499], 4 -> [999, 749, 499, 249].
    Other counts follow the same rule t_i = T - 1 - i (T // steps) (untrained, for experiments)."""
    if not isinstance(steps, int) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"flash: steps must be an integer in [1, {num_train_timesteps}] (the model's training "
                         f"timesteps), got {steps!r}")
    return [num_train_timesteps - 1 - i * (num_train_timesteps // steps) for i in range(steps)]


def sigmas_at(schedule, ts):
    """sigma at (possibly fractional) timesteps, linear interpolation in t as diffusers does, fp32."""
    s = schedule.sigmas.numpy()
    return [float(v) for v in np.interp(np.asarray(ts, dtype=np.float64), np.arange(len(s)), s).astype(np.float32)]


def randn(shape, generator=None, device="cpu", dtype=torch.float32):
    """Gaussian noise drawn as diffusers' randn_tensor draws it, so one seed gives one image: on the
    generator's device, and with a list of generators one (1, ...) draw per sample."""
    device = torch.device(device)
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        draws = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(draws).to(device)
    rand_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)


# -- samplers ---------------------------------------------------------------------------------------

def sample_ddim(model_fn, x, timesteps, schedule, eta=0.0, generator=None):
    """DDIM from x = x_T ~ N(0, I). eta = 0 is the deterministic ODE sampler; eta = 1 is DDPM-like.

    diffusers: the step goes to t - T // n whatever the spacing, and below t = 0 to
    abar = 1 (set_alpha_to_one) or abar_0.
    """
    dtype, x = x.dtype, x.float()
    T, n = schedule.num_train_timesteps, len(timesteps)
    final_abar = 1.0 if schedule.set_alpha_to_one else float(schedule.alphas_cumprod[0])
    for t in timesteps:
        out = model_fn(x, t)
        t_prev = t - T // n
        a, a_prev = schedule.abar(t), (schedule.abar(t_prev) if t_prev >= 0 else final_abar)
        x0 = x0_from_output(out, x, a ** 0.5, (1 - a) ** 0.5, schedule.prediction_type)
        eps = eps_from_output(out, x, a ** 0.5, (1 - a) ** 0.5, schedule.prediction_type)
        if schedule.clip_sample:      # diffusers clips x0 but keeps eps as predicted
            x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
        std = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5             # Equation 16
        x = a_prev ** 0.5 * x0 + (1 - a_prev - std ** 2) ** 0.5 * eps              # Equation 12
        if eta > 0:
            x = x + std * randn(out.shape, generator, out.device, out.dtype).float()
    return x.to(dtype)


def sample_euler(model_fn, noise, timesteps, schedule, init_sigma=None):
    """Euler steps of the probability-flow ODE dx/dsigma = (x - x0(x, sigma)) / sigma in sigma space,
    where x = x0 + sigma eps is the variance-preserving x_t times sqrt(1 + sigma^2) (EDM Sec. 2).

    noise ~ N(0, I) is scaled to the first sigma by init_sigma (default sqrt(sigma_0^2 + 1); diffusers
    uses sigma_0 with trailing / linspace spacing: `sample()` passes that). The network sees
    c_in x = x / sqrt(sigma^2 + 1) (EDM Table 1, VP), which is x_t again.
    """
    dtype = noise.dtype
    sig = sigmas_at(schedule, timesteps) + [0.0]
    x = noise.float() * (init_sigma if init_sigma is not None else (sig[0] ** 2 + 1) ** 0.5)
    for i, t in enumerate(timesteps):
        s = sig[i]
        c_in = 1 / (s ** 2 + 1) ** 0.5
        out = model_fn(x * c_in, t)
        # x0 in sigma space: alpha = c_in, sigma_vp = s c_in applied to x_t = c_in x
        x0 = x0_from_output(out.float(), x * c_in, c_in, s * c_in, schedule.prediction_type)
        d = (x - x0) / s                                      # EDM Eqs. 1 and 3, sigma(t) = t
        x = x + d * (sig[i + 1] - s)                          # EDM Algorithm 1, Euler step
    return x.to(dtype)


def sample_dpmpp_2m(model_fn, x, timesteps, schedule):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) from x = x_t at timesteps[0] through the given
    timesteps down to sigma = 0.

    In log-SNR lambda = log(alpha / sigma), with data prediction x0_i and h_i = lambda_{i+1} - lambda_i:
      x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D_i,
      D_i = x0_i (first step) or (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}, r_i = h_{i-1} / h_i.
    The final step to sigma = 0 is first order (e^{-h} = 0), so it returns the last x0 prediction, as
    diffusers' DPMSolverMultistepScheduler with final_sigmas_type="zero". Starting from any grid point
    works: the first step has no history and is first order (the Flash teacher starts mid-grid).
    """
    dtype, x = x.dtype, x.float()
    edm = sigmas_at(schedule, timesteps) + [0.0]
    alphas = [1 / (s ** 2 + 1) ** 0.5 for s in edm]               # VP alpha_t, sigma_t from EDM sigma
    sigmas = [s * a for s, a in zip(edm, alphas)]
    x0_prev = h_prev = None
    for i, t in enumerate(timesteps):
        out = model_fn(x, t)
        x0 = x0_from_output(out.float(), x, alphas[i], sigmas[i], schedule.prediction_type)
        if edm[i + 1] == 0:
            return x0.to(dtype)
        h = math.log(edm[i]) - math.log(edm[i + 1])              # lambda = -log(sigma_edm)
        if x0_prev is None:
            D = x0
        else:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * math.expm1(-h) * D
        x0_prev, h_prev = x0, h
    return x.to(dtype)


def sample_lcm(model_fn, noise, timesteps, schedule, generator=None):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; LCM's LCMScheduler):
    at each t: x0 = f(x, t) = c_skip x + c_out x0_pred; if not the last t, x = add_noise(x0, z, t_next)
    with FRESH z ~ N(0, I) drawn from `generator` (one draw of x's shape per step, as LCMScheduler).
    Returns the last x0 (docs/method.md, "Inference")."""
    dtype, x = noise.dtype, noise.float()
    for i, t in enumerate(timesteps):
        out = model_fn(x, t)
        x0 = schedule.pred_x0(x, out.float(), t)
        if schedule.clip_sample:
            x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
        c_skip, c_out = boundary_scalings(t, timestep_scaling=schedule.timestep_scaling)
        x0 = c_skip * x + c_out * x0
        if i + 1 < len(timesteps):
            z = randn(x.shape, generator, x.device, x.dtype)
            x = schedule.add_noise(x0, z, timesteps[i + 1])
    return x0.to(dtype)


def sample_flash(model_fn, noise, steps, schedule, generator=None):
    """The Flash student's sampler: LCM sampling on flash_timesteps(steps), no guidance."""
    return sample_lcm(model_fn, noise, flash_timesteps(steps, schedule.num_train_timesteps), schedule, generator)


def max_steps(name, schedule):
    """The most steps sampler `name` can take on `schedule`: LCM's distillation grid, else T."""
    return schedule.original_inference_steps if name == "lcm" else schedule.num_train_timesteps


def sample(name, model_fn, noise, steps, schedule, generator=None, spacing=None, eta=0.0):
    """Run sampler `name` for `steps` steps from noise ~ N(0, I), with the timesteps (and, for Euler,
    the initial noise scale) diffusers' matching scheduler would use for `schedule`."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if name == "flash":
        return sample_flash(model_fn, noise, steps, schedule, generator)
    if name == "lcm":
        return sample_lcm(model_fn, noise, lcm_timesteps(schedule, steps), schedule, generator)
    if name == "ddim":
        return sample_ddim(model_fn, noise, timesteps(schedule, steps, spacing), schedule, eta, generator)
    if name == "euler":
        ts = timesteps(schedule, steps, spacing, solver="euler")
        leading = (spacing or schedule.timestep_spacing) == "leading"
        init = None if leading else sigmas_at(schedule, ts[:1])[0]
        return sample_euler(model_fn, noise, ts, schedule, init_sigma=init)
    if name == "dpm++2m":
        return sample_dpmpp_2m(model_fn, noise, timesteps(schedule, steps, spacing, solver="dpm"), schedule)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
