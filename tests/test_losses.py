"""flash/losses.py against the numbers of docs/method.md and against closed forms / diffusers' DPM-Solver.

All fast: no model, tiny tensors; the teacher is a fake linear function of (x, t).
"""
import math

import pytest
import torch

from flash import losses as L
from flash.schedule import NoiseSchedule, boundary_scalings, timesteps

GRID32 = [999, 968, 937, 905, 874, 843, 811, 780, 749, 718, 687, 655, 624, 593, 561, 530,
          499, 468, 437, 405, 374, 343, 311, 280, 249, 218, 187, 155, 124, 93, 61, 30]

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", prediction_type="epsilon")


def sd_schedule():
    return NoiseSchedule.from_config(dict(SD_SCHEDULER))


# ---------------------------------------------------------------------------------------------------
# Mixture and phases


def test_pmf_matches_method_table():
    warm = L.mixture_pmf(32, L.PHASES[0].mode_weights)
    P = dict(zip(GRID32, warm.tolist()))
    assert abs(warm.sum().item() - 1) < 1e-12
    assert abs(P[499] - 0.393) < 1e-3 and abs(P[249] - 0.393) < 1e-3
    for t in (530, 468, 280, 218):
        assert abs(P[t] - 0.053) < 1e-3
    assert max(P[999], P[749]) < 1e-9                      # modes with weight 0
    p3 = dict(zip(GRID32, L.mixture_pmf(32, L.PHASES[3].mode_weights).tolist()))
    assert abs(p3[999] - 0.329) < 1e-3
    assert abs(p3[968] - 0.045) < 1e-3
    # "about 79% of the mass on the modes" (749, 499, 249, 999 = indices 0, 8, 16, 24)
    assert abs(warm[[0, 8, 16, 24]].sum().item() - 0.787) < 2e-3
    for ph in L.PHASES:
        mass = L.mixture_pmf(32, ph.mode_weights)[[0, 8, 16, 24]].sum().item()
        assert 0.78 < mass < 0.83


def test_pmf_pixart_grid_modes():
    # K=16: modes at indices 0, 4, 8, 12, which are again t = 999, 749, 499, 249 on the trailing grid
    p = L.mixture_pmf(16, (0.25, 0.25, 0.25, 0.25))
    assert p.argsort(descending=True)[:4].sort().values.tolist() == [0, 4, 8, 12]
    grid16 = timesteps(NoiseSchedule.from_config(dict(SD_SCHEDULER, beta_schedule="linear")), 16, "trailing")
    assert [grid16[i] for i in (0, 4, 8, 12)] == [999, 749, 499, 249]
    assert timesteps(sd_schedule(), 32, "trailing") == GRID32
    with pytest.raises(ValueError):
        L.mixture_pmf(32, (1.0, 0.0))


def test_phase_table_and_schedule():
    assert [(p.distill, p.dmd, p.adv) for p in L.PHASES] == [(1, 0, 0), (1, .3, .1), (1, .5, .2), (1, .7, .3)]
    assert [p.adv for p in L.PIXART_PHASES] == [0, .05, .1, .2]
    assert [p.dmd for p in L.PIXART_PHASES] == [0, .3, .5, .7]
    assert L.DEFAULTS["sd15"]["phase_len"] == 2500 and L.DEFAULTS["pixart"]["phase_len"] == 5000
    steps = [0, 2499, 2500, 4999, 5000, 7499, 7500, 10 ** 7]
    assert [L.phase_at(s) for s in steps] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [L.phase_at(s, 5000) for s in (4999, 5000, 9999, 10000, 15000)] == [0, 1, 1, 2, 3]
    with pytest.raises(ValueError):
        L.phase_at(1, 0)


def test_sample_grid_index_follows_pmf():
    g = torch.Generator().manual_seed(0)
    pmf = L.mixture_pmf(32, L.PHASES[0].mode_weights)
    draws = torch.tensor([L.sample_grid_index(pmf, g) for _ in range(4000)])
    assert isinstance(L.sample_grid_index(pmf, g), int)
    assert set(draws.tolist()) <= {14, 15, 16, 17, 18, 22, 23, 24, 25, 26}
    assert abs((draws == 16).float().mean().item() - 0.393) < 0.03
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [L.sample_grid_index(pmf, g1) for _ in range(8)] == [L.sample_grid_index(pmf, g2) for _ in range(8)]


