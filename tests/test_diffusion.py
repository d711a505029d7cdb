"""diffusion: parameterisations, residual mode, simple and hybrid losses, checked against independent references
(diffusers' get_velocity, PIL's bicubic resize, torch.distributions, scipy's normal CDF, torch.nn.functional losses)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import stats

from diffusers import DDPMScheduler
from diffsr_kit.diffusion import (DECODERS, LOSSES, PARAMETERISATIONS, Diffusion, DiffusionConfig,
                                  discretized_gaussian_log_likelihood, from_residual, normal_kl, p_mean_variance,
                                  to_residual, upsample_lr)
from diffsr_kit.schedules import get_schedule

G = lambda seed: torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- parameterisations
def _round_trip(schedule, param, dtype, t):
    s = get_schedule(schedule, 1000)
    x0 = (torch.rand(len(t), 2, 3, 3, generator=G(0), dtype=torch.float64) * 2 - 1).to(dtype)
    eps = torch.randn(len(t), 2, 3, 3, generator=G(1), dtype=torch.float64).to(dtype)
    xt = s.q_sample(x0, t, eps)
    p = PARAMETERISATIONS[param]
    px0, peps = p.to_x0_eps(s, p.target(s, x0, eps, t), xt, t)
    return (px0 - x0).abs().max().item(), (peps - eps).abs().max().item()


@pytest.mark.parametrize('param', ['eps', 'x0', 'v'])
@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_parameterisation_round_trip(param, schedule):
    "target(x0, eps) read back through to_x0_eps gives x0 and eps again at every t (float64 data: 1e-5)."
    assert max(_round_trip(schedule, param, torch.float64, torch.arange(1000))) < 1e-5


@pytest.mark.parametrize('param', ['eps', 'x0', 'v'])
@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_parameterisation_round_trip_float32(param, schedule):
    """The same in float32 wherever sqrt(abar_t) > 0.1 (1e-5). Beyond that, reading x0 from eps divides float32
    rounding by sqrt(abar_t) (cosine t = 999: ~2e-3), which is inherent to eps-prediction, not an error."""
    s = get_schedule(schedule, 1000)
    t = torch.arange(1000)[s.sqrt_abar > 0.1]
    assert max(_round_trip(schedule, param, torch.float32, t)) < 1e-5


def test_v_target_matches_diffusers_get_velocity():
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule='squaredcos_cap_v2')
    ref.alphas_cumprod = torch.cumprod(1 - ref.betas.double(), 0)  # float64 reference (see test_samplers._float64)
    s = get_schedule('cosine', 1000)
    t = torch.tensor([0, 1, 10, 250, 500, 999])
    x0 = torch.rand(6, 3, 4, 4, generator=G(4)) * 2 - 1
    eps = torch.randn(6, 3, 4, 4, generator=G(5))
    want = ref.get_velocity(x0.double(), eps.double(), t).float()
    assert torch.allclose(PARAMETERISATIONS['v'].target(s, x0, eps, t), want, atol=1e-5)


# ---------------------------------------------------------------- residual (SR4 eq. 9)
def test_residual_uses_pil_bicubic_and_round_trips():
    lr = torch.rand(2, 3, 8, 10, generator=G(6)) * 2 - 1
    hr = torch.rand(2, 3, 32, 40, generator=G(7)) * 2 - 1
    pil_up = np.stack([np.stack([np.asarray(Image.fromarray(lr[n, c].numpy(), mode='F').resize((40, 32), Image.BICUBIC))
                                 for c in range(3)]) for n in range(2)])
    r = to_residual(hr, lr)
    assert np.abs(r.numpy() - (hr.numpy() - pil_up)).max() < 1e-5  # Up = PIL-style bicubic
    assert torch.allclose(from_residual(r, lr), hr, atol=1e-6)
    with pytest.raises(ValueError, match='must agree'):
        to_residual(hr, lr[:1])
    with pytest.raises(ValueError, match='4-D'):
        upsample_lr(lr[0], (32, 40))


def test_residual_training_noises_the_residual():
    "With residual=True and x0-prediction the target is HR - Up(LR) and x_t is built from it."
    d = Diffusion(schedule='linear', T=50, residual=True, param='x0')
    hr = torch.rand(3, 1, 16, 16, generator=G(8)) * 2 - 1
    lr = torch.rand(3, 1, 4, 4, generator=G(9)) * 2 - 1
    eps = torch.randn(3, 1, 16, 16, generator=G(10))
    t = torch.tensor([0, 20, 49])
    calls = {}
    def model(xt, tt, lr=None):
        calls['lr'] = lr
        return torch.zeros_like(xt)
    out = d.training_losses(model, hr, t=t, eps=eps, lr=lr)
    r0 = hr - torch.from_numpy(np.stack([np.asarray(Image.fromarray(lr[n, 0].numpy(), mode='F').resize((16, 16), Image.BICUBIC))
                                         for n in range(3)]))[:, None]
    assert torch.allclose(out['target'], r0, atol=1e-5)
    ab = d.schedule.abar[t].view(-1, 1, 1, 1)
    assert torch.allclose(out['xt'], ab.sqrt() * r0 + (1 - ab).sqrt() * eps, atol=1e-5)
    assert calls['lr'] is lr  # conditioning reaches the network
    assert torch.allclose(out['pred_hr'], out['pred_x0'] + (hr - r0), atol=1e-5)
    with pytest.raises(ValueError, match='needs the LR image'):
        d.training_losses(model, hr)


# ---------------------------------------------------------------- simple losses
@pytest.mark.parametrize('loss,ref', [('l2', F.mse_loss), ('l1', F.l1_loss), ('smooth_l1', F.smooth_l1_loss)])
@pytest.mark.parametrize('param', ['eps', 'x0', 'v'])
def test_simple_loss_per_sample(loss, ref, param):
    d = Diffusion(schedule='cosine', T=100, loss=loss, param=param)
    x0 = torch.rand(4, 2, 5, 5, generator=G(11)) * 2 - 1
    eps = torch.randn(4, 2, 5, 5, generator=G(12))
    t = torch.tensor([0, 3, 50, 99])
    out = torch.randn(4, 2, 5, 5, generator=G(13)) * 2
    r = d.training_losses(lambda xt, tt: out, x0, t=t, eps=eps)
    ab = d.schedule.abar.double()[t].view(-1, 1, 1, 1)
    target = {'eps': eps, 'x0': x0, 'v': (ab.sqrt() * eps - (1 - ab).sqrt() * x0).float()}[param]
    want = torch.stack([ref(out[i], target[i]) for i in range(4)])
    assert torch.allclose(r['simple'], want, atol=1e-5)
    assert torch.allclose(r['loss'], want.mean(), atol=1e-5)
    assert 'vlb' not in r


def test_t_is_uniform_when_not_given():
    "20k draws of t over T = 10: chi-square goodness of fit to the uniform law, p > 1e-3."
    d = Diffusion(schedule='linear', T=10)
    x0 = torch.zeros(20_000, 1, 1, 1)
    r = d.training_losses(lambda xt, t: xt, x0, generator=G(14))
    counts = torch.bincount(r['t'], minlength=10).numpy()
    assert r['t'].min() >= 0 and r['t'].max() <= 9
    assert stats.chisquare(counts).pvalue > 1e-3
    r2 = d.training_losses(lambda xt, t: xt, x0[:8], generator=G(15))
    r3 = d.training_losses(lambda xt, t: xt, x0[:8], generator=G(15))
    assert torch.equal(r2['t'], r3['t']) and torch.equal(r2['xt'], r3['xt'])


# ---------------------------------------------------------------- KL and the discretised decoder
def test_normal_kl_matches_torch_distributions():
    m1, m2 = torch.randn(100, generator=G(16)), torch.randn(100, generator=G(17))
    lv1, lv2 = torch.randn(100, generator=G(18)) * 2, torch.randn(100, generator=G(19)) * 2
    N = torch.distributions.Normal
    want = torch.distributions.kl_divergence(N(m1, (0.5 * lv1).exp()), N(m2, (0.5 * lv2).exp()))
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('mean,std', [(0.0, 0.1), (0.37, 0.02), (-0.98, 0.5), (0.999, 0.004), (0.2, 3.0)])
def test_discretized_gaussian_probabilities(mean, std):
    "The 256 bin probabilities of one pixel sum to 1 and equal the normal CDF differences (scipy), tails at the ends."
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(std)))
    p = logp.exp().numpy()
    assert abs(p.sum() - 1) < 1e-4  # bins whose mass is below the 1e-12 clamp add at most 256e-12
    edges = np.concatenate([[-np.inf], np.linspace(-1, 1, 256)[:-1] + 1 / 255, [np.inf]])
    want = np.diff(stats.norm.cdf(edges, mean, std))
    assert np.allclose(p, np.maximum(want, 1e-12), atol=1e-7, rtol=1e-4)


# ---------------------------------------------------------------- the hybrid loss (SR4 eq. 8)
def _abar64(s):
    "abar in float64 from the betas: 1 - abar from the stored float32 abar would lose ~1e-3 relative at t = 1."
    return torch.cumprod(1 - s.betas.double(), 0)


def _posterior(s, x0, xt, t):
    "q(x_{t-1} | x_t, x0) written from SR4 eq. 4-5 in float64."
    abar = _abar64(s)
    ab, a = abar[t].view(-1, 1, 1, 1), 1 - s.betas.double()[t].view(-1, 1, 1, 1)
    abp = torch.where(t > 0, abar[(t - 1).clamp(min=0)], torch.ones(len(t), dtype=torch.float64)).view(-1, 1, 1, 1)
    mean = abp.sqrt() * (1 - a) / (1 - ab) * x0.double() + a.sqrt() * (1 - abp) / (1 - ab) * xt.double()
    return mean, (1 - abp) / (1 - ab) * (1 - a)


def test_hybrid_loss_kl_term_and_decoder_term():
    d = Diffusion(schedule='cosine', T=1000, learn_sigma=True, vlb_weight=0.001)
    s = d.schedule
    n = 6
    x0 = torch.randint(0, 256, (n, 3, 4, 4), generator=G(20)).float() / 127.5 - 1  # 8-bit data
    eps = torch.randn(n, 3, 4, 4, generator=G(21))
    t = torch.tensor([0, 0, 1, 7, 400, 999])
    eps_hat = eps + 0.3 * torch.randn(n, 3, 4, 4, generator=G(22))
    v = torch.rand(n, 3, 4, 4, generator=G(23)) * 2 - 1
    r = d.training_losses(lambda xt, tt: torch.cat([eps_hat, v], 1), x0, t=t, eps=eps)
    xt = r['xt'].double()
    # the model's Gaussian, written independently: mean from thesis eq. 3.15, log-variance interpolated (SR4 eq. 8)
    b, ab = s.betas.double()[t].view(-1, 1, 1, 1), _abar64(s)[t].view(-1, 1, 1, 1)
    a = 1 - b
    mu = (xt - b / (1 - ab).sqrt() * eps_hat.double()) / a.sqrt()
    _, bt = _posterior(s, x0, xt, t)
    log_bt = torch.where(t.view(-1, 1, 1, 1) > 0, bt.clamp(min=1e-30).log(), _posterior(s, x0, xt, torch.ones_like(t))[1].log())
    frac = (v.double() + 1) / 2
    logvar = frac * b.log() + (1 - frac) * log_bt
    N = torch.distributions.Normal
    qm, qv = _posterior(s, x0, xt, t)
    for i in range(n):
        if t[i] > 0:  # L_t = KL(q || p) in bits per dimension
            kl = torch.distributions.kl_divergence(N(qm[i], qv[i].sqrt()), N(mu[i], (0.5 * logvar[i]).exp()))
            want = kl.mean() / math.log(2)
        else:  # L_0 = -log p(x0 | x1) over the 256 bins, scipy CDF
            xs, m, sd = x0[i].double().numpy(), mu[i].numpy(), (0.5 * logvar[i]).exp().numpy()
            hi = np.where(xs > 1 - 1 / 255, 1.0, stats.norm.cdf(xs + 1 / 255, m, sd))
            lo = np.where(xs < -1 + 1 / 255, 0.0, stats.norm.cdf(xs - 1 / 255, m, sd))
            want = -np.log(np.maximum(hi - lo, 1e-12)).mean() / math.log(2)
        assert abs(r['vlb'][i].item() - float(want)) < 1e-4 * max(1.0, abs(float(want)))
    want_simple = ((eps_hat - eps) ** 2).mean((1, 2, 3))
    assert torch.allclose(r['simple'], want_simple, atol=1e-6)
    # L_hybrid = L_simple + lambda L_vlb with L_vlb estimated as T * L_t from one uniform t (improved DDPM)
    assert torch.allclose(r['loss'], (want_simple + 0.001 * 1000 * r['vlb']).mean(), atol=1e-6)


def test_hybrid_loss_stop_gradient_on_mean():
    d = Diffusion(schedule='cosine', T=100, learn_sigma=True)
    out = torch.randn(3, 4, 4, 4, generator=G(24), requires_grad=True)
    r = d.training_losses(lambda xt, t: out, torch.rand(3, 2, 4, 4, generator=G(25)) * 2 - 1, t=torch.tensor([0, 5, 60]))
    r['vlb'].sum().backward()
    assert out.grad[:, :2].abs().max() == 0  # L_vlb does not train the mean
    assert out.grad[:, 2:].abs().max() > 0  # it trains the variance
    out.grad = None
    r = d.training_losses(lambda xt, t: out, torch.rand(3, 2, 4, 4, generator=G(25)) * 2 - 1, t=torch.tensor([0, 5, 60]))
    r['simple'].sum().backward()
    assert out.grad[:, 2:].abs().max() == 0 and out.grad[:, :2].abs().max() > 0  # L_simple trains only the mean


def test_gaussian_decoder_for_latents():
    "decoder='gaussian': the t = 0 term is the continuous Gaussian NLL (scipy logpdf)."
    d = Diffusion(schedule='linear', T=10, learn_sigma=True, decoder='gaussian', param='x0', clip_x0=False)
    x0 = torch.randn(2, 1, 3, 3, generator=G(26)) * 1.5
    out = torch.cat([x0 + 0.1, torch.zeros_like(x0)], 1)  # mean x0 + 0.1, v = 0 (midway in log domain)
    r = d.training_losses(lambda xt, t: out, x0, t=torch.tensor([0, 0]))
    logvar = p_mean_variance(d.schedule, out, r['xt'], torch.tensor([0, 0]), 'x0')['logvar']
    want = -stats.norm.logpdf(x0.numpy(), (x0 + 0.1).numpy(), (0.5 * logvar).exp().numpy()).mean((1, 2, 3)) / math.log(2)
    assert np.allclose(r['vlb'].numpy(), want, atol=1e-4)
    assert set(DECODERS) == {'discrete', 'gaussian'}


# ---------------------------------------------------------------- p_mean_variance and config
def test_p_mean_variance_learned_logvar_matches_diffusers():
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule='linear', variance_type='learned_range')
    ref.alphas_cumprod = torch.cumprod(1 - ref.betas.double(), 0)
    s = get_schedule('linear', 1000)
    for t in (1, 2, 100, 999):
        v = torch.rand(1, 3, 2, 2, generator=G(t)) * 2 - 1
        xt = torch.randn(1, 3, 2, 2, generator=G(t + 1))
        pm = p_mean_variance(s, torch.cat([torch.zeros_like(xt), v], 1), xt, t)
        want = ref._get_variance(t, predicted_variance=v.double()).float()
        assert torch.allclose(pm['logvar'], want, atol=1e-5, rtol=1e-5)


def test_clip_only_for_pixel_chains():
    s_out = torch.full((1, 1, 2, 2), 5.0)  # x0-prediction far outside [-1, 1]
    xt = torch.zeros(1, 1, 2, 2)
    assert Diffusion(param='x0').p_mean_variance(s_out, xt, 10)['pred_x0'].max() == 1
    assert Diffusion(param='x0', residual=True).p_mean_variance(s_out, xt, 10)['pred_x0'].max() == 5
    assert Diffusion(param='x0', clip_x0=False).p_mean_variance(s_out, xt, 10)['pred_x0'].max() == 5


def test_config_and_errors():
    assert DiffusionConfig().vlb_weight == 0.001 and set(LOSSES) == {'l2', 'l1', 'smooth_l1'}
    assert set(PARAMETERISATIONS) == {'eps', 'x0', 'v'}
    d = Diffusion(DiffusionConfig(schedule='linear', T=20), param='v')
    assert d.T == 20 and d.cfg.param == 'v' and d.cfg.schedule == 'linear'
    with pytest.raises(KeyError, match='DiffusionConfig.loss'):
        Diffusion(loss='huber')
    with pytest.raises(TypeError, match='Unknown DiffusionConfig field'):
        Diffusion(lamda=0.1)
    x0 = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ValueError, match='learn_sigma=True'):
        Diffusion(T=10, schedule='linear').training_losses(lambda xt, t: torch.cat([xt, xt], 1), x0)
    with pytest.raises(ValueError, match='learn_sigma=False'):
        Diffusion(T=10, schedule='linear', learn_sigma=True).training_losses(lambda xt, t: xt, x0)
    with pytest.raises(ValueError, match='out_ch=3'):
        Diffusion(T=10, schedule='linear').training_losses(lambda xt, t: xt[:, :1], x0)
