"""Samplers against independent references: diffusers' DDPMScheduler / DDIMScheduler steps, and a toy problem
whose exact denoiser and exact sampler output distribution are known in closed form."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from diffusers import DDIMScheduler, DDPMScheduler
from diffsr_kit.diffusion import Diffusion
from diffsr_kit.samplers import SAMPLERS, ddim_sample, ddim_step, ddpm_sample, ddpm_step, sample
from diffsr_kit.schedules import get_schedule

T = 1000
OURS = {'linear': 'linear', 'squaredcos_cap_v2': 'cosine'}  # diffusers beta_schedule -> our SCHEDULES key
PRED = {'epsilon': 'eps', 'v_prediction': 'v', 'sample': 'x0'}  # diffusers prediction_type -> our param
SHAPE = (2, 3, 4, 4)


def _inputs(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g) * 1.2, torch.randn(SHAPE, generator=g)  # x_t, model output


def _consistent_inputs(abar, prediction_type, seed):
    """x_t = sqrt(abar) x0 + sqrt(1-abar) eps and a slightly wrong network output (target + 0.1 noise).
    Realistic inputs keep the implied eps O(1); with unrelated random x_t and an x0-prediction, eps reaches ~50
    near t = 0 and magnifies float32 rounding of the respaced schedule's 1 - abar (respace forms it from float32
    abar) to ~4e-5, which is a schedule-precision effect rather than a property of the step."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    a, b = abar.double().sqrt(), (1 - abar.double()).sqrt()
    target = {'epsilon': eps, 'sample': x0, 'v_prediction': a * eps - b * x0}[prediction_type]
    return (a * x0 + b * eps).float(), (target + 0.1 * torch.randn(SHAPE, generator=g, dtype=torch.float64)).float()


def _float64(ref):
    """Evaluate diffusers' step in float64: its alphas_cumprod becomes the float64 cumprod of its own betas.
    In float32 diffusers forms beta_t = 1 - abar_t / abar_{t-1} and 1 - abar_t by cancellation, which costs ~1e-3
    relative at t = 1 (abar ~ 0.9999), i.e. up to 3e-4 in x_{t-1}; our schedule derives these in float64 and stores
    float32, so it is compared with the float64 evaluation. Inputs are passed to diffusers as float64 too."""
    ref.alphas_cumprod = torch.cumprod(1 - ref.betas.double(), 0)
    return ref


def _z64(seed):
    "The noise diffusers draws with a CPU generator and float64 inputs: torch.randn(shape, generator, dtype=float64)."
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(a, b, atol=1e-5, rtol=1e-5):
    "|a - b| <= atol + rtol |b| elementwise; the relative part covers pred_x0 at t near T, where 1/sqrt(abar) ~ 1e3-1e5."
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f'max abs diff {(a - b).abs().max().item():.3g}'


# ---------------------------------------------------------------- DDPM vs diffusers
@pytest.mark.parametrize('beta_schedule', ['linear', 'squaredcos_cap_v2'])
@pytest.mark.parametrize('variance_type', ['fixed_small', 'fixed_large'])
@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction', 'sample'])
@pytest.mark.parametrize('clip', [True, False])
def test_ddpm_step_matches_diffusers(beta_schedule, variance_type, prediction_type, clip):
    ref = _float64(DDPMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, variance_type=variance_type,
                                 prediction_type=prediction_type, clip_sample=clip))
    s = get_schedule(OURS[beta_schedule], T)
    assert torch.allclose(ref.betas, s.betas, atol=1e-8)  # the same betas
    var = {'fixed_small': 'small', 'fixed_large': 'large'}[variance_type]
    for k, t in enumerate([0, 1, 2, 37, 500, 998, 999]):
        xt, out = _inputs(k)
        # diffusers draws its noise from the generator it is given: give both sides the same draw
        want = ref.step(out.double(), t, xt.double(), generator=torch.Generator().manual_seed(100 + k))
        got = ddpm_step(s, out, xt, t, noise=_z64(100 + k).float(), var_type=var, param=PRED[prediction_type], clip_x0=clip)
        _close(got.prev, want.prev_sample.float())
        _close(got.pred_x0, want.pred_original_sample.float())


