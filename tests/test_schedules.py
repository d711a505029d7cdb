"Noise schedules against independent references: diffusers' DDPM/DDIM schedulers, scipy, closed forms and Monte Carlo."
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from diffsr_kit.schedules import SCHEDULES, SPACINGS, Schedule, extract, get_schedule

diffusers = pytest.importorskip('diffusers')  # dev/test dependency only
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

# (our name, diffusers beta_schedule); diffusers at its defaults beta_start=1e-4, beta_end=0.02
DIFFUSERS_NAMES = [('linear', 'linear'), ('cosine', 'squaredcos_cap_v2'), ('sigmoid', 'sigmoid')]
# every registered schedule at the T its source uses, plus the VP schedule at larger T and the cosine at few steps
ALL = [(n, SCHEDULES[n].default_T) for n in SCHEDULES] + [('vp', 1), ('vp', 16), ('vp', 1000), ('cosine', 4), ('linear', 50)]


@pytest.mark.parametrize('ours,theirs', DIFFUSERS_NAMES)
@pytest.mark.parametrize('T', [1000, 50])
def test_matches_diffusers_ddpm(ours, theirs, T):
    s = get_schedule(ours, T)
    d = DDPMScheduler(num_train_timesteps=T, beta_schedule=theirs, variance_type='fixed_small', clip_sample=False)
    # 1e-6 absolute (the bar); diffusers accumulates abar in float32, we in float64
    torch.testing.assert_close(s.betas, d.betas, atol=1e-6, rtol=0)
    torch.testing.assert_close(s.abar, d.alphas_cumprod, atol=1e-6, rtol=0)
    var = torch.stack([d._get_variance(t) for t in range(T)])  # 'fixed_small': beta~_t, clamped at 1e-20
    torch.testing.assert_close(s.posterior_variance, var, atol=1e-6, rtol=0)
    # q_sample == add_noise, per-sample timesteps
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 3, 6, 6, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, T, (8,), generator=g)
    ours = s.q_sample(x0, t, eps)
    # diffusers forms 1 - abar from a float32 abar, which near t = 0 (1 - abar ~ 1e-4) keeps ~3 digits: 1e-5 here
    torch.testing.assert_close(ours, d.add_noise(x0, eps, t), atol=1e-5, rtol=0)
    # against a float64 reference built from diffusers' betas, ours is within 1e-6
    a64 = torch.cumprod(1 - d.betas.double(), 0)[t].reshape(-1, 1, 1, 1)
    ref = a64.sqrt() * x0.double() + (1 - a64).sqrt() * eps.double()
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(s.v_from(x0, eps, t), d.get_velocity(x0, eps, t), atol=1e-5, rtol=0)  # same float32 caveat
    ref_v = a64.sqrt() * eps.double() - (1 - a64).sqrt() * x0.double()
    torch.testing.assert_close(s.v_from(x0, eps, t).double(), ref_v, atol=1e-6, rtol=0)


