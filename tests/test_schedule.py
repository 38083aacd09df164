"""flash/schedule.py against diffusers' schedulers (the oracle) and hand-computed values.

A deterministic fake model (a smooth nonlinear function of x and t) drives our samplers and the
diffusers scheduler loops from the same initial noise; final latents must agree to ~1e-5 (fp32).
"""
import math

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       LCMScheduler)

from flash import schedule as S

# The released SD1.5 scheduler_config.json (a PNDMScheduler config; SDXL's differs only in class).
SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False,
        "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "clip_sample": False}
GRID32 = [999, 968, 937, 905, 874, 843, 811, 780, 749, 718, 687, 655, 624, 593, 561, 530,
          499, 468, 437, 405, 374, 343, 311, 280, 249, 218, 187, 155, 124, 93, 61, 30]
STEP_COUNTS = (1, 2, 4, 10, 25, 32, 50)
DIFFUSERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}


def fake_model(x, t):
    """Smooth, nonlinear in x and t, output of eps-like magnitude."""
    t = float(t)
    return torch.tanh(0.7 * x) * math.cos(t / 300.0) + 0.3 * torch.sin(1.3 * x + t / 170.0)


def config(**kw):
    return {**SD15, **kw}


def diffusers_scheduler(solver, **kw):
    extra = {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero",
             "lower_order_final": True} if solver == "dpm" else {}
    return DIFFUSERS[solver].from_config({**config(**kw), **extra})


def run_diffusers(sch, noise, steps=None, generator=None, custom=None, **step_kw):
    """The loop every diffusers text-to-image pipeline runs."""
    sch.set_timesteps(steps) if custom is None else sch.set_timesteps(timesteps=custom)
    x = noise * sch.init_noise_sigma
    for t in sch.timesteps:
        out = fake_model(sch.scale_model_input(x, t), t.item())
        step = sch.step(out, t, x, generator=generator, **step_kw)
        x = step.prev_sample
    return step.denoised if isinstance(sch, LCMScheduler) else x


def close(ours, ref, tol=1e-5):
    err = (ours - ref).abs().max().item()
    assert err <= tol * max(1.0, ref.abs().max().item()), f"max abs diff {err:.3g}"
    return err


@pytest.fixture
def noise():
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------
# Schedule and timesteps


def test_schedule_matches_diffusers_and_config_parsing():
    s = S.NoiseSchedule.from_config(SD15)
    ref = DDIMScheduler.from_config(SD15)
    assert torch.equal(s.alphas_cumprod, ref.alphas_cumprod) and torch.equal(s.betas, ref.betas)
    assert (s.steps_offset, s.set_alpha_to_one, s.timestep_spacing) == (1, False, "leading")
    lin = S.NoiseSchedule.from_config({"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
                                       "_class_name": "DPMSolverMultistepScheduler", "solver_order": 2})
    assert torch.equal(lin.alphas_cumprod, DPMSolverMultistepScheduler(beta_schedule="linear").alphas_cumprod)
    assert lin.timestep_spacing == "linspace"            # DPMSolverMultistepScheduler's default
    assert torch.equal(S.SCHEDULES["pixart"].alphas_cumprod, lin.alphas_cumprod)
    assert torch.equal(S.SCHEDULES["sd15"].alphas_cumprod, s.alphas_cumprod)
    for bad in ({"use_karras_sigmas": True}, {"beta_schedule": "squaredcos_cap_v2"},
                {"prediction_type": "sample"}, {"timestep_spacing": "karras"}, {"thresholding": True},
                {"rescale_betas_zero_snr": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            S.NoiseSchedule.from_config(config(**bad))


def test_config_from_json_file(tmp_path):
    import json
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config(prediction_type="v_prediction")))
    s = S.NoiseSchedule.from_config(tmp_path / "scheduler_config.json")
    assert s.prediction_type == "v_prediction"
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        S.NoiseSchedule.from_config(tmp_path / "bad.json")


