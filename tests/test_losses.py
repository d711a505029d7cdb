"Losses against independent references: finite differences for R1, explicit loops / numpy for content and style, math for GAN losses."
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from diffsr_kit.losses import (
    GAN_LOSSES, PERCEPTUAL_PRESETS, VGG19_FILE, LazyR1, PerceptualConfig, PerceptualLoss, VGGFeatures, content_loss,
    gram_matrix, instance_noise, load_vgg19_state, r1_penalty, style_loss_gram, style_loss_meanvar, vgg19_weights_file)
from diffsr_kit.metrics import MissingWeightsError
from diffsr_kit.models.ddgan import DiscConfig, Discriminator

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])  # torchvision's documented ImageNet statistics, written out here
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
SRDDGAN_LAYERS = {'relu1_2': 3, 'relu2_2': 8, 'relu3_3': 15, 'relu4_1': 20}  # indices in VGG-19 `features` (config E)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    return tmp_path


def feats(seed, shapes, dtype=torch.float64):
    "A dict of random 'feature maps' {name: (N, C, H, W)}."
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in shapes.items()}


# ---- R1 -----------------------------------------------------------------------------------------------

def fd_sq_grad_norms(f, x, h=1e-6):
    "Per-sample ||d f(x)_n / d x_n||^2 by central differences over every element (f returns (N,), no batch coupling)."
    flat = x.detach().clone().reshape(-1)
    g = torch.zeros_like(flat)
    with torch.no_grad():
        for e in range(flat.numel()):
            xp, xm = flat.clone(), flat.clone()
            xp[e] += h; xm[e] -= h
            g[e] = (f(xp.view_as(x)).sum() - f(xm.view_as(x)).sum()) / (2 * h)  # = d f_n / d x_e for e in sample n
    return g.view_as(x).pow(2).flatten(1).sum(1)


class SmoothD(nn.Module):
    "A tiny smooth discriminator: conv -> tanh -> conv -> softplus -> sum -> linear."
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.lin = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2), nn.Linear(4, 1)
    def forward(self, x):
        h = nn.functional.softplus(self.c2(torch.tanh(self.c1(x))))
        return self.lin(h.sum((2, 3))).squeeze(1)


@pytest.mark.parametrize('which', ['smooth', 'ddgan'])
def test_r1_penalty_matches_finite_differences(which):
    torch.manual_seed(0)
    gamma = 0.7
    if which == 'smooth':
        D = SmoothD().double()
        x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
        f = D
    else:  # the kit's time-conditioned discriminator, R1 w.r.t. the real y_{t-1} as in diffusion GANs
        D = Discriminator(DiscConfig(base_ch=4, ch_mult=(1, 2), t_dim=8)).double()
        x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
        xt, t = torch.randn_like(x), torch.tensor([1, 3])
        f = lambda a: D(a, xt, t)
    ref = gamma / 2 * fd_sq_grad_norms(f, x).mean()
    xr = x.clone().requires_grad_(True)
    r1 = r1_penalty(f(xr), xr, gamma=gamma)
    # float64 central differences with h = 1e-6: truncation ~1e-12, round-off ~1e-10 relative; 1e-6 leaves margin
    # (LeakyReLU kinks only matter if a pre-activation lies within ~1e-6 of 0, which this seed does not hit).
    assert ref.item() > 0
    assert abs(r1.item() - ref.item()) <= 1e-6 * ref.item()
    # create_graph=True: the penalty back-propagates into the discriminator's weights
    r1.backward()
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)


def test_r1_needs_grad_on_real():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r'requires_grad_\(True\)'):
        r1_penalty(x.sum(1), x)


def test_lazy_r1_every_k_steps_scaled_by_k():
    a = torch.randn(3, 4, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64).requires_grad_(True)
    d = lambda: (x * a).flatten(1).sum(1)   # grad = a for every sample: R1 = gamma/2 ||a||^2
    lazy = LazyR1(gamma=3.0, every=5)
    assert [s for s in range(12) if lazy.due(s)] == [0, 5, 10]
    assert math.isclose(lazy(10, d(), x).item(), 5 * 1.5 * a.pow(2).sum().item(), rel_tol=1e-12)
    assert lazy(7, d(), x).item() == 0.0
    with pytest.raises(ValueError, match='every'): LazyR1(every=0)


