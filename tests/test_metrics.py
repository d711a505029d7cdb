"Metrics against independent references: scikit-image PSNR/SSIM, numpy formulas, closed-form FID, slow-loop KID."
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio as sk_psnr, structural_similarity as sk_ssim

from diffsr_kit.degrade import DegradeConfig, degrade
from diffsr_kit.metrics import (
    ConventionCard, FIDKID, InceptionFeatures, LPIPSMetric, MissingWeightsError, SmallSampleWarning,
    consistency, count_params, evaluate_batch, fid_from_feats, grey_histogram, kid_from_feats, lr_psnr,
    mean_pairwise_lpips, pixel_std_map, psnr, recommend_kid, rgb_to_y, ssim, ssim_map, time_per_image, weights_file)

SK_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
TOL = 1e-4  # agreement with scikit-image asked for by the issue (absolute; dB for PSNR)


def to_t(a):
    "HW or HWC float array -> (1,C,H,W) float64 tensor."
    a = np.asarray(a, np.float64)
    if a.ndim == 2: a = a[..., None]
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]


def y_numpy(a):
    "BT.601 studio-swing luma (MATLAB rgb2ycbcr) of an HW3 array in [0,1], written independently of the package."
    return (16.0 + 65.481 * a[..., 0] + 128.553 * a[..., 1] + 24.966 * a[..., 2]) / 255.0


def sk_pair_metrics(sr, hr, channel_axis):
    "skimage PSNR and SSIM of two arrays (HW or HWC) in [0,1]."
    kw = dict(SK_SSIM, data_range=1.0, channel_axis=channel_axis)
    return sk_psnr(hr, sr, data_range=1.0), sk_ssim(sr, hr, **kw)


def image_pairs():
    "(name, sr, hr) float64 HWC/HW arrays in [0,1]: random, and real photographs with blurred / noisy 'SR'."
    rng = np.random.default_rng(0)
    ast = skdata.astronaut()[:96, 100:180].astype(np.float64) / 255       # 96x80 RGB
    cam = skdata.camera()[200:264, 180:252].astype(np.float64) / 255     # 64x72 grey
    rand_hr = rng.random((40, 48, 3))
    return [
        ('random', np.clip(rand_hr + 0.1 * rng.standard_normal(rand_hr.shape), 0, 1), rand_hr),
        ('random-unrelated', rng.random((40, 48, 3)), rand_hr),
        ('astronaut-noisy', np.clip(ast + 0.05 * rng.standard_normal(ast.shape), 0, 1), ast),
        ('astronaut-blurred', ndimage.gaussian_filter(ast, sigma=(1.2, 1.2, 0)), ast),
        ('camera-noisy', np.clip(cam + 0.08 * rng.standard_normal(cam.shape), 0, 1), cam),
        ('camera-blurred', ndimage.gaussian_filter(cam, sigma=1.5), cam),
    ]


@pytest.mark.parametrize('name,sr,hr', image_pairs(), ids=[p[0] for p in image_pairs()])
@pytest.mark.parametrize('crop', [0, 3])
def test_psnr_ssim_match_skimage(name, sr, hr, crop):
    c = slice(crop, -crop) if crop else slice(None)
    rgb = hr.ndim == 3
    ref_p, ref_s = sk_pair_metrics(sr[c, c], hr[c, c], 2 if rgb else None)  # skimage on manually sliced arrays
    for dt in (torch.float64, torch.float32):
        S, H = to_t(sr).to(dt), to_t(hr).to(dt)
        assert abs(psnr(S, H, crop_border=crop).item() - ref_p) < TOL
        assert abs(ssim(S, H, crop_border=crop).item() - ref_s) < TOL


@pytest.mark.parametrize('name,sr,hr', [p for p in image_pairs() if p[2].ndim == 3], ids=lambda v: v if isinstance(v, str) else '')
def test_y_channel_metrics_match_skimage_on_numpy_y(name, sr, hr):
    ys, yh = y_numpy(sr), y_numpy(hr)
    for crop in (0, 4):
        c = slice(crop, -crop) if crop else slice(None)
        ref_p, ref_s = sk_pair_metrics(ys[c, c], yh[c, c], None)
        assert abs(psnr(to_t(sr), to_t(hr), crop_border=crop, y_channel=True).item() - ref_p) < TOL
        assert abs(ssim(to_t(sr), to_t(hr), crop_border=crop, y_channel=True).item() - ref_s) < TOL