@pytest.mark.parametrize("solver", ["ddim", "euler", "dpm"])
@pytest.mark.parametrize("spacing", S.SPACINGS)
def test_timesteps_match_diffusers(solver, spacing):
    s = S.NoiseSchedule.from_config(config(timestep_spacing=spacing))
    sch = diffusers_scheduler(solver, timestep_spacing=spacing)
    for n in STEP_COUNTS + (3, 7, 1000):
        sch.set_timesteps(n)
        assert S.timesteps(s, n, solver=solver) == sch.timesteps.tolist(), (solver, spacing, n)


def test_trailing_grid_from_method_md():
    s = S.NoiseSchedule.from_config(SD15)
    for solver in ("ddim", "euler", "dpm"):
        assert S.timesteps(s, 32, "trailing", solver=solver) == GRID32
    assert S.timesteps(s, 4, "leading") == [751, 501, 251, 1]        # steps_offset 1
    assert S.timesteps(s, 4, "linspace") == [999, 666, 333, 0]
    assert S.timesteps(s, 4, "linspace", solver="dpm") == [999, 749, 500, 250]
    with pytest.raises(ValueError, match="steps"):
        S.timesteps(s, 0)


def test_flash_and_lcm_timesteps():
    s = S.NoiseSchedule.from_config(SD15)
    assert S.flash_timesteps(1) == [999] and S.flash_timesteps(2) == [999, 499]
    assert S.flash_timesteps(4) == [999, 749, 499, 249]
    assert S.lcm_timesteps(s, 4) == [999, 759, 499, 259]
    assert S.lcm_timesteps(s, 8) == [999, 879, 759, 639, 499, 379, 259, 139]
    # diffusers' LCMScheduler ignores timestep_spacing="trailing" (a quirk the Flash model cards rely on)
    for spacing in ("leading", "trailing"):
        sch = LCMScheduler.from_config(config(timestep_spacing=spacing))
        for n in (1, 2, 3, 4, 8, 25, 50):
            sch.set_timesteps(n)
            assert S.lcm_timesteps(s, n) == sch.timesteps.tolist()
    with pytest.raises(ValueError):
        S.lcm_timesteps(s, 51)