def test_ddpm_step_learned_range_matches_diffusers():
    "A 2C-channel output: the second half interpolates log beta and log beta~ (improved DDPM; SR4 eq. 8)."
    ref = _float64(DDPMScheduler(num_train_timesteps=T, beta_schedule='squaredcos_cap_v2', variance_type='learned_range', clip_sample=False))
    s = get_schedule('cosine', T)
    for k, t in enumerate([1, 5, 300, 999]):
        xt, out = _inputs(k)
        v = torch.rand(SHAPE, generator=torch.Generator().manual_seed(k)) * 2 - 1
        mo = torch.cat([out, v], 1)
        want = ref.step(mo.double(), t, xt.double(), generator=torch.Generator().manual_seed(k))
        _close(ddpm_step(s, mo, xt, t, noise=_z64(k).float()).prev, want.prev_sample.float())


@pytest.mark.parametrize('variance_type', ['fixed_small', 'fixed_large'])
def test_respaced_ddpm_step_matches_diffusers_custom_timesteps(variance_type):
    "Ancestral sampling on a respaced chain equals diffusers' DDPM with the same custom timesteps."
    ref = _float64(DDPMScheduler(num_train_timesteps=T, beta_schedule='linear', variance_type=variance_type, clip_sample=False))
    s = get_schedule('linear', T).respace(25)
    ref.set_timesteps(timesteps=s.timesteps.flip(0).tolist())
    for i in range(s.T):
        xt, out = _inputs(i)
        t = int(s.timesteps[i])
        want = ref.step(out.double(), t, xt.double(), generator=torch.Generator().manual_seed(i))
        _close(ddpm_step(s, out, xt, i, noise=_z64(i).float(), var_type=variance_type[6:]).prev, want.prev_sample.float())


# ---------------------------------------------------------------- DDIM vs diffusers
@pytest.mark.parametrize('beta_schedule', ['linear', 'squaredcos_cap_v2'])
@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction', 'sample'])
@pytest.mark.parametrize('eta', [0.0, 1.0])
@pytest.mark.parametrize('clip', [True, False])
@pytest.mark.parametrize('k', [50, 7])
def test_ddim_step_matches_diffusers(beta_schedule, prediction_type, eta, clip, k):
    # diffusers' DDIM steps from t to t - T//k; with timestep_spacing='leading', steps_offset=0 the kept steps
    # are 0, T//k, 2T//k, ... which is our schedule.respace(k, 'leading'); set_alpha_to_one=True makes the
    # last jump go to abar = 1, as our respaced abar_prev[0] = 1 does.
    ref = _float64(DDIMScheduler(num_train_timesteps=T, beta_schedule=beta_schedule, prediction_type=prediction_type,
                                 clip_sample=clip, set_alpha_to_one=True, steps_offset=0, timestep_spacing='leading'))
    ref.set_timesteps(k)
    s = get_schedule(OURS[beta_schedule], T).respace(k, 'leading')
    assert s.timesteps.flip(0).tolist() == ref.timesteps.tolist()
    for i in range(s.T - 1, -1, -1):
        xt, out = _consistent_inputs(ref.alphas_cumprod[int(s.timesteps[i])], prediction_type, i)
        z = _z64(1000 + i)
        want = ref.step(out.double(), int(s.timesteps[i]), xt.double(), eta=eta, variance_noise=z if eta > 0 else None)
        got = ddim_step(s, out, xt, i, eta=eta, noise=z.float(), param=PRED[prediction_type], clip_x0=clip)
        _close(got.prev, want.prev_sample.float())
        _close(got.pred_x0, want.pred_original_sample.float())


# ---------------------------------------------------------------- toy problems with known answers
MU, SD = 0.3, 0.2  # x0 ~ N(MU, SD^2)


def gaussian_eps(schedule):
    "E[eps | x_t] for x0 ~ N(MU, SD^2): Cov(eps, x_t) / Var(x_t) (x_t - a MU), a = sqrt(abar), b = sqrt(1-abar)."
    abar = schedule.abar.double()
    def model_fn(xt, t):
        ab = abar[t].view(-1, *([1] * (xt.ndim - 1)))
        a, b = ab.sqrt(), (1 - ab).sqrt()
        return (b / (a ** 2 * SD ** 2 + b ** 2) * (xt.double() - a * MU)).float()
    return model_fn