# ---------------------------------------------------------------------------------------------------
# Student output, teacher target


def test_boundary_form_limits():
    s = sd_schedule()
    x_t, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    for t in (249, 499, 999):
        x0 = s.pred_x0(x_t, eps, t)
        torch.testing.assert_close(L.student_output(x_t, eps, t, s), x0, rtol=1e-6, atol=1e-6)
    c_skip, c_out = boundary_scalings(0)
    assert float(c_skip) == 1.0 and float(c_out) == 0.0
    torch.testing.assert_close(L.student_output(x_t, eps, 0, s), x_t)
    # t = 10: c_skip = .25 / (100^2 + .25), c_out = 100 / sqrt(100^2 + .25) -> mostly x0, exactly the form
    x0 = s.pred_x0(x_t, eps, 10)
    cs, co = 0.25 / (100 ** 2 + 0.25), 100 / math.sqrt(100 ** 2 + 0.25)
    torch.testing.assert_close(L.student_output(x_t, eps, 10, s), cs * x_t + co * x0)
    # per-sample timesteps broadcast over (B, C, H, W)
    t = torch.tensor([0, 999])
    out = L.student_output(x_t, eps, t, s)
    torch.testing.assert_close(out[0], x_t[0])
    torch.testing.assert_close(out[1], s.pred_x0(x_t[1:], eps[1:], 999)[0], rtol=1e-5, atol=1e-5)


def test_noisy_latent():
    s = sd_schedule()
    z, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert L.noisy_latent(z, eps, 0, GRID32, s) is eps
    torch.testing.assert_close(L.noisy_latent(z, eps, 16, GRID32, s), s.add_noise(z, eps, 499))


def fake_teacher(x, t):
    """Linear in x with a t-dependent offset, different for the two CFG branches."""
    t = torch.as_tensor(t, dtype=torch.float32)
    t = t.reshape(-1, 1, 1, 1) if t.ndim == 1 else t
    eps_c = 0.3 * x + 0.2 * torch.sin(t / 150.0) + 0.05
    eps_u = -0.1 * x + 0.1 * torch.cos(t / 200.0)
    return eps_c, eps_u


def diffusers_target(x_t, i, w):
    """Independent reference: diffusers' DPM-Solver++ 2M on the trailing K=32 grid, started at index i
    (as the reference did), final sigma 0."""
    from diffusers import DPMSolverMultistepScheduler
    sch = DPMSolverMultistepScheduler(**SD_SCHEDULER, algorithm_type="dpmsolver++", solver_order=2,
                                      timestep_spacing="trailing", final_sigmas_type="zero",
                                      lower_order_final=True)
    sch.set_timesteps(32)
    assert sch.timesteps.tolist() == GRID32
    sch.set_begin_index(i)
    x = x_t.clone()
    for t in sch.timesteps[i:]:
        eps_c, eps_u = fake_teacher(x, int(t))
        x = sch.step(eps_u + w * (eps_c - eps_u), t, x).prev_sample
    return x


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # numpy 2 copy= warning inside diffusers
@pytest.mark.parametrize("i", [0, 13, 24, 29, 30, 31])
def test_teacher_target_matches_diffusers(i):
    s = sd_schedule()
    x_t = torch.randn(2, 4, 4, 4)
    w = 7.5
    ours = L.teacher_target(fake_teacher, x_t, i, GRID32, s, w)
    ref = diffusers_target(x_t, i, w)
    assert not ours.requires_grad
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)    # measured: <= 4e-7


