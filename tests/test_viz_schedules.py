"viz.schedules: the numbers behind every figure, against diffusers, scipy, scikit-image and torch.distributions; the explorer driven headless."
import math

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from scipy import stats
from skimage.metrics import peak_signal_noise_ratio

from diffsr_kit.viz.schedules import (ScheduleExplorer, forward_grid_data, histogram_data, kl_between, plot_forward_grid,
                                      plot_histogram, plot_kl_between, plot_schedules, plot_x0_psnr, plot_xT_gap,
                                      sample_images, schedule_comparison_figure, schedule_curves, schedule_explorer,
                                      x0_psnr_curve, xT_gap)

diffusers = pytest.importorskip('diffusers')
from diffusers import DDPMScheduler  # noqa: E402


@pytest.fixture(scope='module')
def img():
    return sample_images(32)['astronaut']


@pytest.fixture(autouse=True)
def _close_figs():
    yield
    plt.close('all')


def _to01(x):  # [-1, 1] NCHW tensor -> HWC [0, 1] array (the kit's convention, written out independently)
    return ((x[0].permute(1, 2, 0).double().numpy() + 1) / 2).clip(0, 1)


def test_schedule_curves_match_diffusers():
    d = schedule_curves(['linear', 'cosine'], 1000)
    for ours, theirs in [('linear', 'linear'), ('cosine', 'squaredcos_cap_v2')]:
        ac = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs).alphas_cumprod.double().numpy()
        np.testing.assert_allclose(d[ours]['abar'], ac, atol=1e-6)
        keep = (ac > 1e-3) & (ac < 0.999)  # where float32 abar resolves log SNR to 1e-3
        np.testing.assert_allclose(d[ours]['log_snr'][keep], np.log(ac / (1 - ac))[keep], atol=1e-3)
        np.testing.assert_allclose(d[ours]['t_frac'], np.arange(1, 1001) / 1000)
    per = schedule_curves(['vp', 'sr3_linear'], None)
    assert per['vp']['T'] == 4 and per['sr3_linear']['T'] == 2000
    assert schedule_curves(['vp', 'cosine'], {'vp': 8})['cosine']['T'] == 1000
    with pytest.raises(KeyError, match='choose from'): schedule_curves(['cosin'])


def test_plotted_numbers_are_the_returned_numbers():
    names = ['linear', 'cosine', 'vp']
    fig, d = plot_schedules(names, {'vp': 4})
    assert len(fig.data) == 3 * len(names)
    for tr in fig.data:
        n = tr.legendgroup
        key = {'x': 'abar', 'x2': 'beta', 'x3': 'log_snr'}[tr.xaxis]
        np.testing.assert_allclose(np.asarray(tr.y, float), d[n][key])
        np.testing.assert_allclose(np.asarray(tr.x, float), d[n]['t_frac'])
        assert 't=%{customdata}' in tr.hovertemplate
    assert fig.layout.yaxis2.type == 'log'
    f = schedule_comparison_figure(names, 1000)
    assert isinstance(f, matplotlib.figure.Figure) and len(f.axes) == 3
    ref = schedule_curves(names, 1000)
    for line, n in zip(f.axes[0].lines, names):
        np.testing.assert_allclose(line.get_ydata(), ref[n]['abar'])


def test_forward_grid_matches_diffusers_add_noise(img):
    d = forward_grid_data(img, ['linear', 'cosine'], 1000, (0.0, 0.5, 1.0), seed=3)
    assert d['images'].shape == (2, 3, 32, 32, 3) and d['t'].tolist() == [[0, 500, 999]] * 2
    x0 = torch.from_numpy(img).permute(2, 0, 1)[None] * 2 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    for r, theirs in enumerate(['linear', 'squaredcos_cap_v2']):
        sch = DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs)
        for c, t in enumerate([0, 500, 999]):
            ref = _to01(sch.add_noise(x0, eps, torch.tensor([t])))
            np.testing.assert_allclose(d['images'][r, c], ref, atol=1e-5)  # add_noise's float32 1 - abar, see test_schedules
            assert abs(d['psnr'][r, c] - peak_signal_noise_ratio(img.astype(np.float64), d['images'][r, c].astype(np.float64), data_range=1)) < 1e-6
            assert abs(d['abar'][r, c] - sch.alphas_cumprod[t].item()) < 1e-6
    fig, d2 = plot_forward_grid(img, ['vp'], None, (0.0, 1.0))
    assert d2['t'].tolist() == [[0, 3]] and len(fig.axes) == 2