@pytest.mark.parametrize("prediction_type", S.PREDICTION_TYPES)
def test_add_noise_pred_x0_pred_eps_velocity(prediction_type):
    s = S.NoiseSchedule.from_config(config(prediction_type=prediction_type))
    ref = DDPMScheduler.from_config(config(prediction_type=prediction_type))
    x0, eps = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    t = torch.tensor([0, 499, 999])
    x_t = s.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, ref.add_noise(x0, eps, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(s.velocity(x0, eps, t), ref.get_velocity(x0, eps, t), rtol=0, atol=1e-6)
    out = eps if prediction_type == "epsilon" else s.velocity(x0, eps, t)
    torch.testing.assert_close(s.pred_eps(x_t, out, t), eps, rtol=1e-4, atol=1e-4)
    # pred_x0 at t = 499 via int and via tensor (t = 999 amplifies error by 1/sqrt(abar) = 15)
    torch.testing.assert_close(s.pred_x0(x_t[1:2], out[1:2], 499), x0[1:2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.pred_x0(x_t, out, t), x0, rtol=2e-4, atol=2e-4)
    with pytest.raises(ValueError):
        s.abar(1000)


def test_cfg_and_boundary_scalings():
    c, u = torch.randn(4), torch.randn(4)
    torch.testing.assert_close(S.cfg(c, u, 7.5), 7.5 * c + (1 - 7.5) * u)
    torch.testing.assert_close(S.cfg(c, u, 1.0), c)
    assert torch.equal(S.cfg(c, u, 0.0), u)
    sch = LCMScheduler.from_config(SD15)
    for t in (0, 1, 10, 139, 249, 999):
        ours = S.boundary_scalings(t)
        assert ours == pytest.approx(sch.get_scalings_for_boundary_condition_discrete(t), rel=1e-12)
    assert S.boundary_scalings(249)[0] < 1e-7
    c_skip, c_out = S.boundary_scalings(torch.tensor([0, 999]))
    assert c_skip.tolist()[0] == 1.0 and c_out.tolist()[0] == 0.0


# ---------------------------------------------------------------------------------------------------
# Samplers against diffusers


@pytest.mark.parametrize("prediction_type", S.PREDICTION_TYPES)
@pytest.mark.parametrize("spacing", S.SPACINGS)
@pytest.mark.parametrize("name,solver", [("ddim", "ddim"), ("euler", "euler"), ("dpm++2m", "dpm")])
def test_samplers_match_diffusers(name, solver, spacing, prediction_type, noise):
    s = S.NoiseSchedule.from_config(config(timestep_spacing=spacing, prediction_type=prediction_type))
    for steps in (1, 4, 25):
        ours = S.sample(name, fake_model, noise, steps, s)
        ref = run_diffusers(diffusers_scheduler(solver, timestep_spacing=spacing,
                                                prediction_type=prediction_type), noise, steps)
        close(ours, ref)
        assert ours.dtype == noise.dtype and torch.isfinite(ours).all()


def test_ddim_eta_with_generator_matches_diffusers(noise):
    s = S.NoiseSchedule.from_config(SD15)
    ours = S.sample("ddim", fake_model, noise, 10, s, generator=torch.Generator().manual_seed(3), eta=0.7)
    ref = run_diffusers(diffusers_scheduler("ddim"), noise, 10, generator=torch.Generator().manual_seed(3),
                        eta=0.7)
    close(ours, ref)
    det = S.sample("ddim", fake_model, noise, 10, s)
    assert (ours - det).abs().max() > 1e-2                    # the noise did something


def test_ddim_clip_sample(noise):
    s = S.NoiseSchedule.from_config(config(clip_sample=True, clip_sample_range=0.5))
    ref = run_diffusers(diffusers_scheduler("ddim", clip_sample=True, clip_sample_range=0.5), noise, 10)
    close(S.sample("ddim", fake_model, noise, 10, s), ref)


@pytest.mark.parametrize("prediction_type", S.PREDICTION_TYPES)
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_and_flash_match_lcmscheduler(steps, prediction_type, noise):
    s = S.NoiseSchedule.from_config(config(prediction_type=prediction_type))
    sch = LCMScheduler.from_config(config(prediction_type=prediction_type))
    ours = S.sample("lcm", fake_model, noise, steps, s, generator=torch.Generator().manual_seed(5))
    ref = run_diffusers(sch, noise, steps, generator=torch.Generator().manual_seed(5))
    close(ours, ref)
    if steps in (1, 2, 4):      # Flash: LCMScheduler with custom timesteps = the trained modes
        ours = S.sample("flash", fake_model, noise, steps, s, generator=torch.Generator().manual_seed(5))
        ref = run_diffusers(sch, noise, generator=torch.Generator().manual_seed(5),
                            custom=S.flash_timesteps(steps))
        close(ours, ref)


def test_lcm_fresh_noise_and_generator_list(noise):
    """Re-noising draws fresh noise each step (one seed -> one result, another seed -> another) and a
    list of generators draws per sample, as diffusers' randn_tensor."""
    s = S.NoiseSchedule.from_config(SD15)
    a = S.sample("flash", fake_model, noise, 4, s, generator=torch.Generator().manual_seed(0))
    b = S.sample("flash", fake_model, noise, 4, s, generator=torch.Generator().manual_seed(0))
    c = S.sample("flash", fake_model, noise, 4, s, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)]
    ours = S.sample("lcm", fake_model, noise, 4, s, generator=gens)
    ref = run_diffusers(LCMScheduler.from_config(SD15), noise, 4,
                        generator=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)])
    close(ours, ref)
    # one step: no re-noising at all, the result is the boundary-form x0 at t = 999
    one = S.sample("flash", fake_model, noise, 1, s)
    torch.testing.assert_close(one, s.pred_x0(noise, fake_model(noise, 999), 999), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# DPM-Solver++ 2M: mid-grid start and hand-computed update


@pytest.mark.parametrize("prediction_type", S.PREDICTION_TYPES)
@pytest.mark.parametrize("start", [0, 5, 24, 30, 31])
def test_dpmpp_2m_from_the_middle_of_the_grid(start, prediction_type, noise):
    """The Flash teacher: from x_t at GRID32[start] over the rest of the grid down to sigma 0."""
    s = S.NoiseSchedule.from_config(config(prediction_type=prediction_type))
    ours = S.sample_dpmpp_2m(fake_model, noise, GRID32[start:], s)
    kw = {"timestep_spacing": "trailing", "prediction_type": prediction_type}
    custom = run_diffusers(diffusers_scheduler("dpm", **kw), noise, custom=GRID32[start:])
    close(ours, custom)
    # the same as the full trailing 32-step scheduler started at index `start`
    sch = diffusers_scheduler("dpm", **kw)
    sch.set_timesteps(32)
    sch.set_begin_index(start)
    x = noise.clone()
    for t in sch.timesteps[start:]:
        x = sch.step(fake_model(x, t.item()), t, x).prev_sample
    close(ours, x)


def test_dpmpp_2m_hand_computed():
    """Three steps written out with alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha/sigma)
    (a different route from the sampler's EDM sigmas), constant-but-step-dependent eps."""
    s = S.NoiseSchedule.from_config(SD15)
    ts = [999, 499, 249]
    eps = {999: 0.3, 499: -0.2, 249: 0.1}
    a = {t: float(s.alphas_cumprod[t]) for t in ts}
    al = {t: math.sqrt(a[t]) for t in ts}
    si = {t: math.sqrt(1 - a[t]) for t in ts}
    lam = {t: math.log(al[t] / si[t]) for t in ts}
    x = 1.2
    p0 = (x - si[999] * eps[999]) / al[999]                              # x0 predictions
    x = si[499] / si[999] * x - al[499] * (math.exp(-(lam[499] - lam[999])) - 1) * p0   # first order
    p1 = (x - si[499] * eps[499]) / al[499]
    h, h0 = lam[249] - lam[499], lam[499] - lam[999]
    D = (1 + h / (2 * h0)) * p1 - h / (2 * h0) * p0                       # r = h0 / h
    x = si[249] / si[499] * x - al[249] * (math.exp(-h) - 1) * D         # second order
    expected = (x - si[249] * eps[249]) / al[249]                         # last step to sigma 0 -> x0
    out = S.sample_dpmpp_2m(lambda x, t: torch.full_like(x, eps[t]), torch.tensor([1.2]), ts, s)
    assert out.item() == pytest.approx(expected, rel=1e-5)


def test_sample_rejects_bad_arguments(noise):
    s = S.NoiseSchedule.from_config(SD15)
    with pytest.raises(ValueError, match="unknown sampler"):
        S.sample("heun", fake_model, noise, 4, s)
    with pytest.raises(ValueError, match="steps"):
        S.sample("ddim", fake_model, noise, 0, s)


def test_euler_init_sigma_quirk():
    """diffusers scales Euler's initial noise by sigma_max for trailing/linspace, sqrt(sigma^2+1) for
    leading; `sample` copies that so a seed gives diffusers' image."""
    for spacing, exact in (("leading", True), ("trailing", False), ("linspace", False)):
        sch = diffusers_scheduler("euler", timestep_spacing=spacing)
        sch.set_timesteps(10)
        s = S.NoiseSchedule.from_config(config(timestep_spacing=spacing))
        s0 = S.sigmas_at(s, S.timesteps(s, 10, solver="euler")[:1])[0]
        want = math.sqrt(s0 ** 2 + 1) if exact else s0
        assert float(sch.init_noise_sigma) == pytest.approx(want, rel=1e-6)
        assert np.allclose(sch.sigmas[:-1].numpy(), S.sigmas_at(s, S.timesteps(s, 10, solver="euler")))