def test_ssim_map_matches_skimage_full_map_including_edges():
    _, sr, hr = image_pairs()[2]
    _, S = sk_ssim(sr, hr, data_range=1.0, channel_axis=2, full=True, **SK_SSIM)
    ours = ssim_map(to_t(sr), to_t(hr))[0].numpy().transpose(1, 2, 0)
    np.testing.assert_allclose(ours, S, atol=1e-8)  # float64 both sides; edges use scipy's 'reflect'


def test_batch_gives_one_value_per_image():
    pairs = [p for p in image_pairs() if p[0].startswith('random')]
    S, H = torch.cat([to_t(p[1]) for p in pairs]), torch.cat([to_t(p[2]) for p in pairs])
    p, s = psnr(S, H), ssim(S, H)
    assert p.shape == s.shape == (2,)
    for i, (_, sr, hr) in enumerate(pairs):
        ref_p, ref_s = sk_pair_metrics(sr, hr, 2)
        assert abs(p[i].item() - ref_p) < TOL and abs(s[i].item() - ref_s) < TOL


def test_rgb_to_y_matches_bt601_formula():
    a = np.random.default_rng(1).random((17, 19, 3))
    y = rgb_to_y(to_t(a))
    assert y.shape == (1, 1, 17, 19)
    np.testing.assert_allclose(y[0, 0].numpy(), y_numpy(a), atol=1e-12)
    # studio swing: black -> 16/255, white -> 235/255
    np.testing.assert_allclose(rgb_to_y(torch.tensor([0., 1.]).view(2, 1, 1, 1).expand(2, 3, 1, 1).double()).flatten().numpy(),
                               [16 / 255, 235 / 255], atol=1e-12)
    g = torch.rand(1, 1, 5, 5)
    assert torch.equal(rgb_to_y(g), g)  # grey passes through


def test_crop_border_removes_exactly_that_many_pixels():
    rng = np.random.default_rng(2)
    hr = rng.random((32, 36, 3))
    sr = hr.copy()
    b = 3
    mask = np.ones(hr.shape[:2], bool); mask[b:-b, b:-b] = False
    sr[mask] = rng.random((mask.sum(), 3))   # differs only in a 3-pixel frame
    S, H = to_t(sr), to_t(hr)
    assert np.isfinite(psnr(S, H, crop_border=b - 1).item())   # one pixel less: the frame is still seen
    assert psnr(S, H, crop_border=b).item() == float('inf')
    assert ssim(S, H, crop_border=b).item() == pytest.approx(1.0, abs=1e-12)
    assert ssim(S, H, crop_border=b - 1).item() < 1 - 1e-6   # SSIM skips a 5-px margin, so the remaining frame barely counts


def test_input_errors_are_clear():
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match='same shape'): psnr(x, x[..., :8])
    with pytest.raises(ValueError, match='from_model'): psnr(x * 2 - 1, x)
    with pytest.raises(ValueError, match='4-D'): ssim(x[0], x[0])
    with pytest.raises(ValueError, match='at least 11x11'): ssim(x, x, crop_border=3)


def test_grey_histogram_matches_numpy():
    a = np.random.default_rng(3).random((2, 20, 24, 3))
    h, edges = grey_histogram(torch.from_numpy(a.transpose(0, 3, 1, 2)), bins=32)
    for i in range(2):
        g = 0.299 * a[i, ..., 0] + 0.587 * a[i, ..., 1] + 0.114 * a[i, ..., 2]
        ref, ref_edges = np.histogram(g, bins=32, range=(0, 1))
        np.testing.assert_array_equal(h[i].numpy(), ref)
    np.testing.assert_allclose(edges.numpy(), ref_edges)


