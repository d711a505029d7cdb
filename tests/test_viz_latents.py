"Checks of viz.latents against independent references: scikit-image metrics, scipy entropy, numpy eigh, numpy CSV parsing."
import math, warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import entropy
from skimage.metrics import peak_signal_noise_ratio as sk_psnr, structural_similarity as sk_ssim

from diffsr_kit.bench import held_out_crops
from diffsr_kit.config import load_config
from diffsr_kit.models.autoencoders import AEConfig, build_autoencoder
from diffsr_kit.tasks import AERunConfig
from diffsr_kit.train import train, load_task
from diffsr_kit.viz.degrade import set_knobs
from diffsr_kit.viz.latents import (CEILING_KEYS, as_autoencoder, autoencoder_ceiling, collect_models, image_crops, interpolate_latents,
                                    latent_explorer, latent_pca, read_log, code_usage, autoencode)

STEPS = 12
SK_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1)


@pytest.fixture(scope='module')
def vq_run(tmp_path_factory):
    "A VQ-VAE (f=4) trained for a few steps through `train`, logging every step."
    out = tmp_path_factory.mktemp('vq')
    ov = ['model.kind=vqvae', 'model.base_ch=8', 'model.ch_mult=[1,2,2]', 'model.norm_groups=4', 'model.f=4',
          'model.codebook_size=32', 'data.patch=32', 'data.batch=4', 'data.val_images=2', f'run.steps={STEPS}',
          'run.log_every=1', 'run.val_every=0', 'run.ckpt_every=0', 'run.progress=false', 'scale_batches=1',
          'optim.lr=1e-3', 'optim.ema=0', f'run.out={out}']
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='Left out')
        return train(load_config(AERunConfig, None, ov))


@pytest.fixture(scope='module')
def vq(vq_run):
    return load_task(vq_run).modules['ae'].eval()


@pytest.fixture(scope='module')
def vae():
    torch.manual_seed(0)
    return build_autoencoder(AEConfig(kind='vae', f=2, base_ch=8, norm_groups=4, ch_mult=(1, 2))).eval()


def to_hwc(t):
    return t.permute(0, 2, 3, 1).double().numpy()