# ---- VGG-19 weights -------------------------------------------------------------------------------------

def test_vgg19_file_name_is_torchvisions():
    from torchvision.models import VGG19_Weights
    assert VGG19_FILE == 'vgg19-dcbb9e9d.pth' == os.path.basename(VGG19_Weights.IMAGENET1K_V1.url)


def test_vgg_missing_weights_error(empty_torch_home):
    folder = empty_torch_home / 'hub' / 'checkpoints'
    assert vgg19_weights_file() == folder / 'vgg19-dcbb9e9d.pth'
    for call in (VGGFeatures, lambda: VGGFeatures(('relu1_1',)), lambda: PerceptualLoss('srddgan'), load_vgg19_state):
        with pytest.raises(MissingWeightsError) as e:
            call()
        msg = str(e.value)
        assert isinstance(e.value, FileNotFoundError)
        assert 'vgg19-dcbb9e9d.pth' in msg and str(folder) in msg and "mode='random'" in msg
    assert list(empty_torch_home.rglob('*')) == []   # nothing downloaded or written


def fake_vgg19_state(seed=123):
    "torchvision VGG-19 `features` with random weights; the 120M-parameter classifier replaced by small placeholders."
    from torchvision.models import vgg19
    from torchvision.models.vgg import cfgs, make_layers
    torch.manual_seed(seed)
    trunk = make_layers(cfgs['E'])
    sd = {f'features.{k}': v.clone() for k, v in trunk.state_dict().items()}
    with torch.device('meta'): real_keys = list(vgg19(weights=None).state_dict())  # torchvision's real layout, no memory
    assert sorted(k for k in real_keys if k.startswith('features.')) == sorted(sd)
    sd.update({k: torch.randn(3) for k in real_keys if k.startswith('classifier.')})  # must be ignored by VGGFeatures
    return sd, trunk


def test_vgg_loads_cached_weights_exactly(empty_torch_home):
    sd, trunk = fake_vgg19_state()
    path = empty_torch_home / 'hub' / 'checkpoints' / 'vgg19-dcbb9e9d.pth'
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    vgg = VGGFeatures()   # default: pretrained, SRDDGAN's four layers
    assert vgg.name == 'VGG19-ImageNet' and 'random' not in vgg.name
    own = vgg.features.state_dict()
    assert len(own) == 2 * 9  # nine convolutions up to relu4_1
    for k, v in own.items(): assert torch.equal(v, sd[f'features.{k}']), k
    # features equal torchvision's trunk applied by hand to ImageNet-normalised [0, 1] input
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 24, generator=g) * 2 - 1
    h = (((x + 1) / 2) - torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)) / \
        torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    ref = {}
    with torch.no_grad():
        for i, m in enumerate(trunk[:21]):
            h = m(h)
            for name, j in SRDDGAN_LAYERS.items():
                if i == j: ref[name] = h.clone()
        out = vgg(x)
    assert list(out) == list(SRDDGAN_LAYERS)
    for k in SRDDGAN_LAYERS: torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-5)


def test_vgg_random_mode(empty_torch_home):
    v0, v0b, v1 = VGGFeatures(mode='random', seed=0), VGGFeatures(mode='random', seed=0), VGGFeatures(mode='random', seed=1)
    assert 'random' in v0.name
    assert not any(p.requires_grad for p in v0.parameters()) and not v0.training
    v0.train(); assert not v0.training
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    a, b, c = v0(x), v0b(x), v1(x)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a['relu1_2'], c['relu1_2'])
    assert [tuple(v.shape) for v in a.values()] == [(1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 4, 4), (1, 512, 2, 2)]
    assert list(empty_torch_home.rglob('*')) == []