def exact_output(abar, sampler, var_type='small', eta=0.0):
    """Mean and std of the sample a chain with the exact Gaussian eps-predictor produces, by a float64 recursion.
    `abar`: float64 abar of the kept steps (all T, or a respaced subset). Every step is affine in x_t plus Gaussian
    noise, x' = A x + c + sigma z, so the law stays Gaussian and (m, v) -> (A m + c, A^2 v + sigma^2)."""
    m, v = 0.0, 1.0  # x_T ~ N(0, 1)
    for i in range(len(abar) - 1, -1, -1):
        ab, abp = abar[i], (abar[i - 1] if i > 0 else 1.0)
        beta = 1 - ab / abp  # the step's beta on this (possibly respaced) chain
        a, b = math.sqrt(ab), math.sqrt(1 - ab)
        k = b / (a * a * SD * SD + b * b)  # eps* = k (x - a MU)
        e1, e0 = k, -k * a * MU  # eps* = e1 x + e0
        p1, p0 = (1 - b * e1) / a, -b * e0 / a  # x0_hat = (x - b eps*) / a = p1 x + p0
        if sampler == 'ddpm':  # posterior mean at x0_hat (SR4 eq. 4), variance beta~ or beta
            c1, c2 = math.sqrt(abp) * beta / (1 - ab), math.sqrt(1 - beta) * (1 - abp) / (1 - ab)
            A, c = c1 * p1 + c2, c1 * p0
            sig2 = 0.0 if i == 0 else ((1 - abp) / (1 - ab) * beta if var_type == 'small' else beta)
        else:  # DDIM (Song et al. eq. 12)
            sig2 = eta ** 2 * (1 - abp) / (1 - ab) * beta
            d = math.sqrt(max(1 - abp - sig2, 0.0))
            A, c = math.sqrt(abp) * p1 + d * e1, math.sqrt(abp) * p0 + d * e0
        m, v = A * m + c, A * A * v + sig2
    return m, math.sqrt(v)


@pytest.mark.parametrize('name,schedule,kw', [
    ('ddpm', 'cosine', dict(var_type='small')), ('ddpm', 'cosine', dict(var_type='large')),
    ('ddpm', 'linear', dict(var_type='small')), ('ddpm', 'cosine', dict(var_type='small', steps=20)),
    ('ddim', 'cosine', dict(steps=None, eta=0.0)), ('ddim', 'cosine', dict(steps=20, eta=0.0)),
    ('ddim', 'cosine', dict(steps=20, eta=1.0)), ('ddim', 'linear', dict(steps=10, eta=0.5))])
def test_sampler_matches_exact_output_distribution(name, schedule, kw):
    "20k samples with the exact eps-predictor for x0 ~ N(0.3, 0.2^2) vs the closed-form law of the chain's output."
    d = Diffusion(schedule=schedule, T=100, clip_x0=False)
    n = 20_000
    x = sample(name, gaussian_eps(d.schedule), (n, 1, 1, 1), d, seed=0, progress=False, **kw).double().flatten()
    kept = d.schedule.respace(kw['steps']).timesteps.numpy() if kw.get('steps') else np.arange(100)
    abar = np.cumprod(1 - d.schedule.betas.double().numpy())[kept]
    m, sd = exact_output(abar, name, kw.get('var_type', 'small'), kw.get('eta', 0.0))
    # Monte-Carlo error only: 5 standard errors on the mean (sd/sqrt(n)) and on the std (sd/sqrt(2n)); KS at alpha = 1e-3
    assert abs(x.mean().item() - m) < 5 * sd / math.sqrt(n)
    assert abs(x.std().item() - sd) < 5 * sd / math.sqrt(2 * n)
    assert stats.kstest(x.numpy(), stats.norm(m, sd).cdf).pvalue > 1e-3
    if schedule == 'cosine' and not kw.get('steps'):
        # abar_T ~ 0 and all 100 steps: the output law is near the data law N(0.3, 0.2^2). Exact values: std 0.185
        # (DDPM beta~), 0.204 (DDPM beta), 0.193 (DDIM eta=0); on 20 respaced steps 0.152-0.172 (more under-dispersed)
        assert abs(m - MU) < 0.01 and abs(sd - SD) / SD < 0.1


GM = dict(means=np.array([-0.5, 0.6]), stds=np.array([0.15, 0.1]), weights=np.array([0.4, 0.6]))


def mixture_eps(schedule):
    "Exact E[eps | x_t] for Gaussian-mixture data, via the score: eps* = -sqrt(1 - abar) d/dx log p_t(x) (autograd)."
    abar = schedule.abar.double()
    mu, sd, w = (torch.tensor(GM[k]) for k in ('means', 'stds', 'weights'))
    def model_fn(xt, t):
        ab = abar[t].view(-1, *([1] * (xt.ndim - 1)))[..., None]
        with torch.enable_grad():
            x = xt.double().detach().requires_grad_(True)
            comp = torch.distributions.Normal(ab.sqrt() * mu, (ab * sd ** 2 + 1 - ab).sqrt())
            logp = torch.logsumexp(comp.log_prob(x[..., None]) + w.log(), -1)
            score, = torch.autograd.grad(logp.sum(), x)
        return (-(1 - ab[..., 0]).sqrt() * score).float()
    return model_fn