def test_teacher_target_last_step_is_x0_and_per_sample_guidance():
    s = sd_schedule()
    x_t = torch.randn(2, 4, 4, 4)
    # from the last grid step one first-order step to sigma 0 lands on the CFG x0 prediction
    eps_c, eps_u = fake_teacher(x_t, 30)
    expect = s.pred_x0(x_t, eps_u + 4.0 * (eps_c - eps_u), 30)
    torch.testing.assert_close(L.teacher_target(fake_teacher, x_t, 31, GRID32, s, 4.0), expect,
                               rtol=1e-5, atol=1e-5)
    # one guidance scale per sample equals running each sample with its own scale
    both = L.teacher_target(fake_teacher, x_t, 20, GRID32, s, torch.tensor([3.0, 11.0]))
    one = L.teacher_target(fake_teacher, x_t[1:], 20, GRID32, s, 11.0)
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Losses


def test_distillation_loss_kinds():
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(L.distillation_loss(a, b), ((a - b) ** 2).mean())
    torch.testing.assert_close(L.distillation_loss(a, b, "l1"), (a - b).abs().mean())
    with pytest.raises(ValueError):
        L.distillation_loss(a, b, "perceptual")   # the reference's LPIPS option is not offered
    with pytest.raises(ValueError):
        L.distillation_loss(a, b, "l3")