def test_lr_psnr_and_consistency():
    rng = np.random.default_rng(4)
    hr = torch.from_numpy(rng.random((2, 3, 32, 32)))
    sr = (hr + 0.05 * torch.from_numpy(rng.standard_normal(hr.shape))).clamp(0, 1)
    lr = torch.from_numpy(rng.random((2, 3, 8, 8)))
    nearest = lambda x: x[..., ::4, ::4]
    ref_mse = ((sr.numpy()[..., ::4, ::4] - lr.numpy()) ** 2).reshape(2, -1).mean(1)   # numpy reference
    np.testing.assert_allclose(consistency(sr, lr, nearest).numpy(), ref_mse, rtol=1e-12)
    np.testing.assert_allclose(lr_psnr(sr, lr, nearest).numpy(), 10 * np.log10(1 / ref_mse), rtol=1e-12)
    # default degrade_fn is the kit's classic bicubic: LR made by it is matched exactly ...
    lr_k, _ = degrade(hr.float(), DegradeConfig('classic', scale=4))
    assert consistency(hr.float(), lr_k).eq(0).all() and lr_psnr(hr.float(), lr_k).isinf().all()
    # ... and it is PIL-style bicubic: LR from PIL's float bicubic differs by MSE < 1e-5 (antialiased kernels agree closely)
    a = hr[0].numpy().astype(np.float32)
    lr_pil = np.stack([np.asarray(Image.fromarray(a[c], mode='F').resize((8, 8), Image.BICUBIC)) for c in range(3)])
    assert consistency(hr[:1].float(), torch.from_numpy(lr_pil).clamp(0, 1)[None]).item() < 1e-5
    with pytest.raises(ValueError, match='integer multiple'): consistency(sr[..., :30, :], lr)


# ---- LPIPS ----------------------------------------------------------------------------------------

@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    return tmp_path


@pytest.mark.parametrize('net', ['alex', 'vgg'])
def test_lpips_random_mode(net, empty_torch_home):
    m = LPIPSMetric(net, mode='random')
    assert m.name == f'LPIPS-random-{net}'
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    assert m(a, a).abs().max().item() == 0.0
    d = m(a, b)
    assert d.shape == (2,) and (d > 0).all()
    assert list(empty_torch_home.rglob('*')) == []   # nothing was downloaded or written into the cache


@pytest.mark.parametrize('key,fname', [('alex', 'alexnet-owt-7be5be79.pth'), ('vgg', 'vgg16-397923af.pth')])
def test_lpips_missing_weights_error(key, fname, empty_torch_home):
    with pytest.raises(MissingWeightsError) as e:
        LPIPSMetric(key)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert fname in msg and str(empty_torch_home / 'hub' / 'checkpoints') in msg and 'IMAGENET1K_V1' in msg


def test_inception_missing_weights_error(empty_torch_home):
    with pytest.raises(MissingWeightsError, match='inception_v3_google-0cc3c7bd.pth'):
        InceptionFeatures('pretrained')


def _standin_alexnet_features():
    "torchvision's AlexNet features in its layout, random values (the real file cannot be fetched here)."
    from torchvision.models import alexnet
    torch.manual_seed(5)
    return {k: v for k, v in alexnet(weights=None).state_dict().items() if k.startswith('features.')}


def test_weights_are_downloaded_on_first_use_into_the_hub_cache(empty_torch_home, monkeypatch):
    "No network here: torch.hub's downloader is replaced by a stand-in that records the call and writes the file."
    from torchvision.models import AlexNet_Weights
    monkeypatch.delenv('DIFFSR_OFFLINE', raising=False)
    calls = []
    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix, progress)); torch.save(_standin_alexnet_features(), dst)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', fake_download)
    m = LPIPSMetric('alex')
    assert m.name == 'LPIPS-alex'
    assert calls == [(AlexNet_Weights.IMAGENET1K_V1.url, str(empty_torch_home / 'hub' / 'checkpoints' / 'alexnet-owt-7be5be79.pth'),
                      '7be5be79', True)]   # torchvision's URL, into torchvision's cache file, with its hash check
    LPIPSMetric('alex')
    assert len(calls) == 1                 # second use: from the cache


def test_a_failed_download_is_reported_with_the_file_and_its_folder(empty_torch_home, monkeypatch):
    import urllib.error
    monkeypatch.delenv('DIFFSR_OFFLINE', raising=False)
    def no_network(url, dst, hash_prefix=None, progress=True): raise urllib.error.URLError('Name or service not known')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_network)
    with pytest.raises(MissingWeightsError) as e: LPIPSMetric('vgg')
    msg = str(e.value)
    assert 'vgg16-397923af.pth' in msg and str(empty_torch_home / 'hub' / 'checkpoints') in msg
    assert 'downloading it from https://download.pytorch.org/models/vgg16-397923af.pth failed (URLError' in msg
    assert not (empty_torch_home / 'hub' / 'checkpoints' / 'vgg16-397923af.pth').exists()


def test_offline_never_downloads(empty_torch_home, monkeypatch):
    monkeypatch.setenv('DIFFSR_OFFLINE', '1')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', lambda *a, **k: pytest.fail('downloaded while offline'))
    with pytest.raises(MissingWeightsError, match='DIFFSR_OFFLINE is set'): InceptionFeatures('pretrained')