@pytest.mark.parametrize('ours,theirs', DIFFUSERS_NAMES)
def test_posterior_mean_coefs_match_diffusers_step(ours, theirs):
    "diffusers' DDPM step with prediction_type='sample' is mu~(x0, x_t) + noise; differences with the same seed cancel the noise."
    T = 100
    s = get_schedule(ours, T)
    d = DDPMScheduler(num_train_timesteps=T, beta_schedule=theirs, prediction_type='sample', clip_sample=False)
    x0, xt = torch.full((1, 1, 2, 2), 0.3), torch.full((1, 1, 2, 2), -0.7)
    one = torch.ones_like(x0)
    step = lambda m, x, t: d.step(m, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
    for t in [1, 10, 50, 99]:
        c1 = (step(x0 + one, xt, t) - step(x0, xt, t)).mean()  # coefficient of x0
        c2 = (step(x0, xt + one, t) - step(x0, xt, t)).mean()  # coefficient of x_t
        # diffusers divides by 1 - abar_t formed from a float32 abar (absolute error ~1e-7), so its coefficients
        # carry a relative error of about 1e-7 / (1 - abar_t); the coefficients are <= 1
        tol = 1e-5 + 5e-7 / (1 - d.alphas_cumprod[t].item())
        assert abs(c1 - s.posterior_mean_coef1[t]) < tol, (t, c1, s.posterior_mean_coef1[t])
        assert abs(c2 - s.posterior_mean_coef2[t]) < tol, (t, c2, s.posterior_mean_coef2[t])
        mean, var, logvar = s.q_posterior(x0, xt, torch.tensor([t]))
        torch.testing.assert_close(mean, c1 * x0 + c2 * xt, atol=2 * tol, rtol=0)


def test_quadratic_and_sr3_against_diffusers():
    # quadratic = diffusers' 'scaled_linear' rule (sqrt(beta) linear) with the DDPM range
    d = DDPMScheduler(num_train_timesteps=1000, beta_schedule='scaled_linear', beta_start=1e-4, beta_end=0.02)
    torch.testing.assert_close(get_schedule('quadratic', 1000).betas, d.betas, atol=1e-7, rtol=0)
    # SR3's linear 1e-6 -> 1e-2 at T = 2000
    d = DDPMScheduler(num_train_timesteps=2000, beta_schedule='linear', beta_start=1e-6, beta_end=1e-2)
    s = get_schedule('sr3_linear')
    assert s.T == 2000
    torch.testing.assert_close(s.abar, d.alphas_cumprod, atol=1e-6, rtol=0)


def test_vp_is_the_integrated_linear_sde():
    "abar_t must equal exp(-int_0^{t/T} beta(s) ds) with beta(s) = beta_min + s (beta_max - beta_min) (Song et al.), by scipy quadrature."
    bmin, bmax = 0.1, 20.0
    for T in (4, 10):
        s = get_schedule('vp', T)
        ref = [math.exp(-integrate.quad(lambda u: bmin + u * (bmax - bmin), 0, (i + 1) / T)[0]) for i in range(T)]
        np.testing.assert_allclose(s.abar.double().numpy(), ref, rtol=1e-6)  # float32 storage
    assert get_schedule('vp').T == 4  # the diffusion-GAN default (SRDDGAN Table 1)


def test_cosine_against_closed_form():
    "Nichol & Dhariwal: abar_t = f(t/T)/f(0), f = cos^2(((t/T)+s)/(1+s) pi/2), until the 0.999 clip bites at the last step."
    T, s_ = 1000, 0.008
    f = lambda u: math.cos((u + s_) / (1 + s_) * math.pi / 2) ** 2
    ref = np.array([f((i + 1) / T) / f(0) for i in range(T)])
    sch = get_schedule('cosine', T)
    np.testing.assert_allclose(sch.abar[:-1].double().numpy(), ref[:-1], atol=1e-7)
    assert abs(sch.betas[-1].item() - 0.999) < 1e-7


@pytest.mark.parametrize('name,T', ALL)
def test_basic_properties(name, T):
    s = get_schedule(name, T)
    assert s.T == T and all(getattr(s, k).dtype == torch.float32 for k in ('betas', 'abar', 'snr'))
    b = s.betas.double()
    assert bool((b > 0).all() and (b < 1).all())
    a = s.abar.double()
    assert bool((a > 0).all() and (a <= 1).all())
    assert bool((a[1:] < a[:-1]).all()), 'abar must be strictly decreasing'
    # derived quantities against their definitions (float32 storage: relative 1e-6)
    torch.testing.assert_close(s.abar.double(), torch.cumprod(1 - s.betas.double(), 0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.sqrt_abar ** 2 + s.sqrt_one_minus_abar ** 2, torch.ones(T), atol=1e-6, rtol=0)
    # references from the registry's float64 betas (a float32 abar cannot resolve 1 - abar near t = 0)
    a64 = torch.from_numpy(np.cumprod(1 - SCHEDULES[name](T)))
    torch.testing.assert_close(s.abar.double(), a64, rtol=1e-6, atol=0)
    torch.testing.assert_close(s.snr.double(), a64 / (1 - a64), rtol=1e-6, atol=0)
    torch.testing.assert_close(s.log_snr.double(), torch.log(a64 / (1 - a64)), rtol=0, atol=1e-5)
    torch.testing.assert_close(s.sqrt_one_minus_abar.double(), (1 - a64).sqrt(), rtol=1e-6, atol=0)
    assert bool((s.log_snr[1:] < s.log_snr[:-1]).all())


@pytest.mark.parametrize('name,T', ALL)
def test_conversions_round_trip(name, T):
    s = get_schedule(name, T)
    g = torch.Generator().manual_seed(3)
    n = min(T, 64)
    t = torch.linspace(0, T - 1, n).round().long()
    for dtype in (torch.float64, torch.float32):
        x0 = (torch.rand(n, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64).to(dtype)
        xt = s.q_sample(x0, t, eps)
        v = s.v_from(x0, eps, t)
        # v <-> x0 / eps are rotations: well conditioned at every t, also in float32
        torch.testing.assert_close(s.x0_from_v(xt, t, v), x0, atol=1e-5, rtol=0)
        torch.testing.assert_close(s.eps_from_v(xt, t, v), eps, atol=1e-5, rtol=0)
        torch.testing.assert_close(s.v_from(s.x0_from_v(xt, t, v), s.eps_from_v(xt, t, v), t), v, atol=1e-5, rtol=0)
        # eps <-> x0 divides by sqrt(abar) or sqrt(1 - abar): float32 rounding of x_t (~1e-7) is amplified by up to
        # 1/sqrt(1e-2) = 10, so float32 is checked where 0.01 <= abar <= 0.99; float64 everywhere
        keep = torch.ones(n, dtype=torch.bool) if dtype == torch.float64 else (s.abar[t] >= 0.01) & (s.abar[t] <= 0.99)
        if keep.any():
            k = keep
            torch.testing.assert_close(s.pred_x0_from_eps(xt[k], t[k], eps[k]), x0[k], atol=1e-5, rtol=0)
            torch.testing.assert_close(s.pred_eps_from_x0(xt[k], t[k], x0[k]), eps[k], atol=1e-5, rtol=0)
            torch.testing.assert_close(s.pred_eps_from_x0(xt[k], t[k], s.pred_x0_from_eps(xt[k], t[k], eps[k])), eps[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize('name,T', ALL)
def test_iterated_chain_matches_closed_form(name, T):
    """Iterate x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps (thesis eq. 3.1-3.2, written here from the betas alone)
    and compare the sample mean and variance with q(x_t | x0) = N(sqrt(abar_t) x0, 1 - abar_t) (thesis eq. 3.7).
    Tolerance: 5 standard errors (mean: sqrt(var / N); variance: var * sqrt(2 / (N - 1)))."""
    s = get_schedule(name, T)
    N = 4000
    x0 = torch.tensor([-1.0, 0.0, 0.6], dtype=torch.float64).repeat_interleave(N)
    g = torch.Generator().manual_seed(7)
    checks = sorted({0, T // 4, T // 2, T - 1})
    betas = torch.from_numpy(SCHEDULES[name](T))  # float64 betas straight from the registry
    x = x0.clone()
    for i in range(T):
        x = torch.sqrt(1 - betas[i]) * x + torch.sqrt(betas[i]) * torch.randn(x.shape, generator=g, dtype=torch.float64)
        if i in checks:
            a = s.abar[i].double()
            for j, v0 in enumerate((-1.0, 0.0, 0.6)):
                xs = x[j * N:(j + 1) * N]
                m, var = math.sqrt(a) * v0, 1 - a.item()
                assert abs(xs.mean().item() - m) < 5 * math.sqrt(var / N), (i, v0, xs.mean().item(), m)
                assert abs(xs.var().item() - var) < 5 * var * math.sqrt(2 / (N - 1)), (i, v0, xs.var().item(), var)
    # and the package's own one-step function agrees with the formula above
    x_prev = torch.linspace(-1, 1, 7, dtype=torch.float64)
    e = torch.randn(7, generator=g, dtype=torch.float64)
    i = T - 1
    torch.testing.assert_close(s.q_step(x_prev, i, e), torch.sqrt(1 - betas[i]) * x_prev + torch.sqrt(betas[i]) * e,
                               atol=1e-6, rtol=0)  # float32-stored coefficients


@pytest.mark.parametrize('name,T', [('linear', 1000), ('cosine', 1000), ('vp', 4), ('sr3_linear', 2000)])
def test_posterior_by_regression(name, T):
    """q(x_{t-1} | x_t, x0) from samples: with x0 fixed, regress x_{t-1} on x_t; the slope is posterior_mean_coef2,
    the intercept coef1 * x0, the residual variance beta~_t (SRDDGAN eq. 17-18 with sqrt(alpha_t), CG-DPM eq. 6).
    Tolerance: 5 standard errors of the least-squares estimates."""
    s = get_schedule(name, T)
    n, x0v = 200_000, 0.5
    g = torch.Generator().manual_seed(11)
    for i in sorted({1, T // 2, T - 1}):
        a_prev = s.abar_prev[i].double()
        x_prev = a_prev.sqrt() * x0v + (1 - a_prev).sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
        b = s.betas[i].double()
        x_t = (1 - b).sqrt() * x_prev + b.sqrt() * torch.randn(n, generator=g, dtype=torch.float64)
        res = stats.linregress(x_t.numpy(), x_prev.numpy())
        resid = x_prev.numpy() - (res.intercept + res.slope * x_t.numpy())
        rv = resid.var()
        assert abs(res.slope - s.posterior_mean_coef2[i].item()) < 5 * res.stderr + 1e-6
        assert abs(res.intercept - s.posterior_mean_coef1[i].item() * x0v) < 5 * res.intercept_stderr + 1e-6
        assert abs(rv - s.posterior_variance[i].item()) < 5 * rv * math.sqrt(2 / n) + 1e-9


@pytest.mark.parametrize('name,T', ALL)
@pytest.mark.parametrize('spacing', sorted(SPACINGS))
def test_respace_keeps_abar(name, T, spacing):
    s = get_schedule(name, T)
    for k in sorted({1, max(1, T // 3), max(1, T // 10), T}):
        r = s.respace(k, spacing)
        assert r.T == k and r.timesteps.shape == (k,)
        assert bool((r.timesteps[1:] > r.timesteps[:-1]).all())
        torch.testing.assert_close(r.abar, s.abar[r.timesteps], atol=0, rtol=0)
        # the child's own betas reproduce its abar
        torch.testing.assert_close(torch.cumprod(1 - r.betas.double(), 0), r.abar.double(), rtol=1e-5, atol=1e-7)
        # a respaced step can be huge (k = 1 on cosine: beta = 1 - 2e-9, which is 1.0 in float32), so check alpha > 0
        assert bool((r.betas > 0).all() and (r.alphas > 0).all())


@pytest.mark.parametrize('spacing', ['linspace', 'leading', 'trailing'])
@pytest.mark.parametrize('T,k', [(1000, 50), (1000, 7), (1000, 4), (2000, 100), (10, 3), (4, 4)])
def test_respace_timesteps_match_diffusers_ddim(spacing, T, k):
    d = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    d.set_timesteps(k)
    ours = get_schedule('linear', T).respace(k, spacing).timesteps
    assert sorted(d.timesteps.tolist()) == ours.tolist()


def test_respace_composes_and_rejects_bad_input():
    s = get_schedule('cosine', 1000)
    r = s.respace(100)
    rr = r.respace([0, 5, 99])
    assert rr.timesteps.tolist() == r.timesteps[[0, 5, 99]].tolist()
    torch.testing.assert_close(rr.abar, s.abar[rr.timesteps], atol=0, rtol=0)
    with pytest.raises(ValueError, match='between 1 and T'): s.respace(1001)
    with pytest.raises(ValueError, match='strictly increasing'): s.respace([3, 3])
    with pytest.raises(KeyError, match='choose one of'): s.respace(10, 'evenly')


def test_sample_gamma_is_uniform_within_each_step():
    "SR3: t uniform over the steps, then gamma uniform between abar_t and abar_{t-1}; checked with chi-square and KS tests (scipy)."
    s = get_schedule('vp', 4)
    t, gam = s.sample_gamma(40_000, generator=torch.Generator().manual_seed(5))
    assert t.dtype == torch.long and gam.dtype == torch.float32
    counts = np.bincount(t.numpy(), minlength=4)
    assert stats.chisquare(counts).pvalue > 1e-4
    lo, hi = s.abar[t].double(), s.abar_prev[t].double()
    u = ((gam.double() - lo) / (hi - lo)).numpy()
    assert u.min() >= -1e-4 and u.max() <= 1 + 1e-4
    assert stats.kstest(u, 'uniform').pvalue > 1e-4
    # q_sample_gamma with gamma = abar_t is q_sample
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    e = torch.randn(x0.shape)
    ti = torch.tensor([0, 2, 3])
    torch.testing.assert_close(s.q_sample_gamma(x0, s.abar[ti], e), s.q_sample(x0, ti, e), atol=1e-6, rtol=0)


def test_extract_and_errors():
    s = get_schedule('linear', 10)
    out = extract(s.abar, torch.tensor([0, 9, 3]), (3, 2, 5, 5))
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == [s.abar[0].item(), s.abar[9].item(), s.abar[3].item()]
    with pytest.raises(IndexError, match='valid 0..9'): extract(s.abar, 10, (1, 1))
    with pytest.raises(TypeError, match='integers'): extract(s.abar, torch.tensor([0.5]), (1, 1))
    with pytest.raises(KeyError, match='Choose one of'): get_schedule('cosin')
    with pytest.raises(ValueError, match='strictly between 0 and 1'): get_schedule('linear', 10, beta_end=2.0)
    with pytest.raises(ValueError, match='positive'): get_schedule('linear', 0)
    with pytest.raises(ValueError, match='strictly between 0 and 1'): Schedule.from_betas([0.1, 0.0])


def test_to_device_and_dtype_follow_input():
    s = get_schedule('cosine', 20).to('cpu')
    assert s.abar.device.type == 'cpu'
    x0 = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    assert s.q_sample(x0, 3, torch.ones_like(x0)).dtype == torch.float64
    if torch.cuda.is_available():
        sc = s.to('cuda')
        assert sc.abar.device.type == 'cuda' and sc.timesteps.device.type == 'cuda'
        xg = torch.zeros(2, 1, 3, 3, device='cuda')
        assert sc.q_sample(xg, torch.tensor([1, 2], device='cuda')).device.type == 'cuda'
