"""The Flash Diffusion training objective as pure functions: timestep mixture and phases, student output,
teacher target, distillation / DMD / adversarial losses, and the discriminator head.

Paper: Chadebec et al., "Flash Diffusion" (arXiv 2406.02347). Every number comes from
docs/method.md ("One training step", "Schedule (timestep mixture and phases)", "Discriminator heads",
"Known quirks"), which records the authors' reference code. train.py calls these functions; none of them calls a network except
`teacher_target` (through the function it is given) and `DiscriminatorHead`.

Deviations from the reference, each with the reference behaviour kept behind a flag or noted:
- re-noising for DMD / GAN uses the true tau (`noise_at_true_tau=True`); the reference mapped every
  timestep off the K-grid to the last grid step (t=30) while telling the networks tau.
- the phase length counts batches (2500, 5000 for PixArt); the reference counted forward calls, twice
  per batch, so its "5000 iterations" were 2500 batches.
- the student is its own fake score for DMD (no separate fake-score network), as in the reference.
"""
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from flash.layers import GroupNorm
from flash.schedule import boundary_scalings, cfg, sample_dpmpp_2m

# ----------------------------------------------------------------------------------------------------
# Timestep mixture and phases (docs/method.md, "Schedule (timestep mixture and phases)")


@dataclass(frozen=True)
class Phase:
    """One training phase: mixture weights of the 4 modes (t = 999, 749, 499, 249 on the K=32 grid)
    and the loss weights of the student objective L = distill L_distill + dmd L_dmd + adv L_G."""
    name: str
    mode_weights: tuple
    distill: float
    dmd: float
    adv: float


# Index 0 is the warm-up: distillation only, on the two low-noise modes.
PHASES = (
    Phase("warm-up", (0.0, 0.0, 0.5, 0.5), 1.0, 0.0, 0.0),
    Phase("phase 1", (0.1, 0.3, 0.3, 0.3), 1.0, 0.3, 0.1),
    Phase("phase 2", (0.25, 0.25, 0.25, 0.25), 1.0, 0.5, 0.2),
    Phase("phase 3", (0.4, 0.2, 0.2, 0.2), 1.0, 0.7, 0.3),
)
# PixArt uses weaker adversarial weights; everything else is the same.
PIXART_PHASES = tuple(replace(p, adv=a) for p, a in zip(PHASES, (0.0, 0.05, 0.1, 0.2)))

# Per-backbone defaults train.py starts from: K (grid size), guidance range U[g_min, g_max], phase length
# in batches, and the phase table.
DEFAULTS = {
    "sd15": dict(K=32, guidance=(3.0, 13.0), phase_len=2500, phases=PHASES),
    "sdxl": dict(K=32, guidance=(3.0, 13.0), phase_len=2500, phases=PHASES),
    "pixart": dict(K=16, guidance=(2.0, 9.0), phase_len=5000, phases=PIXART_PHASES),
}