def test_lpips_pretrained_loads_backbone_from_cache(empty_torch_home):
    "A stand-in AlexNet features file (torchvision layout, random values) is loaded exactly into the LPIPS trunk."
    from torchvision.models import alexnet
    torch.manual_seed(5)
    sd = {k: v for k, v in alexnet(weights=None).state_dict().items() if k.startswith('features.')}
    path = weights_file('alex')
    assert path == empty_torch_home / 'hub' / 'checkpoints' / 'alexnet-owt-7be5be79.pth'
    path.parent.mkdir(parents=True); torch.save(sd, path)
    m = LPIPSMetric('alex')
    assert m.name == 'LPIPS-alex'
    loaded = {k.split('.', 1)[1]: v for k, v in m.model.net.state_dict().items()}   # 'slice1.0.weight' -> '0.weight'
    assert len(loaded) == len(sd) == 10
    for k, v in sd.items(): assert torch.equal(loaded[k.split('.', 1)[1]], v), k


def test_mean_pairwise_lpips_matches_loop(empty_torch_home):
    m = LPIPSMetric('alex', mode='random')
    s = torch.rand(3, 2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref = (m(s[0], s[1]) + m(s[0], s[2]) + m(s[1], s[2])) / 3
    torch.testing.assert_close(mean_pairwise_lpips(s, m), ref)


# ---- FID / KID --------------------------------------------------------------------------------------

def sqrt_psd(S):
    w, V = np.linalg.eigh(S)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def frechet_closed_form(m1, S1, m2, S2):
    "Analytic Fréchet distance of two Gaussians, via the symmetric form (S1^1/2 S2 S1^1/2)^1/2 and eigh."
    r = sqrt_psd(S1)
    return float(((m1 - m2) ** 2).sum() + np.trace(S1 + S2 - 2 * sqrt_psd(r @ S2 @ r)))


def gaussians(d=6, seed=0):
    rng = np.random.default_rng(seed)
    A1, A2 = rng.normal(size=(d, d)) / 2, rng.normal(size=(d, d)) / 2
    return rng, np.zeros(d), A1 @ A1.T + 0.2 * np.eye(d), np.linspace(0, 1, d), A2 @ A2.T + 0.2 * np.eye(d)


def with_moments(z, m, S):
    "Samples whose sample mean and (ddof=1) covariance equal m and S exactly."
    z = z - z.mean(0)
    L = np.linalg.cholesky(np.cov(z, rowvar=False))
    return z @ np.linalg.inv(L).T @ np.linalg.cholesky(S).T + m


def test_fid_identical_is_zero():
    f = np.random.default_rng(0).normal(size=(2500, 16))
    assert abs(fid_from_feats(f, f)) < 1e-8


def test_fid_closed_form_gaussians():
    rng, m1, S1, m2, S2 = gaussians()
    exact = frechet_closed_form(m1, S1, m2, S2)
    # exact moments: FID depends on the features only through mean and covariance -> tight (1e-8 relative)
    f1, f2 = with_moments(rng.normal(size=(3000, 6)), m1, S1), with_moments(rng.normal(size=(3000, 6)), m2, S2)
    assert fid_from_feats(f1, f2) == pytest.approx(exact, rel=1e-8)
    # sampled: 40k draws per set, sampling error of the moments ~ 1/sqrt(n); 3 % relative tolerance
    g1, g2 = rng.multivariate_normal(m1, S1, 40000), rng.multivariate_normal(m2, S2, 40000)
    assert fid_from_feats(g1, g2) == pytest.approx(exact, rel=0.03)


def test_fid_small_sample_warning():
    f = np.random.default_rng(0).normal(size=(3000, 4))
    with pytest.warns(SmallSampleWarning, match='KID'):
        fid_from_feats(f[:1999], f[1000:2999])
    with warnings.catch_warnings():
        warnings.simplefilter('error', SmallSampleWarning)
        fid_from_feats(f[:2000], f[1000:3000])   # 2000 samples: no warning
    assert 'KID' in recommend_kid(100) and recommend_kid(2000) is None


def kid_loop(x, y):
    "Unbiased MMD^2 with k(a,b) = (a.b/d + 1)^3 over all points, as explicit double loops."
    n, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3
    sxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(n) for j in range(n))
    return sxx / (n * (n - 1)) + syy / (n * (n - 1)) - 2 * sxy / n ** 2