def mixture_cdf(x):
    return sum(w * stats.norm.cdf(x, m, s) for m, s, w in zip(GM['means'], GM['stds'], GM['weights']))


def test_ddpm_and_ddim_eta1_draw_the_data_distribution():
    "Cosine, T = 100, 20k samples each, exact mixture denoiser: DDPM (beta~) and DDIM eta=1 on all steps."
    d = Diffusion(schedule='cosine', T=100, clip_x0=False)
    f, n = mixture_eps(d.schedule), 20_000
    a = ddpm_sample(f, (n, 1, 1, 1), d, seed=1, progress=False).flatten().double().numpy()
    b = ddim_sample(f, (n, 1, 1, 1), d, steps=None, eta=1.0, seed=2, progress=False).flatten().double().numpy()
    w, mu, sd = GM['weights'], GM['means'], GM['stds']
    true_mean = (w * mu).sum()
    true_std = math.sqrt((w * (sd ** 2 + mu ** 2)).sum() - true_mean ** 2)
    for x in (a, b):
        # tolerances: MC error is ~0.004 (mean) and ~0.003 (std); beta~ at T = 100 is a known O(1/T) under-dispersion
        # (measured: std 0.546 vs 0.553, KS 0.022), so 0.02 on mean / std and 0.035 on the KS distance to the truth
        assert abs(x.mean() - true_mean) < 0.02 and abs(x.std() - true_std) < 0.02
        assert stats.kstest(x, mixture_cdf).statistic < 0.035
        assert abs((x > 0).mean() - 0.6) < 0.02  # mode weights
    # the two samplers take the same step on the full chain: their outputs must be indistinguishable
    assert stats.ks_2samp(a, b).pvalue > 1e-3
    assert abs(a.mean() - b.mean()) < 0.02 and abs(a.std() - b.std()) < 0.02


# ---------------------------------------------------------------- seeds, dispatcher, trajectory, guidance
def _toy():
    d = Diffusion(schedule='cosine', T=50, param='eps', clip_x0=True)
    return d, gaussian_eps(d.schedule)


@pytest.mark.parametrize('name,kw', [('ddpm', {}), ('ddim', dict(steps=10, eta=0.5)), ('ddpm', dict(steps=10))])
def test_seed_determinism(name, kw):
    d, f = _toy()
    a = sample(name, f, (4, 1, 3, 3), d, seed=11, progress=False, **kw)
    b = sample(name, f, (4, 1, 3, 3), d, seed=11, progress=False, **kw)
    c = sample(name, f, (4, 1, 3, 3), d, seed=12, progress=False, **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.shape == (4, 1, 3, 3)


def test_trajectory_and_registry():
    d, f = _toy()
    x, tr = ddim_sample(f, (3, 1, 2, 2), d, steps=5, seed=0, return_trajectory=True, progress=False)
    assert tr['xt'].shape == (6, 3, 1, 2, 2) and tr['pred_x0'].shape == (5, 3, 1, 2, 2)
    assert torch.equal(tr['xt'][-1], x)
    assert tr['t'].tolist() == d.schedule.respace(5).timesteps.flip(0).tolist()  # model called with parent steps, high to low
    assert set(SAMPLERS) == {'ddpm', 'ddim'}
    with pytest.raises(KeyError, match='one of'):
        sample('heun', f, (1, 1, 1, 1), d)


def test_x_T_and_device_come_from_inputs():
    d, f = _toy()
    xT = torch.randn(2, 1, 2, 2)
    a = ddim_sample(f, xT.shape, d, steps=5, x_T=xT, progress=False)
    b = ddim_sample(f, xT.shape, d, steps=5, x_T=xT, progress=False)
    assert torch.equal(a, b) and a.device == xT.device


@pytest.mark.parametrize('name,kw', [('ddpm', {}), ('ddim', dict(steps=10, eta=1.0)), ('ddim', dict(steps=10, eta=0.0))])
@pytest.mark.parametrize('param', ['eps', 'x0', 'v'])
def test_guidance_scale_zero_equals_unguided(name, kw, param):
    d = Diffusion(schedule='cosine', T=50, param=param)
    f = lambda xt, t: torch.tanh(xt) * 0.5 + t.view(-1, 1, 1, 1) * 1e-3  # any network
    guide = lambda xt, t: -xt * 3.0 + 1.0  # any score correction
    plain = sample(name, f, (3, 2, 4, 4), d, seed=5, progress=False, **kw)
    zero = sample(name, f, (3, 2, 4, 4), d, seed=5, progress=False, guidance=guide, guidance_scale=0.0, **kw)
    one = sample(name, f, (3, 2, 4, 4), d, seed=5, progress=False, guidance=guide, guidance_scale=1.0, **kw)
    assert torch.equal(plain, zero)
    assert not torch.allclose(plain, one)


def test_guided_ddpm_mean_shift_is_sigma_times_correction():
    "CG-DPM eq. 13: the guided mean is mu + s Sigma g (same noise, so the difference is exactly s Sigma g)."
    s = get_schedule('linear', T)
    xt, out = _inputs(0)
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    t = 400
    diff = ddpm_step(s, out, xt, t, noise=z, guidance=lambda x, tt: g, guidance_scale=2.0).prev - ddpm_step(s, out, xt, t, noise=z).prev
    beta_tilde = (1 - s.abar[t - 1].double()) / (1 - s.abar[t].double()) * s.betas[t].double()
    _close(diff, (2.0 * beta_tilde * g.double()).float(), atol=1e-6)


def test_guided_ddim_matches_cg_dpm_eq_14_15():
    "CG-DPM eq. 14-15 written out: eps_hat = eps - sqrt(1-abar) F; x_prev = sqrt(abar') x0(eps_hat) + sqrt(1-abar') eps_hat."
    s = get_schedule('cosine', T).respace(20)
    xt, eps = _inputs(1)
    F = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    i = 12
    ab, abp = s.abar[i].double(), s.abar_prev[i].double()
    eps_hat = eps.double() - (1 - ab).sqrt() * F.double()
    x0_hat = (xt.double() - (1 - ab).sqrt() * eps_hat) / ab.sqrt()
    want = abp.sqrt() * x0_hat + (1 - abp).sqrt() * eps_hat
    _close(ddim_step(s, eps, xt, i, guidance=lambda x, tt: F).prev, want.float())


def test_bad_inputs_raise_clear_errors():
    s = get_schedule('linear', 10)
    xt = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match='out_ch'):
        ddpm_step(s, torch.zeros(1, 5, 2, 2), xt, 3)
    with pytest.raises(ValueError, match='must return'):
        ddim_step(s, torch.zeros(1, 5, 2, 2), xt, 3)
    with pytest.raises(TypeError, match='Diffusion or a Schedule'):
        ddim_sample(lambda x, t: x, (1, 1, 1, 1), 'cosine')