def test_histogram_against_numpy_and_scipy():
    g = np.random.default_rng(0)
    v = g.normal(0.5, 1.0, 400_000)
    d = histogram_data(torch.from_numpy(v), bins=80, lim=6.0)
    inside = np.abs(v) < 6
    ref, _ = np.histogram(v[inside], d['edges'])
    # interior bins equal numpy's counts / (n * width); end bins also collect the clipped tails
    np.testing.assert_allclose(d['density'][1:-1], ref[1:-1] / (v.size * np.diff(d['edges'])[1:-1]))
    q = np.diff(stats.norm.cdf(d['edges']))
    np.testing.assert_allclose(d['normal'][1:-1], q[1:-1] / np.diff(d['edges'])[1:-1], rtol=1e-9)
    # TV between N(0.5, 1) and N(0, 1) is 2 Phi(0.25) - 1; binning and sampling make it slightly smaller
    tv_true = 2 * stats.norm.cdf(0.25) - 1
    assert abs(d['tv'] - tv_true) < 0.01
    assert abs(d['mean'] - 0.5) < 0.01 and abs(d['std'] - 1) < 0.01
    fig, d2 = plot_histogram(torch.from_numpy(v), bins=40)
    np.testing.assert_allclose(np.asarray(fig.data[0].y, float), d2['density'])


def test_xT_gap_against_diffusers_and_torch_kl(img):
    Ts = (100, 1000, 5000)
    g = xT_gap(img, Ts, 'linear', scale_to_T=True, seed=1)
    x0 = torch.from_numpy(img).double() * 2 - 1
    for i, T in enumerate(Ts):
        # improved-DDPM scaling: beta range times 1000 / T
        s = DDPMScheduler(num_train_timesteps=T, beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T)
        a = float(torch.cumprod(1 - s.betas.double(), 0)[-1])
        assert abs(g['abar_T'][i] - a) / a < 1e-4
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(math.sqrt(a) * x0, math.sqrt(1 - a)),
                                               torch.distributions.Normal(0.0, 1.0)).mean().item()
        assert abs(g['kl_per_dim'][i] - kl) < 1e-3 * kl
        assert abs(g['mean_expected'][i] - math.sqrt(a) * x0.mean().item()) < 1e-9
    n = img.size
    np.testing.assert_allclose(g['se'], 1 / math.sqrt(n))
    # single draws: the pixel mean is within 5 standard errors of its expectation, the std within 5 SE of a variance
    assert np.all(np.abs(g['mean'] - g['mean_expected']) < 5 / math.sqrt(n))
    assert np.all(np.abs(g['noise_mean']) < 5 / math.sqrt(n))
    assert np.all(np.abs(g['std'] - g['std_expected']) < 5 * math.sqrt(2 / n))
    un = xT_gap(img, (100, 1000), 'linear', scale_to_T=False)
    a100 = float(DDPMScheduler(num_train_timesteps=100).alphas_cumprod[-1])
    assert abs(un['abar_T'][0] - a100) < 1e-5 and un['abar_T'][0] > 0.3
    fig, data = plot_xT_gap(img, Ts, ['linear', 'cosine'])
    assert set(data) == {'linear', 'cosine'} and len(fig.axes) == 3


def test_kl_between_against_torch_distributions(img):
    other = sample_images(32)['chelsea']
    d = kl_between(img, other, 'cosine', 200)
    a_t = torch.from_numpy(img).double() * 2 - 1
    b_t = torch.from_numpy(other).double() * 2 - 1
    ac = DDPMScheduler(num_train_timesteps=200, beta_schedule='squaredcos_cap_v2').alphas_cumprod.double()
    for t in (0, 50, 150, 199):
        a = ac[t]
        p = torch.distributions.Normal(a.sqrt() * a_t, (1 - a).sqrt())
        q = torch.distributions.Normal(a.sqrt() * b_t, (1 - a).sqrt())
        ref = torch.distributions.kl_divergence(p, q).sum().item()
        assert abs(d['kl_total'][t] - ref) < 2e-3 * ref + 1e-9  # float32 abar near t = 0 (1 - abar ~ 1e-4)
        assert abs(d['kl_per_dim'][t] - ref / img.size) < 2e-3 * ref / img.size + 1e-12
    with pytest.raises(ValueError, match='same shape'): kl_between(img, other[:16])
    fig, data = plot_kl_between(img, other, ['linear', 'vp'], {'vp': 4})
    assert len(data['vp']['kl_total']) == 4