def test_kid_matches_loop_and_is_near_zero_for_same_distribution():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 5)), rng.normal(0.5, 1, size=(30, 5))
    mean, std = kid_from_feats(x, y, n_subsets=3, subset_size=30)   # subset = whole set: deterministic
    assert mean == pytest.approx(kid_loop(x, y), rel=1e-10) and std < 1e-12
    a, b = rng.normal(size=(3000, 8)), rng.normal(size=(3000, 8))
    same = kid_from_feats(a, a, n_subsets=20, subset_size=500)[0]
    indep = kid_from_feats(a, b, n_subsets=20, subset_size=500)[0]
    diff = kid_from_feats(a, b + 0.5, n_subsets=20, subset_size=500)[0]
    # unbiased: same distribution -> ~0 (|KID| below 2 % of the shifted pair's), shifted -> clearly positive
    assert abs(same) < 0.02 * diff and abs(indep) < 0.02 * diff and diff > 0


def test_inception_random_features_and_names(empty_torch_home):
    inc = InceptionFeatures('random', size=75)
    f = inc(torch.rand(2, 3, 40, 40))
    assert f.shape == (2, 2048) and torch.isfinite(f).all()
    fk = FIDKID(extractor=inc)
    assert (fk.fid_name, fk.kid_name) == ('FID-random', 'KID-random')
    with pytest.raises(ValueError, match='at least 75'): InceptionFeatures('random', size=64)


# ---- diversity, cost, card, evaluate_batch ----------------------------------------------------------

def test_pixel_std_map_matches_numpy():
    s = np.random.default_rng(2).random((4, 2, 3, 8, 8))
    sd, mean = pixel_std_map(torch.from_numpy(s))
    np.testing.assert_allclose(sd.numpy(), s.std(0, ddof=1), rtol=1e-12)
    np.testing.assert_allclose(mean.numpy(), s.std(0, ddof=1).reshape(2, -1).mean(1), rtol=1e-12)
    sd2, _ = pixel_std_map([torch.from_numpy(a) for a in s])
    torch.testing.assert_close(sd2, sd)
    with pytest.raises(ValueError, match='K >= 2'): pixel_std_map(torch.from_numpy(s[:1]))


def test_count_params_and_time_per_image():
    lin = torch.nn.Linear(4, 4)
    net = torch.nn.Sequential(lin, torch.nn.ReLU(), lin)   # shared layer counted once
    assert count_params(net) == 4 * 4 + 4
    lin.bias.requires_grad_(False)
    assert count_params(net, trainable_only=True) == 16
    r = time_per_image(net, torch.rand(5, 4), repeats=2)
    assert r['batch'] == 5 and r['sec_per_img'] > 0 and r['img_per_s'] == pytest.approx(1 / r['sec_per_img'])
    assert r['peak_mem_mb'] is None or r['peak_mem_mb'] > 0


def test_convention_card():
    card = ConventionCard(colour_space='Y', crop_border=4, steps=50, seeds=[0, 1], n_images=10)
    md = card.to_markdown()
    for s in ('| colour space | Y', '| crop border | 4 px', '| steps | 50 |', '| images | 10 |', 'metric: SSIM'):
        assert s in md, s
    d = card.to_dict()
    assert d['colour_space'] == 'Y' and d['seeds'] == [0, 1] and 'PSNR' in d['metrics']
    with pytest.raises(ValueError, match='colour_space'): ConventionCard(colour_space='YCbCr')


def test_evaluate_batch(empty_torch_home):
    rng = np.random.default_rng(6)
    hr = rng.random((2, 32, 32, 3))
    sr = np.clip(hr + 0.05 * rng.standard_normal(hr.shape), 0, 1)
    H, S = (torch.from_numpy(a.transpose(0, 3, 1, 2)) for a in (hr, sr))
    lr, _ = degrade(H.float(), DegradeConfig('classic', scale=4))
    card = ConventionCard(colour_space='Y', crop_border=2)
    lp = LPIPSMetric('alex', mode='random')
    out = evaluate_batch(S, H, lr.double(), card, lpips_metric=lp)
    assert set(out) == {'PSNR', 'SSIM', 'LR-PSNR', 'Consistency', 'LPIPS-random-alex'}
    assert all(len(v) == 2 for v in out.values())
    for i in range(2):
        ref_p, ref_s = sk_pair_metrics(y_numpy(sr[i])[2:-2, 2:-2], y_numpy(hr[i])[2:-2, 2:-2], None)
        assert abs(out['PSNR'][i] - ref_p) < TOL and abs(out['SSIM'][i] - ref_s) < TOL
    assert 'LPIPS-random-alex' in card.to_markdown()
    assert set(evaluate_batch(S, H)) == {'PSNR', 'SSIM'}


