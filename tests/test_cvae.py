"""LDDPM conditioner (eq. 8-12): KL against torch.distributions, reparameterisation statistics, seeded prior sampling,
each ablation switch, the flow NLL against an autograd-Jacobian density, and the ctx tokens driving a UNet."""
import math
import pytest
import torch
import torch.nn as nn
from torch.distributions import Normal, kl_divergence

from diffsr_kit.models.cvae import (LREncoder, CVAEBranch, LDDPMConditioner, LDDPMCondConfig, ABLATIONS, ablation_config,
                                    kl_normal, reparameterize)
from diffsr_kit.models.layers import count_params
from diffsr_kit.models.unet import UNet, UNetConfig

torch.set_num_threads(1)
TINY = dict(scale=4, enc_ch=8, n_down=1, n_blocks=1, ctx_ch=16, z_ch=4, cvae_hidden=8, glow_hidden=16)


def images(n=2, seed=0, lr_side=16, scale=4):
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(n, 3, lr_side * scale, lr_side * scale, generator=g) * 2 - 1
    return torch.nn.functional.avg_pool2d(hr, scale), hr     # LR = area-downsampled HR


def gen(s): return torch.Generator().manual_seed(s)


def make(name, seed=0, **kw):
    torch.manual_seed(seed)
    return LDDPMConditioner(ablation_config(name, **{**TINY, **kw}))