# ---- content / style ----------------------------------------------------------------------------------

SHAPES = {'a': (2, 3, 4, 5), 'b': (2, 6, 2, 3)}
W = {'a': 0.3, 'b': 1.7}


def test_gram_style_loss_matches_loop():
    fs, fh = feats(0, SHAPES), feats(1, SHAPES)
    total = 0.0
    for l in SHAPES:
        N, C, H, Wd = SHAPES[l]
        per = []
        for n in range(N):
            G = np.zeros((2, C, C))
            for s, f in enumerate((fs, fh)):
                a = f[l][n].numpy()
                for i in range(C):
                    for j in range(C):
                        G[s, i, j] = sum(a[i, y, x] * a[j, y, x] for y in range(H) for x in range(Wd)) / (C * H * Wd)
            per.append(math.sqrt(((G[0] - G[1]) ** 2).sum()) / C ** 2)   # SRDDGAN eq. 14 on normalised Grams
        total += W[l] * np.mean(per)
    assert math.isclose(style_loss_gram(fs, fh, W).item(), total, rel_tol=1e-10)  # float64 throughout
    # unnormalised Gram (eq. 13) against einsum
    f = fs['a']
    np.testing.assert_allclose(gram_matrix(f, normalize=False).numpy(), np.einsum('nihw,njhw->nij', f.numpy(), f.numpy()), rtol=1e-12)
    assert style_loss_gram(fs, fs).item() == 0.0


def test_meanvar_style_loss_matches_numpy():
    fs, fh = feats(2, SHAPES), feats(3, SHAPES)
    eps = 1e-5
    total = 0.0
    for l in SHAPES:
        a, b = fs[l].numpy(), fh[l].numpy()
        ma, mb = a.mean((2, 3)), b.mean((2, 3))
        sa, sb = np.sqrt(a.var((2, 3)) + eps), np.sqrt(b.var((2, 3)) + eps)   # population variance (ddof=0)
        total += W[l] * (((ma - mb) ** 2).mean(1) + ((sa - sb) ** 2).mean(1)).mean()
    assert math.isclose(style_loss_meanvar(fs, fh, W, eps=eps).item(), total, rel_tol=1e-10)
    a = fs['a'].numpy()
    np.testing.assert_allclose(style_loss_meanvar({'a': fs['a']}, {'a': torch.zeros_like(fs['a'])}, eps=0).item(),
                               ((a.mean((2, 3)) ** 2).mean(1) + (a.std((2, 3)) ** 2).mean(1)).mean(), rtol=1e-10)


def test_content_loss_matches_numpy_and_is_zero_only_for_identical():
    fs, fh = feats(4, SHAPES), feats(5, SHAPES)
    ref_l2 = sum(W[l] * np.mean([np.sqrt(((fs[l][n] - fh[l][n]).numpy() ** 2).sum()) / np.prod(SHAPES[l][1:])
                                 for n in range(2)]) for l in SHAPES)                        # SRDDGAN eq. 12
    ref_mse = sum(W[l] * ((fs[l] - fh[l]).numpy() ** 2).mean() for l in SHAPES)            # LDDPM eq. 16 feature term
    assert math.isclose(content_loss(fs, fh, W).item(), ref_l2, rel_tol=1e-10)
    assert math.isclose(content_loss(fs, fh, [W['a'], W['b']], dist='mse').item(), ref_mse, rel_tol=1e-10)
    assert math.isclose(content_loss(fs, fh, dist='l1').item(),
                        sum(np.abs((fs[l] - fh[l]).numpy()).mean() for l in SHAPES), rel_tol=1e-10)
    # on real extractor features of images
    vgg = VGGFeatures(mode='random')
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    y = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    for dist in ('srddgan', 'mse', 'l1'):
        assert content_loss(vgg(x), vgg(x), dist=dist).item() == 0.0
        assert content_loss(vgg(y), vgg(x), dist=dist).item() > 0
    with pytest.raises(ValueError, match='one of'): content_loss(fs, fh, dist='cosine')