def mixture_pmf(K, mode_weights):
    """pmf over grid indices 0..K-1: p(i) ∝ sum_j w_j exp(-(i - loc_j)^2 / 0.5), loc_j = j * (K // 4).

    The Gaussian bumps are narrow (exp(-2) = .135 at one index away, exp(-8) = .0003 at two), so about
    79% of the mass sits on the modes themselves and the rest on their direct neighbours. The bump at
    index 0 loses its left half at the edge of the grid, so a weight there buys more probability on the
    mode itself: P(999) = .329 in phase 3 against P(749) = .164 at half the weight.
    """
    if len(mode_weights) != 4 or K < 4:
        raise ValueError(f"mixture_pmf: need K >= 4 and 4 mode weights, got K={K}, {mode_weights}")
    i = torch.arange(K, dtype=torch.float64)
    locs = torch.arange(4, dtype=torch.float64) * (K // 4)
    bumps = torch.exp(-(i[None, :] - locs[:, None]) ** 2 / 0.5)         # (4, K)
    p = (torch.tensor(mode_weights, dtype=torch.float64)[:, None] * bumps).sum(0)
    return p / p.sum()


def phase_at(step, phase_len=2500):
    """Phase index (0 = warm-up, then 1, 2, 3 forever) of batch `step` (0-based).

    The reference configured 5000 "iterations" per phase (10000 for PixArt) but advanced its counter on
    every forward call, twice per batch (student step and discriminator step), so a phase really lasted
    2500 batches (5000 for PixArt). We count batches, default to those real lengths, and train.py saves
    the step in the resume state (the reference did not, so a resumed run restarted the warm-up).
    """
    if phase_len <= 0:
        raise ValueError(f"phase_len must be positive, got {phase_len}")
    return min(int(step) // int(phase_len), 3)


def sample_grid_index(pmf, generator=None):
    """Draw ONE grid index for the whole batch (docs/method.md, step 2): every sample shares t = grid[i], so the
    teacher trajectory is one batched solve over the same sub-grid."""
    return int(torch.multinomial(pmf.float(), 1, generator=generator).item())


# ----------------------------------------------------------------------------------------------------
# Student and teacher (docs/method.md, steps 3-5)


def _per_sample(v, like):
    """Broadcast a scalar or (B,) value against a (B, C, H, W) tensor."""
    v = torch.as_tensor(v, dtype=torch.float32, device=like.device)
    return v.reshape(-1, *([1] * (like.ndim - 1))) if v.ndim == 1 else v


def noisy_latent(z, eps, i, grid, schedule):
    """x_t at t = grid[i] (step 3). At i == 0 (t = 999) the input is pure noise, as at inference: the
    schedule's abar_999 is not exactly 0 (sqrt = .068 for SD), and the student must learn to start from
    N(0, I)."""
    if i == 0:
        return eps
    return schedule.add_noise(z, eps, int(grid[i]))


def student_output(x_t, eps_s, t, schedule):
    """Student x0 in the LCM boundary form (step 4): out = c_skip x_t + c_out x0_s.

    c_skip = .25 / ((10t)^2 + .25), c_out = 10t / sqrt((10t)^2 + .25) (sigma_data .5, time scale 10): for
    t >= 249 c_skip < 1e-7 and out is x0_s; only near t = 0 does it lean on x_t (consistency boundary).
    """
    x0_s = schedule.pred_x0(x_t, eps_s, t)
    c_skip, c_out = boundary_scalings(t, timestep_scaling=schedule.timestep_scaling)
    return _per_sample(c_skip, x_t) * x_t + _per_sample(c_out, x_t) * x0_s


@torch.no_grad()
def teacher_target(teacher_fn, x_t, i, grid, schedule, w):
    """Teacher target x0_T (step 5): CFG DPM-Solver++ 2M from x_t at grid[i] over the rest of the grid
    (grid[i], grid[i+1], ..., grid[K-1]) down to sigma 0, final step first order.

    teacher_fn(x, t) -> (eps_cond, eps_uncond); `w` (scalar or (B,)) is the guidance scale, combined as
    eps = w eps_c + (1 - w) eps_u. Cost: K - i solver steps, i.e. 2 (K - i) teacher evaluations
    (64 from t = 999 at K = 32): the dominant cost of a training step. The first step has no history,
    so it is first order, as when the reference started the K-step scheduler mid-grid.
    """
    sub = [int(t) for t in grid[i:]]

    def guided(x, t):
        eps_c, eps_u = teacher_fn(x, t)
        return cfg(eps_c, eps_u, _per_sample(w, eps_c))

    return sample_dpmpp_2m(guided, x_t, sub, schedule)


# ----------------------------------------------------------------------------------------------------
# Losses (docs/method.md, step 6)


def distillation_loss(out, target, kind="l2"):
    """L_distill between the student output and the teacher target, in latent space: "l2" (default, mse)
    or "l1". The reference also offered LPIPS on a VAE-decoded centre crop; its weights are not available
    offline, so flash leaves it out."""
    if kind == "l2":
        return F.mse_loss(out.float(), target.float())
    if kind == "l1":
        return F.l1_loss(out.float(), target.float())
    raise ValueError(f"distillation_loss: kind must be 'l2' or 'l1', got {kind!r}")


def dmd_renoise_timesteps(B, generator=None, low=0, high=999, device="cpu"):
    """Per-sample tau ~ U{low..high} (both inclusive) for the DMD re-noising."""
    return torch.randint(low, high + 1, (B,), generator=generator).to(device)


def renoise(x0, noise, tau, schedule, grid=None, noise_at_true_tau=True):
    """x_tau = add_noise(x0, noise, tau) for DMD and GAN; the networks are always told tau.

    noise_at_true_tau=False reproduces the reference quirk: its DPM-Solver add_noise looked each tau up
    in the current K-grid and used the LAST grid step (t = 30 at K = 32) for any tau not on it, so
    almost all DMD samples, and every GAN sample (10, 250, 500, 750 are off the grid), were barely noised.
    """
    tau = torch.as_tensor(tau, device=x0.device)
    if not noise_at_true_tau:
        if grid is None:
            raise ValueError("renoise: noise_at_true_tau=False needs the K-grid")
        grid = torch.as_tensor([int(t) for t in grid], device=x0.device)
        tau = torch.where(torch.isin(tau, grid), tau, grid[-1])
    return schedule.add_noise(x0, noise, tau)


def dmd_loss(out, x0_real, x0_fake):
    """Distribution matching loss with the student as fake score (docs/method.md, step 6, DMD).

    x0_real: teacher's x0 (with CFG) at x_tau; x0_fake: the student's x0 (no CFG, no grad) at x_tau.
    grad = x0_fake - x0_real points from the real towards the fake distribution; dividing by the mean
    |out - x0_real| per sample normalises its scale across noise levels (the weighting of DMD, Yin et al.
    2023).
    The loss mse(out, (out - weight grad).detach()) has d L / d out = 2 weight grad / numel(out):
    a plain gradient step along -grad, whatever the loss value.
    """
    out32, real, fake = out.float(), x0_real.float().detach(), x0_fake.float().detach()
    grad = fake - real
    weight = 1.0 / ((out32.detach() - real).abs().mean(dim=tuple(range(1, out.ndim)), keepdim=True) + 1e-5)
    return F.mse_loss(out32, (out32 - weight * grad).detach())


GAN_TIMESTEPS = (10, 250, 500, 750)


def gan_timesteps(B, generator=None, device="cpu"):
    """Per-sample tau drawn uniformly from {10, 250, 500, 750} for the adversarial re-noising."""
    idx = torch.randint(len(GAN_TIMESTEPS), (B,), generator=generator)
    return torch.tensor(GAN_TIMESTEPS)[idx].to(device)


def generator_loss(d_fake, kind="lsgan"):
    """Student's adversarial loss on the head's logits for the re-noised student output.

    lsgan (default, the reference): mse(sigmoid(D), 1); hinge: -mean(D); nonsat: softplus(-D)
    (= -log sigmoid(D)). Targets are built with ones_like, so any head output shape works.
    """
    d_fake = d_fake.float()
    if kind == "lsgan":
        return F.mse_loss(torch.sigmoid(d_fake), torch.ones_like(d_fake))
    if kind == "hinge":
        return -d_fake.mean()
    if kind == "nonsat":
        return F.softplus(-d_fake).mean()
    raise ValueError(f"generator_loss: kind must be 'lsgan', 'hinge' or 'nonsat', got {kind!r}")


def discriminator_loss(d_real, d_fake, kind="lsgan"):
    """Discriminator loss on logits for re-noised data (real) and re-noised, detached student output (fake).

    lsgan: .5 [mse(sigmoid(D_r), 1) + mse(sigmoid(D_f), 0)]; hinge: mean relu(1 - D_r) + mean relu(1 + D_f);
    nonsat: softplus(-D_r) + softplus(D_f) (binary cross-entropy on logits).
    """
    d_real, d_fake = d_real.float(), d_fake.float()
    if kind == "lsgan":
        return 0.5 * (F.mse_loss(torch.sigmoid(d_real), torch.ones_like(d_real))
                      + F.mse_loss(torch.sigmoid(d_fake), torch.zeros_like(d_fake)))
    if kind == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    if kind == "nonsat":
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    raise ValueError(f"discriminator_loss: kind must be 'lsgan', 'hinge' or 'nonsat', got {kind!r}")


# ----------------------------------------------------------------------------------------------------
# Discriminator head (docs/method.md, "Discriminator heads"): convs without bias unless said.


def _conv(c_in, c_out, k, s, p, bias=False):
    return nn.Conv2d(c_in, c_out, k, s, p, bias=bias)


def _sd15_layers(c):
    # 1280x8x8 -> 64x8x8 -> 128x4x4 -> 1x1x1. Note SiLU *before* the GroupNorm here, unlike SDXL.
    return [_conv(c, 64, 3, 1, 1, bias=True), nn.SiLU(),
            _conv(64, 128, 4, 2, 1), nn.SiLU(), GroupNorm(4, 128),
            _conv(128, 1, 4, 1, 0)]


def _sdxl_layers(c):
    # 1280x32x32 -> 256x16x16 -> 512x8x8 -> 1024x4x4 -> 1x1x1.
    return [_conv(c, 256, 4, 2, 1), nn.SiLU(),
            _conv(256, 512, 4, 2, 1), GroupNorm(4, 512), nn.SiLU(),
            _conv(512, 1024, 4, 2, 1), GroupNorm(4, 1024), nn.SiLU(),
            _conv(1024, 1, 4, 1, 0)]


def _generic_layers(c, size, width, max_width=1024):
    """Any (c, h, w): a 3x3 stem to `width` channels, then a k4 s2 p1 conv (doubling channels, GN, SiLU)
    while the smaller side exceeds 4 (each one halves it), then one conv whose kernel covers what is left,
    ending at 1x1, like the native heads (8 -> 4 -> 1 for SD1.5; 32 -> 16 -> 8 -> 4 -> 1 for SDXL)."""
    h, w = (size, size) if isinstance(size, int) else size
    layers, ch = [_conv(c, width, 3, 1, 1, bias=True), nn.SiLU()], width
    while min(h, w) > 4:
        nxt = min(2 * ch, max_width)
        layers += [_conv(ch, nxt, 4, 2, 1), GroupNorm(4, nxt), nn.SiLU()]
        ch, h, w = nxt, h // 2, w // 2
    return layers + [_conv(ch, 1, (h, w), 1, 0)]


HEADS = {"sd15": _sd15_layers, "sdxl": _sdxl_layers}


class DiscriminatorHead(nn.Module):
    """Trainable conv head on the frozen teacher's mid-block features: (B, C, H, W) -> (B, N) logits.

    preset "sd15" / "sdxl" builds the reference head (870,720 / 15,748,096 params at 1280 channels); at
    its native size it gives N = 1, at other sizes N may be larger (the LSGAN targets follow the output).
    preset None builds the generic head for a feature map of `in_channels` x `size`, always N = 1.
    """

    def __init__(self, in_channels=1280, size=8, preset=None, width=64):
        super().__init__()
        if preset is not None and preset not in HEADS:
            raise ValueError(f"DiscriminatorHead: preset must be one of {sorted(HEADS)} or None, got {preset!r}")
        if preset is None and width % 4:
            raise ValueError(f"DiscriminatorHead: width must be a multiple of 4 (GroupNorm(4)), got {width}")
        layers = HEADS[preset](in_channels) if preset else _generic_layers(in_channels, size, width)
        self.layers = nn.Sequential(*layers)
        self.min_size = {"sd15": (8, 8), "sdxl": (32, 32)}.get(preset) or ((size, size) if isinstance(size, int)
                                                                            else tuple(size))

    @classmethod
    def for_features(cls, family, shape):
        """The reference head of `family` where the feature map `shape` (C, H, W) is its native one (1280 x 8 x 8
        for SD1.5 at 512 px, 1280 x 32 x 32 for SDXL at 1024 px), else the generic head for that map."""
        native = {"sd15": (1280, 8, 8), "sdxl": (1280, 32, 32)}.get(family)
        return cls(shape[0], tuple(shape[1:]), preset=family if native == tuple(shape) else None)

    def forward(self, features):
        # A map smaller than the head was built for (an aspect-ratio bucket narrower than the square, e.g. SDXL's
        # 512 x 2048: 16 x 64 features) is zero-padded, centred, up to it; a larger one gives N > 1 logits.
        dh, dw = (max(0, m - s) for m, s in zip(self.min_size, features.shape[-2:]))
        if dh or dw:
            features = F.pad(features, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))
        return self.layers(features).flatten(1)