# ---------------------------------------------------------------- KL and reparameterisation
def test_kl_normal_matches_torch_distributions():
    g = gen(0)
    mq, lq, mp, lp = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(4))
    ref = kl_divergence(Normal(mq, torch.exp(0.5 * lq)), Normal(mp, torch.exp(0.5 * lp)))
    torch.testing.assert_close(kl_normal(mq, lq, mp, lp), ref, atol=1e-5, rtol=1e-5)
    # eq. 11 (prior N(0, I)) written out as in the paper
    eq11 = 0.5 * (-(lq + 1).sum() + torch.exp(lq).sum() + (mq ** 2).sum())
    torch.testing.assert_close(kl_normal(mq, lq, torch.zeros_like(mq), torch.zeros_like(lq)).sum(), eq11, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize('learned_prior', [True, False])
def test_cvae_branch_kl_is_kl_of_its_two_normals(learned_prior):
    torch.manual_seed(0)
    cv = CVAEBranch(8, z_ch=4, hidden=8, hr_factor=8, learned_prior=learned_prior)
    if learned_prior:  # the prior's last conv starts at zero (= N(0, I)); give it weights so p is a real conditional
        nn.init.normal_(cv.prior_net[-1].weight, std=0.1)
    feat, hr = torch.randn(2, 8, 4, 4), torch.rand(2, 3, 32, 32) * 2 - 1
    o = cv(feat, hr, generator=gen(1))
    (mq, lq), (mp, lp) = o.post, o.prior
    ref = kl_divergence(Normal(mq, torch.exp(0.5 * lq)), Normal(mp, torch.exp(0.5 * lp))).mean()
    torch.testing.assert_close(o.kl, ref, atol=1e-6, rtol=1e-5)
    if not learned_prior:
        assert mp.abs().max() == 0 and lp.abs().max() == 0
        torch.testing.assert_close(o.kl, kl_divergence(Normal(mq, torch.exp(0.5 * lq)), Normal(0., 1.)).mean(), atol=1e-6, rtol=1e-5)
    else:
        assert mp.abs().max() > 0
    assert o.kl > 0
    # the posterior depends on HR, the prior does not
    o2 = cv(feat, -hr, generator=gen(1))
    assert (o2.post[0] - mq).abs().max() > 1e-4
    torch.testing.assert_close(o2.prior[0], mp)


def test_reparameterize_has_the_right_distribution():
    "Z = mu + delta * sigma (eq. 10): empirical mean / std over 40000 draws within 5 standard errors."
    mu, logvar = torch.tensor([1.5, -2.0]), torch.tensor([math.log(0.25), math.log(4.0)])
    n = 40000
    z = reparameterize(mu.expand(n, 2), logvar.expand(n, 2), gen(0))
    sd = torch.exp(0.5 * logvar)
    assert ((z.mean(0) - mu).abs() < 5 * sd / math.sqrt(n)).all(), z.mean(0)
    assert ((z.std(0) - sd).abs() < 5 * sd / math.sqrt(2 * n)).all(), z.std(0)
    assert torch.equal(reparameterize(mu, logvar, gen(3)), reparameterize(mu, logvar, gen(3)))
    assert torch.equal(reparameterize(mu, logvar, gen(3), temperature=0.0), mu)


# ---------------------------------------------------------------- sampling
def test_prior_sampling_is_seeded_and_posterior_uses_hr():
    m = make('V3+Glow').eval()
    lr, hr = images()
    with torch.no_grad():
        a, aux = m(lr, generator=gen(0))
        b, _ = m(lr, generator=gen(0))
        c, _ = m(lr, generator=gen(1))
        t0 = [m(lr, generator=gen(s), temperature=0.0)[0] for s in (2, 3)]
        p1, auxp = m(lr, hr, generator=gen(0))
        p2, _ = m(lr, -hr, generator=gen(0))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4
    torch.testing.assert_close(t0[0], t0[1], atol=1e-6, rtol=0)   # temperature 0: the prior mean, any seed
    assert aux['kl'].item() == 0.0 and auxp['kl'].item() > 0      # no posterior, no KL
    assert (p1 - p2).abs().max() > 1e-4                            # training path: ctx depends on HR


# ---------------------------------------------------------------- ablation switches
def test_ablation_switches_do_what_the_table_says():
    lr, hr = images()
    v1, v2, v3, v3g = (make(n) for n in ('V1', 'V2', 'V3', 'V3+Glow'))
    # V1: nothing at all; the U-Net is built with ctx_ch=0
    ctx, aux = v1(lr, hr)
    assert ctx is None and count_params(v1) == 0 and v1.cfg.unet_ctx_ch == 0
    assert aux['kl'].item() == 0 and aux['flow_nll'].item() == 0
    # V2: tau_theta only; deterministic, ignores HR and the seed, no KL, no flow
    assert v2.cvae is None and v2.glow is None and count_params(v2) == count_params(v2.encoder)
    c1, aux = v2(lr, hr, generator=gen(0))
    c2, _ = v2(lr, None, generator=gen(1))
    assert torch.equal(c1, c2) and aux['kl'].item() == 0 and aux['flow_nll'].item() == 0
    assert c1.shape == (2, 8 * 8, TINY['ctx_ch'])
    # V3: + CVAE parameters, KL > 0 with HR, stochastic ctx, still no flow
    assert v3.cvae is not None and v3.glow is None
    assert count_params(v3) == count_params(v3.encoder) + count_params(v3.cvae)
    c1, aux = v3(lr, hr, generator=gen(0))
    c2, _ = v3(lr, hr, generator=gen(1))
    assert aux['kl'].item() > 0 and aux['flow_nll'].item() == 0 and (c1 - c2).abs().max() > 1e-5
    # V3+Glow: + exactly the Glow's parameters, a flow NLL, and ctx = tokens of the Glow latent instead of F_g
    assert count_params(v3g) - count_params(v3) == count_params(v3g.glow) > 0
    with torch.no_grad():
        d = v3g.encode(lr, hr, generator=gen(0))
        assert d['flow_nll'].item() != 0 and torch.isfinite(d['flow_nll'])
        torch.testing.assert_close(d['ctx'], v3g.encoder.tokens(d['u']))
        assert (d['ctx'] - v3g.encoder.tokens(d['F_g'])).abs().max() > 1e-4
        torch.testing.assert_close(d['cvae'].fused, d['cvae'].F_mu + d['cvae'].F_sigma * d['cvae'].F_R)


def test_fused_features_follow_eq_10_11():
    "F_g = F_mu + F_sigma * F_R: the mean/variance maps come from F_X alone, F_R from the latent draw."
    m = make('V3')
    lr, _ = images()
    with torch.no_grad():
        o1 = m.encode(lr, generator=gen(0))['cvae']
        o2 = m.encode(lr, generator=gen(1))['cvae']
    torch.testing.assert_close(o1.F_mu, o2.F_mu); torch.testing.assert_close(o1.F_sigma, o2.F_sigma)
    assert (o1.F_R - o2.F_R).abs().max() > 1e-5
    assert (o1.F_sigma > 0).all()


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match='attention=True'):
        LDDPMCondConfig(attention=False, cvae=True).check()
    with pytest.raises(ValueError, match='attention=True'):
        LDDPMConditioner(LDDPMCondConfig(attention=False, cvae=False, glow=True))
    with pytest.raises(ValueError, match='Unknown ablation'):
        ablation_config('V4')
    with pytest.raises(ValueError, match='glow_scale'):
        LDDPMCondConfig(glow_scale='exp').check()
    m = make('V3+Glow')
    with pytest.raises(ValueError, match='divisible by 16'):
        m(torch.randn(1, 3, 24, 24))
    lr, hr = images(n=1)
    with pytest.raises(ValueError, match='scale'):
        m(lr, hr[..., :32, :32])
    with pytest.raises(ValueError, match=r'\(N, 3, h, w\)'):
        LREncoder(3)(torch.randn(1, 1, 8, 8))
    assert set(ABLATIONS) == {'V1', 'V2', 'V3', 'V3+Glow'}