def bicubic_down_up(hr, f):
    "Bicubic (antialiased) down by f, bicubic back up, clamped: the same arrays `recon_metrics` scores, built here with torch directly."
    H, W = hr.shape[-2:]
    lo = F.interpolate(hr, size=(H // f, W // f), mode='bicubic', align_corners=False, antialias=True)
    return F.interpolate(lo, size=(H, W), mode='bicubic', align_corners=False, antialias=True).clamp(0, 1)


def test_ceiling_matches_skimage_and_scipy(vq_run, vq, vae):
    rows = autoencoder_ceiling({'vae': vae, 'vq': vq_run}, split='test', size=64)
    assert [tuple(r) for r in rows] == [CEILING_KEYS] * 2 == [('model', 'f', 'psnr', 'ssim', 'bicubic_psnr', 'perplexity', 'per_pixel')] * 2
    assert [r['per_pixel'] for r in rows] == [vae.cfg.z_ch / 4, as_autoencoder(vq_run).cfg.z_ch / 16]  # z_ch / f^2
    assert [(r['model'], r['f']) for r in rows] == [('vae', 2), ('vq', 4)]
    hr = torch.stack(list(held_out_crops('test', 64).values()))
    assert len(hr) >= 3
    for row, ae in zip(rows, (vae, vq)):
        with torch.no_grad():
            out = ae(hr * 2 - 1)
        rec = to_hwc(((out.recon + 1) / 2).clamp(0, 1))
        ref, bic = to_hwc(hr), to_hwc(bicubic_down_up(hr, row['f']))
        # PSNR: float32 images scored in float64 on both sides; agreement to 1e-6 dB
        assert row['psnr'] == pytest.approx(np.mean([sk_psnr(r, x, data_range=1.0) for r, x in zip(ref, rec)]), abs=1e-6)
        assert row['bicubic_psnr'] == pytest.approx(np.mean([sk_psnr(r, b, data_range=1.0) for r, b in zip(ref, bic)]), abs=1e-6)
        # SSIM (Gaussian window, population covariance): the kit's mean leaves out the same 5-px margin skimage does
        assert row['ssim'] == pytest.approx(np.mean([sk_ssim(x, r, **SK_SSIM) for r, x in zip(ref, rec)]), abs=1e-5)
        if row['model'] == 'vae':
            assert row['perplexity'] is None
        else:
            counts = np.bincount(out.indices.flatten().numpy(), minlength=vq.cfg.codebook_size)
            assert (counts > 0).sum() > 1  # a trained codebook uses several codes, so the check is not trivially exp(0) = 1
            assert row['perplexity'] == pytest.approx(math.exp(entropy(counts)), rel=1e-5)  # float32 entropy on our side


def test_ceiling_and_models_errors(vae):
    with pytest.raises(ValueError, match='not a multiple of f'):
        autoencoder_ceiling({'vae': vae}, size=63)
    with pytest.raises(ValueError, match='has f=2'):
        collect_models({'vae': {4: vae}})
    with pytest.raises(FileNotFoundError, match='not found'):
        autoencoder_ceiling(['/nonexistent/run'])


def test_code_usage_counts(vq):
    x = image_crops(['astronaut', 'chelsea'], 32)
    u = code_usage(vq, x)
    with torch.no_grad():
        idx = vq(x * 2 - 1).indices.numpy()
    counts = np.bincount(idx.ravel(), minlength=vq.cfg.codebook_size)
    np.testing.assert_array_equal(u['hist'], counts)
    assert u['codes_used'] == (counts > 0).sum() and u['unused'] == vq.cfg.codebook_size - (counts > 0).sum()
    assert u['perplexity'] == pytest.approx(math.exp(entropy(counts)), rel=1e-5)


def eigh_pca(X):
    "Reference PCA by eigen-decomposition of the covariance (not SVD): directions sorted by variance."
    Xc = X - X.mean(0)
    w, V = np.linalg.eigh(Xc.T @ Xc)
    order = np.argsort(w)[::-1]
    return Xc @ V[:, order], w[order]


@pytest.mark.parametrize('window', [1, 2])
def test_pca_matches_eigh(vq, window):
    names = ['astronaut', 'chelsea', 'gravel']
    x = image_crops(names, 32)
    p = latent_pca(vq, dict(zip(names, x)), window=window, quantized=False)
    with torch.no_grad():
        z = vq.encoder(x * 2 - 1).double()                            # z_e, (N, C, h, w)
    N, C, h, w = z.shape
    k = window
    X = z.reshape(N, C, h // k, k, w // k, k).permute(0, 2, 4, 1, 3, 5).reshape(-1, C * k * k).numpy()
    np.testing.assert_allclose(p['vectors'], X, atol=1e-5)            # float32 latents, one image at a time vs a batch
    np.testing.assert_array_equal(p['labels'], np.repeat(np.arange(N), (h // k) * (w // k)))
    ref, var = eigh_pca(p['vectors'])                                  # the PCA itself, on the same matrix
    assert var[1] > 1.01 * var[2] and var[0] > 1.01 * var[1]          # distinct eigenvalues: directions are well defined
    for j in range(2):
        s = np.sign(ref[:, j] @ p['coords'][:, j])                     # principal directions are defined up to sign
        np.testing.assert_allclose(p['coords'][:, j], s * ref[:, j], atol=1e-8 * np.abs(ref).max())
    np.testing.assert_allclose(p['explained'], var[:2] / var.sum(), rtol=1e-8)


@pytest.mark.parametrize('which', ['vae', 'vq'])
def test_interpolation_endpoints_are_the_decodes(which, vae, vq):
    ae = {'vae': vae, 'vq': vq}[which]
    x = image_crops(['astronaut', 'chelsea'], 32)
    r = interpolate_latents(ae, x[0], x[1], alphas=[0.0, 0.5, 1.0])
    with torch.no_grad():
        d = [((ae.decode(ae.encode(t[None] * 2 - 1)) + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy() for t in x]
    np.testing.assert_allclose(r['images'][0], d[0], atol=1e-5)       # batched vs single decode (float32)
    np.testing.assert_allclose(r['images'][-1], d[1], atol=1e-5)
    assert not np.allclose(r['images'][1], r['images'][0], atol=1e-3)
    np.testing.assert_allclose(r['pixel'][1], x.mean(0).permute(1, 2, 0).numpy(), atol=1e-6)


def test_widget_changes_with_image_and_model(vq_run, vae):
    w = latent_explorer({'VAE': vae, 'VQ': vq_run}, names=['astronaut', 'chelsea'], size=32, show=False)
    r0 = w.result
    assert (r0['model'], r0['f'], r0['image']) == ('VAE', 2, 'astronaut')
    r1 = set_knobs(w, image='chelsea')
    assert r1['image'] == 'chelsea'
    assert not np.array_equal(r0['hr'], r1['hr']) and not np.array_equal(r0['recon'], r1['recon'])
    r2 = set_knobs(w, model='VQ')                                      # no VQ with f=2: the result says so
    assert r2['missing'] is not None and 'f=2' in r2['missing']
    r3 = set_knobs(w, f=4)
    assert r3['missing'] is None and r3['indices'].shape == (1, 8, 8) and r3['z'].shape == (1, 4, 8, 8)
    assert not np.array_equal(r3['recon'], r1['recon'])
    ref = autoencode(load_task(vq_run).modules['ae'], image_crops(['chelsea'], 32))
    np.testing.assert_allclose(r3['recon'], ref['recon'], atol=1e-6)


def test_read_log_returns_logged_values(vq_run):
    log = read_log(vq_run)
    ref = np.genfromtxt(vq_run / 'log.csv', delimiter=',', names=True)  # independent CSV parser
    assert set(ref.dtype.names) == set(log)
    for c in ref.dtype.names:
        np.testing.assert_array_equal(log[c], ref[c])
    np.testing.assert_array_equal(log['step'], np.arange(1, STEPS + 1))
    assert {'perplexity', 'codes_used', 'dead_codes'} <= set(log)
    assert (log['perplexity'] >= 1).all() and (log['codes_used'] <= 32).all()
    sub = read_log(vq_run / 'log.csv', ['step', 'perplexity'])
    assert list(sub) == ['step', 'perplexity']
    with pytest.raises(KeyError, match='no column'):
        read_log(vq_run, ['nope'])
    with pytest.raises(FileNotFoundError, match='No training log'):
        read_log(vq_run / 'ckpt')