def test_perceptual_loss_combines_parts():
    for key in PERCEPTUAL_PRESETS:
        cfg = PerceptualConfig(**{**PERCEPTUAL_PRESETS[key].__dict__, 'mode': 'random'})
        pl = PerceptualLoss(cfg)
        g = torch.Generator().manual_seed(7)
        hr = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
        sr = (hr + 0.1 * torch.randn(hr.shape, generator=g)).requires_grad_(True)
        total, parts = pl(sr, hr, return_parts=True)
        fs, fh = pl.vgg(sr), pl.vgg(hr)
        style = style_loss_gram(fs, fh) if cfg.style == 'gram' else style_loss_meanvar(fs, fh)
        ref = cfg.content_weight * content_loss(fs, fh, dist=cfg.content_dist) + cfg.style_weight * style \
            + cfg.pixel_weight * (sr - hr).abs().mean()
        torch.testing.assert_close(total, ref)
        total.backward()
        assert sr.grad.abs().sum() > 0
        assert pl(hr, hr).item() == pytest.approx(0.0, abs=1e-7)
    assert (PERCEPTUAL_PRESETS['srddgan'].content_weight, PERCEPTUAL_PRESETS['srddgan'].style_weight) == (0.8, 0.2)


# ---- GAN losses ----------------------------------------------------------------------------------------

def test_gan_losses_closed_forms():
    real = [2.5, -0.3, 0.0, 7.0, -12.0]
    fake = [-1.5, 0.4, 3.0, -9.0, 15.0]
    sig = lambda v: 1 / (1 + math.exp(-v))
    mean = lambda xs: sum(xs) / len(xs)
    r, f = torch.tensor(real, dtype=torch.float64), torch.tensor(fake, dtype=torch.float64)
    expect = {  # written from the definitions with Python's math
        'ns': (mean([-math.log(sig(v)) for v in real]) + mean([-math.log(1 - sig(v)) for v in fake]),
               mean([-math.log(sig(v)) for v in fake])),
        'minimax': (mean([-math.log(sig(v)) for v in real]) + mean([-math.log(1 - sig(v)) for v in fake]),
                    mean([math.log(1 - sig(v)) for v in fake])),
        'hinge': (mean([max(0, 1 - v) for v in real]) + mean([max(0, 1 + v) for v in fake]), -mean(fake)),
    }
    assert set(GAN_LOSSES) == set(expect)
    for k, (d, g) in expect.items():
        assert math.isclose(GAN_LOSSES[k].d(r, f).item(), d, rel_tol=1e-9), k
        assert math.isclose(GAN_LOSSES[k].g(f).item(), g, rel_tol=1e-9), k
    # numerically stable far out (float32, logit 100): softplus, not log(sigmoid)
    big = torch.tensor([100.0])
    assert torch.isfinite(GAN_LOSSES['ns'].d(-big, big)) and GAN_LOSSES['ns'].d(-big, big).item() == pytest.approx(200.0)


# ---- instance noise --------------------------------------------------------------------------------------

def test_instance_noise_seeded():
    x = torch.zeros(3, 2, 32, 32)
    gen = lambda s: torch.Generator().manual_seed(s)
    a, b, c = instance_noise(x, 0.5, gen(11)), instance_noise(x, 0.5, gen(11)), instance_noise(x, 0.5, gen(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, 0.5 * torch.randn(x.shape, generator=gen(11)))   # exactly x + sigma * N(0, I) from that stream
    per = instance_noise(x, torch.tensor([0.0, 1.0, 3.0]), gen(0))
    assert per[0].abs().max().item() == 0.0
    assert per[1].std().item() == pytest.approx(1.0, abs=0.06) and per[2].std().item() == pytest.approx(3.0, abs=0.18)  # 2048 samples: s.e. of the std is sigma/64, tolerance ~4 s.e.
    assert torch.equal(instance_noise(x + 1, 0.0, gen(0)), x + 1)
    with pytest.raises(ValueError, match='one per sample'): instance_noise(x, torch.ones(2))