# ---- NIQE ------------------------------------------------------------------------------------------------

def test_niqe_mscn_and_aggd_match_a_hand_computation():
    """MSCN by an explicit loop (edge-replicated, the 7x7 Gaussian of std 7/6 written out here) and the AGGD shape by
    root-finding NIQE's moment equation (scipy brentq) instead of the kit's 0.001 grid, on a small image."""
    from scipy.optimize import brentq
    from scipy.special import gamma as G
    from scipy.ndimage import uniform_filter
    from diffsr_kit.metrics import mscn, aggd_fit, niqe_block_features
    rng = np.random.default_rng(0)
    img = uniform_filter(rng.random((20, 24)) * 255, 3)  # a little spatial correlation, as in images
    w = np.array([[np.exp(-(i * i + j * j) / (2 * (7 / 6) ** 2)) for j in range(-3, 4)] for i in range(-3, 4)]); w /= w.sum()
    pad, pad2 = np.pad(img, 3, mode='edge'), np.pad(img * img, 3, mode='edge')
    ref = np.zeros_like(img)
    for i in range(img.shape[0]):
        for j in range(img.shape[1]):
            mu = (w * pad[i:i + 7, j:j + 7]).sum()
            ref[i, j] = (img[i, j] - mu) / (np.sqrt(abs((w * pad2[i:i + 7, j:j + 7]).sum() - mu * mu)) + 1)
    m, _ = mscn(img)
    np.testing.assert_allclose(m, ref, atol=1e-10)
    x = m.ravel()
    lstd, rstd = np.sqrt(np.mean(x[x < 0] ** 2)), np.sqrt(np.mean(x[x > 0] ** 2))
    g = lstd / rstd
    rn = np.mean(np.abs(x)) ** 2 / np.mean(x ** 2) * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2
    a_ref = brentq(lambda a: G(2 / a) ** 2 / (G(1 / a) * G(3 / a)) - rn, 0.2, 10)
    a, bl, br = aggd_fit(m)
    assert abs(a - a_ref) <= 1e-3
    np.testing.assert_allclose([bl, br], [lstd * np.sqrt(G(1 / a_ref) / G(3 / a_ref)), rstd * np.sqrt(G(1 / a_ref) / G(3 / a_ref))], rtol=2e-3)
    f = niqe_block_features(m)
    assert f.shape == (18,) and f[0] == a and np.isclose(f[1], (bl + br) / 2)
    h = x.reshape(m.shape) * np.roll(m, (0, 1), axis=(0, 1))   # the horizontal-neighbour product, as the paper's H pairs
    np.testing.assert_allclose(f[2], aggd_fit(h)[0])


def test_niqe_is_the_mahalanobis_like_distance_of_the_paper():
    from diffsr_kit.metrics import NIQEModel, niqe, niqe_features
    rng = np.random.default_rng(1)
    A = rng.normal(size=(36, 36))
    model = NIQEModel(rng.normal(size=36), A @ A.T / 36 + np.eye(36), 32, ('made-up',), 100)
    x = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(2))
    f, _ = niqe_features((0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).double().numpy() * 255, 32)
    assert f.shape == (6, 36)
    d = model.mu - f.mean(0)
    want = np.sqrt(d @ np.linalg.solve((model.cov + np.cov(f, rowvar=False)) / 2, d))  # eq. 10, the pooled covariance
    assert niqe(x, model).item() == pytest.approx(want, rel=1e-6)


def test_niqe_orders_clean_blurred_noisy():
    "On the bundled test crops: clean < bicubic x2 blur < Gaussian noise of std 0.1, on average, with the kit's model."
    from diffsr_kit.metrics import niqe, kit_niqe_model
    from diffsr_kit.bench import held_out_crops
    from diffsr_kit.degrade import resize
    m = kit_niqe_model()
    assert m.images and m.n_blocks > 36 and 'not the published model' in m.description
    x = torch.stack([v for v in held_out_crops('test', 128).values() if v.shape[0] == 3])
    blur = resize(resize(x, 0.5, 'bicubic'), (128, 128), 'bicubic').clamp(0, 1)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    c, b, n = (niqe(v).mean().item() for v in (x, blur, noisy))
    assert c < b < n, (c, b, n)