def test_dmd_gradient_is_weight_times_grad():
    torch.manual_seed(1)
    out = torch.randn(3, 4, 5, 5, requires_grad=True)
    x0_real, x0_fake = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    loss = L.dmd_loss(out, x0_real, x0_fake)
    loss.backward()
    with torch.no_grad():
        weight = 1 / ((out - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-5)
        grad = x0_fake - x0_real
        expect = 2 * weight * grad / out.numel()
        # the loss value is the mean squared size of the step it takes
        torch.testing.assert_close(loss, ((weight * grad) ** 2).mean())
    # fp32 precision: the error is the rounding of out - (out - weight grad), a few ulp of |out|
    assert (out.grad - expect).abs().max().item() < 1e-5 * expect.abs().max().item()


def test_dmd_renoise_and_gan_timesteps():
    g = torch.Generator().manual_seed(0)
    tau = L.dmd_renoise_timesteps(5000, g)
    assert tau.shape == (5000,) and tau.min() == 0 and tau.max() == 999
    tau = L.dmd_renoise_timesteps(2000, g, low=20, high=980)
    assert tau.min() >= 20 and tau.max() <= 980
    assert set(L.dmd_renoise_timesteps(200, g, low=5, high=7).tolist()) == {5, 6, 7}   # both ends inclusive
    gt = L.gan_timesteps(400, g)
    assert gt.shape == (400,) and set(gt.tolist()) == {10, 250, 500, 750}


def test_renoise_true_tau_and_reference_quirk():
    s = sd_schedule()
    x0, n = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    tau = torch.tensor([10, 499, 500])
    torch.testing.assert_close(L.renoise(x0, n, tau, s), s.add_noise(x0, n, tau))
    # quirk: off-grid tau is noised as the last grid step (30); on-grid tau (499) keeps its level
    quirk = L.renoise(x0, n, tau, s, GRID32, noise_at_true_tau=False)
    torch.testing.assert_close(quirk, s.add_noise(x0, n, torch.tensor([30, 499, 30])))
    assert not torch.allclose(quirk, L.renoise(x0, n, tau, s))
    with pytest.raises(ValueError):
        L.renoise(x0, n, tau, s, noise_at_true_tau=False)


def test_gan_losses_known_values():
    d = torch.full((4, 1), math.log(3.0))                   # sigmoid = .75
    assert abs(L.generator_loss(d).item() - 0.0625) < 1e-7  # (.75 - 1)^2
    assert abs(L.generator_loss(torch.zeros(2, 1)).item() - 0.25) < 1e-7
    # real at .75 -> .0625, fake at .75 -> .5625; half the sum
    assert abs(L.discriminator_loss(d, d).item() - 0.5 * (0.0625 + 0.5625)) < 1e-7
    big = torch.full((2, 1), 50.0)
    assert L.discriminator_loss(big, -big).item() < 1e-12   # a perfect discriminator
    assert abs(L.generator_loss(-big).item() - 1.0) < 1e-7
    # hinge and non-saturating
    x = torch.tensor([[0.5], [-2.0]])
    assert abs(L.generator_loss(x, "hinge").item() - 0.75) < 1e-7
    assert abs(L.discriminator_loss(x, x, "hinge").item() - ((0.5 + 3.0) / 2 + (1.5 + 0.0) / 2)) < 1e-7
    sp = torch.nn.functional.softplus
    assert abs(L.generator_loss(x, "nonsat").item() - sp(-x).mean().item()) < 1e-7
    assert abs(L.discriminator_loss(x, x, "nonsat").item() - (sp(-x).mean() + sp(x).mean()).item()) < 1e-7
    with pytest.raises(ValueError):
        L.generator_loss(x, "wgan")


# ---------------------------------------------------------------------------------------------------
# Discriminator head


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_native_heads_param_counts_and_shapes():
    with torch.device("meta"):
        sd15 = L.DiscriminatorHead(1280, preset="sd15")
        sdxl = L.DiscriminatorHead(1280, preset="sdxl")
        assert n_params(sd15) == 870_720
        assert n_params(sdxl) == 15_748_096
        assert sd15(torch.empty(2, 1280, 8, 8)).shape == (2, 1)
        assert sdxl(torch.empty(2, 1280, 32, 32)).shape == (2, 1)
        # at another size a native head gives more than one logit; LSGAN targets follow the shape
        assert sd15(torch.empty(2, 1280, 16, 16)).shape == (2, 25)
    assert [type(m).__name__ for m in sd15.layers] == ["Conv2d", "SiLU", "Conv2d", "SiLU", "GroupNorm", "Conv2d"]
    assert sd15.layers[0].bias is not None and sd15.layers[2].bias is None
    with pytest.raises(ValueError):
        L.DiscriminatorHead(preset="sd3")


def test_head_for_features_picks_the_reference_head_at_native_size():
    """The family's reference head only at its native feature map; every other map (another size, SD2, a tiny
    model) gets the generic head sized from the map."""
    with torch.device("meta"):
        assert n_params(L.DiscriminatorHead.for_features("sd15", (1280, 8, 8))) == 870_720
        assert n_params(L.DiscriminatorHead.for_features("sdxl", torch.Size([1280, 32, 32]))) == 15_748_096
        for family, shape in [("sd15", (1280, 16, 16)), ("sd2", (1280, 8, 8)), ("sdxl", (1280, 8, 8))]:
            head = L.DiscriminatorHead.for_features(family, shape)      # generic: one logit (the sd15 preset gives 25)
            assert head(torch.empty(2, *shape)).shape == (2, 1)
    tiny = L.DiscriminatorHead.for_features("sd15", (32, 4, 4))
    assert tiny(torch.randn(2, 32, 4, 4)).shape == (2, 1)


@pytest.mark.parametrize("c,size,downs", [(64, 4, 0), (32, 2, 0), (32, 1, 0), (32, 5, 1), (16, (8, 4), 0),
                                          (32, 8, 1), (1280, 32, 3)])
def test_generic_head_ends_at_one_logit(c, size, downs):
    dev = "meta" if c == 1280 else "cpu"
    with torch.device(dev):
        head = L.DiscriminatorHead(c, size)
        h, w = (size, size) if isinstance(size, int) else size
        f = torch.randn(3, c, h, w, requires_grad=dev == "cpu")
        d = head(f)
    assert d.shape == (3, 1)
    assert sum(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in head.layers) == downs
    if dev == "cpu":
        L.generator_loss(d).backward()
        assert f.grad is not None and f.grad.abs().sum() > 0
        L.discriminator_loss(head(f.detach()), d.detach()).backward()


def test_lsgan_targets_follow_head_output_shape():
    head = L.DiscriminatorHead(8, preset="sd15")
    d_real = head(torch.randn(2, 8, 12, 12))                  # 12 -> 6 -> 3x3 logits
    d_fake = head(torch.randn(2, 8, 12, 12))
    assert d_real.shape == (2, 9)
    expect = 0.5 * (((torch.sigmoid(d_real) - 1) ** 2).mean() + (torch.sigmoid(d_fake) ** 2).mean())
    torch.testing.assert_close(L.discriminator_loss(d_real, d_fake), expect)