# ---------------------------------------------------------------- the flow term
def test_flow_nll_is_the_eq12_density_of_the_fused_features():
    """flow_nll = -(log N(u; mu(F_X), sigma(F_X)) + log|det du/dF_g|) / (D ln 2), with the log-determinant from the
    autograd Jacobian of the Glow (float64) and the Gaussian from torch.distributions."""
    m = make('V3+Glow', enc_ch=4).double()
    with torch.no_grad():  # give the zero-initialised couplings and base a real effect
        for p in m.glow.parameters():
            if p.abs().max() == 0: p.normal_(std=0.05)
    lr, hr = images(n=1)
    lr, hr = lr.double(), hr.double()
    with torch.no_grad():
        m(images(n=32, seed=5)[0].double(), generator=gen(9))  # ActNorm init on a batch of 32 (1x1 maps at level 3)
        d = m.encode(lr, hr, generator=gen(0))
    F_g, F_X = d['F_g'], d['F_X']
    shape = F_g.shape
    J = torch.autograd.functional.jacobian(lambda v: m.glow(v.reshape(shape), F_X)[0].reshape(-1), F_g.reshape(-1))
    mean, logvar = m.glow.prior(F_X).chunk(2, dim=1)   # base at F_X's own size (the Glow's input size)
    assert mean.abs().max() > 0
    logp = Normal(mean, torch.exp(0.5 * logvar)).log_prob(d['u']).sum() + torch.linalg.slogdet(J)[1]
    ref = -logp / (F_g.numel() * math.log(2))
    torch.testing.assert_close(d['flow_nll'], ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize('detach', [True, False])
def test_flow_detach_keeps_the_nll_off_the_features(detach):
    m = make('V3+Glow', flow_detach=detach)
    lr, hr = images()
    m(lr, hr)  # ActNorm init
    _, aux = m(lr, hr, generator=gen(0))
    feat_params = list(m.cvae.decoder.parameters()) + list(m.cvae.stats.parameters())  # produce F_g, not used by the flow's cond
    grads = torch.autograd.grad(aux['flow_nll'], feat_params + list(m.glow.parameters()), allow_unused=True)
    gf = sum(0 if g is None else g.abs().sum().item() for g in grads[:len(feat_params)])
    gg = sum(0 if g is None else g.abs().sum().item() for g in grads[len(feat_params):])
    assert gg > 0
    assert (gf == 0) if detach else (gf > 0), gf


# ---------------------------------------------------------------- into the U-Net
@pytest.mark.parametrize('name', list(ABLATIONS))
def test_ctx_plugs_into_unet_and_drives_it(name):
    cond = make(name)
    lr, hr = images()
    torch.manual_seed(1)
    unet = UNet(UNetConfig(base_ch=8, ch_mult=(1, 2), n_res=1, attn_res=(), heads=2, image_size=64,
                           ctx_ch=cond.cfg.unet_ctx_ch))
    with torch.no_grad():  # wake the zero-initialised output conv and cross-attention projection
        for p in unet.parameters():
            if p.abs().max() == 0: p.normal_(std=0.05)
    xt, t = torch.randn(2, 3, 64, 64, generator=gen(2)), torch.tensor([5, 900])
    ctx, aux = cond(lr, hr, generator=gen(0))
    y = unet(xt, t, lr, ctx=ctx)
    assert y.shape == xt.shape
    if name == 'V1':
        assert ctx is None and unet.mid_xattn is None
        return
    # same x_t, t and LR for the U-Net; only ctx comes from another LR image -> another prediction
    ctx_other, _ = cond(lr.flip(-1), hr.flip(-1), generator=gen(0))
    assert (unet(xt, t, lr, ctx=ctx_other) - y).abs().max() > 1e-4
    # the diffusion loss reaches tau_theta, the CVAE posterior and the Glow
    loss = y.pow(2).mean() + aux['kl'] + aux['flow_nll']
    loss.backward()
    assert cond.encoder.body[0].weight.grad.abs().max() > 0
    if cond.cvae is not None: assert cond.cvae.post_net[0].weight.grad.abs().max() > 0
    if cond.glow is not None: assert cond.glow.levels[0][0].invconv.log_s.grad.abs().max() > 0