def test_x0_psnr_follows_the_error_formula(img):
    d = x0_psnr_curve(img, 'linear', 1000, eps_error=0.05, n_t=40, seed=2)
    # PSNR = 10 log10(4 SNR / sigma^2) where clipping to [0, 1] is rare (error std in [0, 1] units < 0.02)
    ok = 0.5 * 0.05 / np.sqrt(d['abar'] / (1 - d['abar'])) < 0.02
    assert ok.sum() >= 3
    snr = d['abar'] / (1 - d['abar'])
    np.testing.assert_allclose(d['psnr'][ok], 10 * np.log10(4 * snr[ok] / 0.05 ** 2), atol=0.5)
    np.testing.assert_allclose(d['psnr_expected'], 10 * np.log10(4 * snr / 0.05 ** 2), rtol=1e-4)  # abar stored float32
    assert d['t_lost'] is not None and d['psnr'][d['t'] < d['t_lost']].min() >= 20 > d['psnr'][d['t'] == d['t_lost']][0]
    # with the exact noise in float64 nothing is lost
    exact = x0_psnr_curve(img, 'cosine', 1000, eps_error=0.0, n_t=10, dtype=torch.float64)
    assert exact['t_lost'] is None and exact['psnr'].min() > 150
    # PSNR itself against scikit-image, recomputed for one step
    sch = DDPMScheduler(num_train_timesteps=1000)
    one = x0_psnr_curve(img, 'linear', 1000, eps_error=0.05, n_t=2, seed=5)
    g = torch.Generator().manual_seed(5)
    x0 = torch.from_numpy(img).permute(2, 0, 1)[None] * 2 - 1
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64).float()
    err = torch.randn(x0.shape, generator=g, dtype=torch.float64).float() * 0.05
    a = sch.alphas_cumprod[0].double()
    xt = a.sqrt() * x0.double() + (1 - a).sqrt() * eps.double()
    x0_hat = (xt - (1 - a).sqrt() * (eps + err).double()) / a.sqrt()
    ref = peak_signal_noise_ratio(img.astype(np.float64), _to01(x0_hat), data_range=1)
    assert abs(one['psnr'][0] - ref) < 0.05
    fig, data = plot_x0_psnr(img, ['linear', 'cosine'], 1000, (0.0, 0.1), n_t=12)
    assert data['cosine'][0.1]['t_lost'] > data['linear'][0.1]['t_lost']


def test_explorer_driven_headless():
    imgs = sample_images(24, ('astronaut', 'camera'))
    ex = schedule_explorer(imgs, ['linear', 'cosine', 'vp'], name='cosine', T=200, t=10, figure_widget=False)
    assert isinstance(ex, ScheduleExplorer)
    d0 = ex.last
    assert (d0['name'], d0['T'], d0['t'], d0['image_name']) == ('cosine', 200, 10, 'astronaut')
    # the shown x_t is q(x_t | x0) with the explorer's fixed noise, checked against diffusers
    x0 = torch.from_numpy(imgs['astronaut']).permute(2, 0, 1)[None] * 2 - 1
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    ref = DDPMScheduler(num_train_timesteps=200, beta_schedule='squaredcos_cap_v2').add_noise(x0, eps, torch.tensor([10]))
    np.testing.assert_allclose(d0['image'], _to01(ref), atol=1e-5)
    fig_img = np.asarray(ex.fig.data[0].z)
    assert fig_img.shape == (24, 24, 3) and fig_img.dtype == np.uint8

    ex.t.value = 150
    d1 = ex.last
    assert d1['t'] == 150 and not np.allclose(d1['image'], d0['image']) and d1['abar_t'] < d0['abar_t']
    assert d1['hist']['tv'] < d0['hist']['tv']
    np.testing.assert_allclose(d1['curves']['abar'], d0['curves']['abar'])  # same schedule, same curve

    ex.schedule.value = 'linear'
    d2 = ex.last
    assert not np.allclose(d2['curves']['abar'], d1['curves']['abar'])
    lin = DDPMScheduler(num_train_timesteps=200).alphas_cumprod.numpy()
    np.testing.assert_allclose(d2['curves']['abar'], lin, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ex.fig.data[3].y, float), d2['curves']['abar'])

    ex.T.value = 4  # t follows T down
    assert ex.t.max == 3 and ex.last['t'] == 3 and ex.last['T'] == 4 and len(ex.last['curves']['abar']) == 4

    ex.image.value = 'camera'
    assert ex.last['image_name'] == 'camera'
    cam = ex.last['image']
    ex.image.value = 'astronaut'
    assert not np.allclose(cam, ex.last['image'])


def test_explorer_figure_widget_when_anywidget_is_installed():
    pytest.importorskip('anywidget')
    ex = schedule_explorer(sample_images(16, ('camera',)), ['cosine'], T=50, t=5, figure_widget=True)
    z0 = np.asarray(ex.fw.data[0].z).copy()
    ex.t.value = 45
    assert ex.fig is ex.fw and not np.array_equal(z0, np.asarray(ex.fw.data[0].z))
