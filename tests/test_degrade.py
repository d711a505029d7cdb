"""diffsr_kit.degrade against independent references: numpy/scipy kernels and convolution, PIL bicubic and JPEG,
and a per-image loop rebuilt from the drawn parameters with scipy."""
import io
from pathlib import Path
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage, stats
from skimage import data

from diffsr_kit.degrade import (
    PIPELINES,
    DegradeConfig,
    add_gaussian_noise,
    anisotropic_gaussian_kernel,
    anisotropic_gaussian_kernels,
    blur,
    degrade,
    isotropic_gaussian_kernel,
    isotropic_gaussian_kernels,
    jpeg,
    resize,
)


def _u8_to_t(a):  # uint8 HWC / HW -> (1,C,H,W) float in [0,1]
    a = a[..., None] if a.ndim == 2 else a
    return torch.from_numpy(a.transpose(2, 0, 1).copy()).float()[None] / 255


def _t_to_u8(x):  # (1,C,H,W) [0,1] -> uint8 HWC (HW for grey), rounding half up
    a = (x[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
    return a[..., 0] if a.shape[-1] == 1 else a


def _psnr_u8(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)


@pytest.fixture(scope='module')
def astro():  # a real photograph, 256x256 crop (uint8 HWC)
    return data.astronaut()[:256, 128:384]


# ---------------------------------------------------------------- kernels

@pytest.mark.parametrize('s1,s2,theta', [(1.0, 1.0, 0.0), (3.0, 1.0, 0.3), (0.7, 2.5, 2.0), (4.0, 1.5, math.pi / 6)])
def test_kernels_sum_to_one_and_match_scipy_gaussian(s1, s2, theta):
    k = anisotropic_gaussian_kernel(41, s1, s2, theta).double().numpy()
    assert abs(k.sum() - 1) < 1e-6  # float32 rounding
    # reference: scipy's bivariate normal pdf on the grid (u = column offset, v = row offset), renormalised
    R = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    cov = R @ np.diag([s1 ** 2, s2 ** 2]) @ R.T
    r = np.arange(41) - 20
    v, u = np.meshgrid(r, r, indexing='ij')
    ref = stats.multivariate_normal(mean=[0, 0], cov=cov).pdf(np.stack([u, v], -1))
    ref /= ref.sum()
    assert np.abs(k - ref).max() < 1e-6  # float32 storage of values <= 1


@pytest.mark.parametrize('s1,s2,theta', [(4.0, 1.5, math.pi / 6), (2.0, 5.0, 1.0), (3.0, 3.0, 0.4)])
def test_anisotropic_second_moments_equal_covariance(s1, s2, theta):
    # on an 81x81 grid (>= 8 sigma each side) truncation and sampling change the moments by far less than 1e-3 px^2
    k = anisotropic_gaussian_kernel(81, s1, s2, theta).double().numpy()
    r = np.arange(81) - 40.0
    v, u = np.meshgrid(r, r, indexing='ij')
    emp = np.array([[(k * u * u).sum(), (k * u * v).sum()], [(k * u * v).sum(), (k * v * v).sum()]])
    R = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    Sigma = R @ np.diag([s1 ** 2, s2 ** 2]) @ R.T
    np.testing.assert_allclose(emp, Sigma, atol=1e-3)  # px^2; float32 kernel values limit this to ~1e-5 in practice
    assert abs((k * u).sum()) < 1e-6 and abs((k * v).sum()) < 1e-6  # centred


def test_isotropic_equals_anisotropic_and_scipy_gaussian_filter():
    for sigma in (0.5, 1.3, 2.8):
        iso = isotropic_gaussian_kernel(21, sigma)
        for theta in (0.0, 0.9, 2.5):  # rotation is irrelevant when sigma1 == sigma2
            torch.testing.assert_close(iso, anisotropic_gaussian_kernel(21, sigma, sigma, theta), atol=1e-7, rtol=0)
        # scipy's gaussian_filter of a delta is the sampled, truncated, normalised Gaussian (radius = 10 via truncate)
        delta = np.zeros((21, 21)); delta[10, 10] = 1
        ref = ndimage.gaussian_filter(delta, sigma, truncate=10 / sigma, mode='constant')
        assert np.abs(iso.double().numpy() - ref).max() < 1e-6
    batch = isotropic_gaussian_kernels(21, [0.5, 1.3, 2.8])
    torch.testing.assert_close(batch[1], isotropic_gaussian_kernel(21, 1.3))


def test_blur_matches_scipy_convolve_per_sample(astro):
    x = torch.cat([_u8_to_t(astro[:64, :48]), _u8_to_t(astro[100:164, 60:108])])
    ks = anisotropic_gaussian_kernels(15, [2.0, 0.8], [0.6, 3.0], [0.4, 2.2])
    y = blur(x, ks)
    for i in range(2):
        for c in range(3):
            # scipy 'mirror' == torch 'reflect' (edge pixel not repeated); convolve flips the kernel, a Gaussian is symmetric
            ref = ndimage.convolve(x[i, c].double().numpy(), ks[i].double().numpy(), mode='mirror')
            assert np.abs(y[i, c].double().numpy() - ref).max() < 1e-5  # float32 accumulation over 225 taps


# ---------------------------------------------------------------- classic path vs PIL

@pytest.mark.parametrize('scale', [2, 3, 4, 8])
def test_classic_bicubic_matches_pil(astro, scale):
    img = data.chelsea() if scale == 3 else astro
    H, W = (img.shape[0] // scale) * scale, (img.shape[1] // scale) * scale
    img = np.ascontiguousarray(img[:H, :W])
    lr, params = degrade(_u8_to_t(img), DegradeConfig(pipeline='classic', scale=scale), 0)
    ours = _t_to_u8(lr)
    pil = np.asarray(Image.fromarray(img).resize((W // scale, H // scale), Image.BICUBIC))
    # torch's antialiased bicubic uses PIL's kernel (a = -0.5) but float arithmetic instead of PIL's fixed point;
    # measured on astronaut/chelsea/camera: PSNR 56-60 dB, mean |diff| 0.07-0.16 grey levels, max 1-6 levels.
    assert _psnr_u8(ours, pil) >= 52
    assert np.abs(ours.astype(int) - pil.astype(int)).mean() <= 0.25
    assert params[0]['resize_mode'] == 'bicubic' and params[0]['order'] == ['resize']
    # the thresholds discriminate: plain (non-antialiased) bicubic misses them
    plain = _t_to_u8(F.interpolate(_u8_to_t(img), size=(H // scale, W // scale), mode='bicubic', align_corners=False))
    assert _psnr_u8(plain, pil) < 52


# ---------------------------------------------------------------- JPEG vs PIL

@pytest.mark.parametrize('quality', [30, 60, 95])
def test_jpeg_matches_pil(astro, quality):
    ours = _t_to_u8(jpeg(_u8_to_t(astro), quality))

    def pil_jpeg(q):
        buf = io.BytesIO(); Image.fromarray(astro).save(buf, 'JPEG', quality=q)
        return np.asarray(Image.open(buf).convert('RGB'))
    ref = pil_jpeg(quality)
    # both use libjpeg(-turbo) with 4:2:0 chroma and standard tables; measured bit-identical here. The tolerance
    # (PSNR >= 48 dB, mean |diff| <= 0.25 levels) leaves room for another libjpeg build; JPEG itself costs 30-45 dB.
    assert _psnr_u8(ours, ref) >= 48
    assert np.abs(ours.astype(int) - ref.astype(int)).mean() <= 0.25
    assert _psnr_u8(ours, pil_jpeg(quality - 20)) < 48  # a wrong quality would fail


def test_jpeg_per_sample_quality_and_grey(astro):
    x = _u8_to_t(astro[:64, :64]).expand(3, -1, -1, -1)
    y = jpeg(x, [20, 90, 20])
    torch.testing.assert_close(y[0], y[2], atol=0, rtol=0)
    assert (y[0] - x[0]).abs().mean() > (y[1] - x[1]).abs().mean()
    g = _u8_to_t(data.camera()[:64, :64])
    buf = io.BytesIO(); Image.fromarray(data.camera()[:64, :64]).save(buf, 'JPEG', quality=50)
    ref = np.asarray(Image.open(buf))
    assert np.abs(_t_to_u8(jpeg(g, 50)).astype(int) - ref.astype(int)).mean() <= 0.25  # same tolerance as RGB


# ---------------------------------------------------------------- determinism and batching

SHUF = DegradeConfig(pipeline='shuffled', scale=4, poisson_prob=0.3)


def _batch(astro, n=4, size=64):
    crops = [astro[16 * i:16 * i + size, 20 * i:20 * i + size] for i in range(n)]
    return torch.cat([_u8_to_t(np.ascontiguousarray(c)) for c in crops])


def test_same_seed_same_output_different_seed_differs(astro):
    hr = _batch(astro)
    a, pa = degrade(hr, SHUF, 5)
    b, pb = degrade(hr, SHUF, [5, 6, 7, 8])  # int seed s means seeds s+i
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert pa == pb
    c, pc = degrade(hr, SHUF, torch.tensor([50, 60, 70, 80]))
    for i in range(4):
        assert not torch.equal(a[i], c[i]) and pa[i] != pc[i]
    assert a.shape == (4, 3, 16, 16) and a.min() >= 0 and a.max() <= 1


def test_sample_independent_of_batch_neighbours(astro):
    hr = _batch(astro)
    seeds = [11, 12, 13, 14]
    full, pf = degrade(hr, SHUF, seeds)
    for i in range(4):
        one, po = degrade(hr[i:i + 1], SHUF, [seeds[i]])
        torch.testing.assert_close(one[0], full[i], atol=1e-6, rtol=0)  # float tolerance; bitwise in practice on CPU
        assert po[0] == pf[i]
    # a different neighbour does not change sample 0
    other, _ = degrade(torch.cat([hr[:1], hr[:1].flip(-1)]), SHUF, [11, 99])
    torch.testing.assert_close(other[0], full[0], atol=1e-6, rtol=0)


def _ref_degrade_one(img, p, scale, kernel_size=21, hr_pixels=True):
    """Independent per-image reference from the drawn params: numpy kernels + scipy convolution (mirror edges),
    torch only for antialiased resizing and for replaying the noise generator."""
    x = img.double().numpy()  # (C,H,W)
    gen = torch.Generator().manual_seed(p['noise_seed'])
    small = False

    def gauss(s1, s2, th, size):
        R = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        inv = np.linalg.inv(R @ np.diag([s1 ** 2, s2 ** 2]) @ R.T)
        r = np.arange(size) - size // 2
        v, u = np.meshgrid(r, r, indexing='ij')
        k = np.exp(-0.5 * (inv[0, 0] * u * u + 2 * inv[0, 1] * u * v + inv[1, 1] * v * v))
        return k / k.sum()

    for op in p['order']:
        f = scale if (small and hr_pixels) else 1  # sigmas are in HR pixels unless hr_pixels=False
        size = 2 * math.ceil((kernel_size // 2) / f) + 1
        if op in ('blur_iso', 'blur_aniso'):
            k = gauss(p['iso_sigma'] / f, p['iso_sigma'] / f, 0, size) if op == 'blur_iso' else \
                gauss(p['aniso_sigma1'] / f, p['aniso_sigma2'] / f, p['aniso_theta'], size)
            x = np.stack([ndimage.convolve(c, k, mode='mirror') for c in x])
        elif op == 'resize':
            C, H, W = x.shape
            x = F.interpolate(torch.from_numpy(x).float()[None], size=(H // scale, W // scale), mode=p['resize_mode'],
                              **({'antialias': True} if p['resize_mode'] in ('bilinear', 'bicubic') else {}))[0].double().numpy()
            small = True
        elif op == 'noise':
            C, H, W = x.shape
            n = torch.randn((1 if p['noise_grey'] else C, H, W), generator=gen).double().numpy()
            x = x + p['noise_sigma'] * n
        elif op == 'poisson':
            lam = torch.from_numpy(np.clip(x, 0, 1) * p['poisson_peak']).float()
            x = torch.poisson(lam, generator=gen).double().numpy() / p['poisson_peak']
        elif op == 'jpeg':
            u8 = np.floor(np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
            buf = io.BytesIO(); Image.fromarray(u8).save(buf, 'JPEG', quality=p['jpeg_quality'])
            x = np.asarray(Image.open(buf)).transpose(2, 0, 1) / 255.0
        x = np.clip(x, 0, 1)
    return torch.from_numpy(x).float()


def test_batched_equals_independent_per_image_loop_without_jpeg(astro):
    cfg = DegradeConfig(pipeline='shuffled', scale=4, jpeg_prob=0.0, poisson_prob=0.5, down_modes=('bilinear', 'bicubic', 'area', 'nearest'))
    hr = _batch(astro, n=6)
    lr, ps = degrade(hr, cfg, 321)
    assert len({tuple(p['order']) for p in ps}) > 1  # several orders really are grouped in one batch
    for i in range(6):
        ref = _ref_degrade_one(hr[i], ps[i], 4)
        # float32 vs float64 convolution; a Poisson draw can differ where rate rounding differs, hence mean and max
        d = (lr[i] - ref).abs()
        assert d.mean() < 1e-5 and d.max() < 1e-3, (ps[i]['order'], d.mean().item(), d.max().item())


def test_bsrgan_pixel_units_option(astro):
    cfg = DegradeConfig(pipeline='shuffled', scale=2, jpeg_prob=0.0, sigma_in_hr_pixels=False)
    hr = _batch(astro, n=4)
    lr, ps = degrade(hr, cfg, 11)
    assert any(p['order'].index('resize') < p['order'].index('blur_aniso') for p in ps)  # a late blur is exercised
    for i in range(4):
        d = (lr[i] - _ref_degrade_one(hr[i], ps[i], 2, hr_pixels=False)).abs()
        assert d.mean() < 1e-5 and d.max() < 1e-3


def test_batched_equals_independent_per_image_loop_with_jpeg(astro):
    cfg = DegradeConfig(pipeline='shuffled', scale=2)
    hr = _batch(astro, n=4)
    lr, ps = degrade(hr, cfg, 7)
    for i in range(4):
        ref = _ref_degrade_one(hr[i], ps[i], 2)
        # a float-level difference before JPEG can flip a uint8 rounding and so a DCT coefficient: allow 1/255 on average
        assert (lr[i] - ref).abs().mean() < 1 / 255


def test_classic_batched_equals_loop(astro):
    hr = _batch(astro)
    lr, _ = degrade(hr, DegradeConfig(), 0)
    for i in range(4):
        torch.testing.assert_close(lr[i:i + 1], degrade(hr[i:i + 1], DegradeConfig(), 0)[0], atol=1e-6, rtol=0)


def test_gaussian_noise_statistics():
    x = torch.full((2, 3, 128, 128), 0.5)
    g = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    y = add_gaussian_noise(x, [5 / 255, 20 / 255], [False, True], g) - 0.5
    # std of 49k samples is within ~1% of sigma; no clipping at these levels around 0.5
    assert abs(y[0].std().item() - 5 / 255) < 0.03 * 5 / 255
    assert abs(y[1].std().item() - 20 / 255) < 0.03 * 20 / 255
    assert torch.equal(y[1, 0], y[1, 2]) and not torch.equal(y[0, 0], y[0, 2])


def test_resize_area_is_block_mean_and_modes():
    x = torch.rand(2, 3, 16, 24)
    torch.testing.assert_close(resize(x, 0.25, 'area'), x.reshape(2, 3, 4, 4, 6, 4).mean((3, 5)), atol=1e-6, rtol=0)
    assert resize(x, (8, 12), 'nearest').shape == (2, 3, 8, 12)


# ---------------------------------------------------------------- errors

def test_errors_name_the_fix():
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r'one of \(2, 3, 4, 8\)'):
        DegradeConfig(scale=5)
    with pytest.raises(ValueError, match='unknown pipeline.*classic'):
        DegradeConfig(pipeline='bsrgan')
    cfg = DegradeConfig(); cfg.pipeline = 'nope'  # mutated after construction: degrade re-validates
    with pytest.raises(ValueError, match='set pipeline to one of'):
        degrade(x, cfg)
    with pytest.raises(ValueError, match=r'not divisible by scale 4.*crop first'):
        degrade(torch.rand(1, 3, 30, 32), DegradeConfig())
    with pytest.raises(ValueError, match=r'hr\[None\]'):
        degrade(torch.rand(3, 32, 32), DegradeConfig())
    with pytest.raises(ValueError, match='from_model'):
        degrade(x * 2 - 1, DegradeConfig())
    with pytest.raises(TypeError, match='float'):
        degrade((x * 255).to(torch.uint8), DegradeConfig())
    with pytest.raises(ValueError, match='exactly 1 seeds'):
        degrade(x, DegradeConfig(pipeline='shuffled'), [1, 2])
    with pytest.raises(ValueError, match='kernel_size'):
        DegradeConfig(kernel_size=20)
    with pytest.raises(ValueError, match='jpeg_quality'):
        DegradeConfig(jpeg_quality=(50, 120))
    with pytest.raises(ValueError, match='down_modes'):
        DegradeConfig(down_modes=('lanczos',))
    with pytest.raises(ValueError, match='1 or 3 channels'):
        jpeg(torch.rand(1, 2, 8, 8), 50)
    assert set(PIPELINES) >= {'classic', 'shuffled'}


def test_input_not_modified_and_output_range(astro):
    hr = _batch(astro)
    before = hr.clone()
    for cfg in (DegradeConfig(), SHUF, DegradeConfig(pipeline='shuffled', scale=8, kernel_size=31)):
        lr, _ = degrade(hr, cfg, 3)
        assert torch.equal(hr, before)
        assert lr.shape == (4, 3, 64 // cfg.scale, 64 // cfg.scale) and lr.min() >= 0 and lr.max() <= 1


def test_grey_images_and_numpy_seeds():
    g = _u8_to_t(np.ascontiguousarray(data.camera()[:64, :64])).expand(3, -1, -1, -1)
    lr, ps = degrade(g, DegradeConfig(pipeline='shuffled', scale=2, poisson_prob=1.0), np.int64(4))
    assert lr.shape == (3, 1, 32, 32) and lr.min() >= 0 and lr.max() <= 1
    lr2, _ = degrade(g, DegradeConfig(pipeline='shuffled', scale=2, poisson_prob=1.0), np.array([4, 5, 6]))
    assert torch.equal(lr, lr2) and all('poisson' in p['order'] for p in ps)

def test_backproject_config_is_checked_where_the_task_is_built():
    "sample.backproject is a whole number >= 0 and needs the classic degradation it projects onto."
    from diffsr_kit.config import ConfigError
    from diffsr_kit.train import get_task, load_run_config
    root = Path(__file__).resolve().parents[1] / 'configs' / 'tiny_regression_x4.yaml'
    build = lambda *ov: get_task('regression')(load_run_config(str(root), list(ov)), torch.device('cpu'))
    assert build().cfg.sample.backproject == 1  # the shipped preset
    with pytest.raises(ConfigError, match='set sample.backproject=0'): build('data.pipeline=shuffled')
    build('data.pipeline=shuffled', 'sample.backproject=0')  # the raw network on shuffled LR is fine
    with pytest.raises(ConfigError, match='whole number'): build('sample.backproject=-1')