def test_progress_bar_respects_tqdm_disable(monkeypatch, capsys):
    d, f = _toy()
    monkeypatch.setenv('TQDM_DISABLE', '1')
    ddim_sample(f, (1, 1, 1, 1), d, steps=5, seed=0, progress=True)
    assert 'DDIM' not in capsys.readouterr().err
    monkeypatch.delenv('TQDM_DISABLE')
    ddim_sample(f, (1, 1, 1, 1), d, steps=5, seed=0, progress=True)
    assert 'DDIM' in capsys.readouterr().err
    ddim_sample(f, (1, 1, 1, 1), d, steps=5, seed=0, progress=False)
    assert 'DDIM' not in capsys.readouterr().err


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_ddim_converges_to_the_probability_flow_ode_as_k_goes_to_T(schedule):
    """DDIM with the exact eps of Gaussian data is a first-order solver of the probability-flow ODE: at k = T it lands on
    the ODE's exact map x_T -> x0 (written here in closed form), and its error halves when k doubles (k = T/2 -> T)."""
    import math
    from diffsr_kit.samplers import ddim_sample, GaussianMixture1D, mixture_eps_model
    from diffsr_kit.schedules import get_schedule
    mu, s = 0.3, 0.2
    sch = get_schedule(schedule, 1000)
    fn = mixture_eps_model(sch, GaussianMixture1D(means=(mu,), stds=(s,), weights=(1.0,)))
    xT = torch.randn(1024, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    aT = math.sqrt(float(sch.abar.double()[-1]))
    # for N(mu, s^2) data every marginal is Gaussian and the ODE keeps each sample's standard score: the exact map
    exact = mu + s * (xT.double() - aT * mu) / math.sqrt(aT ** 2 * s ** 2 + 1 - aT ** 2)
    err = {k: float((ddim_sample(fn, xT.shape, sch, steps=k, x_T=xT, progress=False).double() - exact).abs().max())
           for k in (250, 500, 1000)}
    assert err[1000] < 0.01, err                                 # measured here: linear 0.0062, cosine 0.0031 (|x0| ~ 0.3)
    assert 1.7 < err[500] / err[1000] < 2.3 and 1.7 < err[250] / err[500] < 2.3, err  # first order: error ~ 1/k
