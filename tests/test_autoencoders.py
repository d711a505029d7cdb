"Checks of diffsr_kit.models.autoencoders against independent references (torch.distributions, torch.cdist, scipy)."
import json
import os

import numpy as np
import pytest
import scipy.stats
import skimage.data
import torch
import torch.nn.functional as F

from diffsr_kit.core import img2tensor, to_model
from diffsr_kit.models.autoencoders import (
    VAE,
    VQVAE,
    AEConfig,
    DiagonalGaussian,
    autoencoder_step,
    build_autoencoder,
    estimate_scale_factor,
    load_autoencoder,
    nearest_code,
    save_autoencoder,
)

torch.set_num_threads(1)
SMALL = {'base_ch': 16, 'norm_groups': 8}   # small widths keep every test on one CPU core fast


@pytest.fixture(scope='module')
def astronaut():
    return to_model(img2tensor(skimage.data.astronaut()))  # (3, 512, 512) in [-1, 1]


def crops(img, n, size, seed):
    "n random size x size crops of a CHW image, reproducible from `seed`."
    g = torch.Generator().manual_seed(seed)
    H, W = img.shape[-2:]
    ys = torch.randint(0, H - size + 1, (n,), generator=g).tolist()
    xs = torch.randint(0, W - size + 1, (n,), generator=g).tolist()
    return torch.stack([img[:, y:y + size, x:x + size] for y, x in zip(ys, xs)])


# ---------------------------------------------------------------- shapes and errors
@pytest.mark.parametrize('kind', ['vae', 'vqvae'])
@pytest.mark.parametrize('f', [2, 4, 8])
def test_encode_decode_shapes(kind, f):
    torch.manual_seed(0)
    m = build_autoencoder(AEConfig(kind=kind, f=f, z_ch=3, codebook_size=32, **SMALL)).eval()
    x = torch.rand(2, 3, 32, 24) * 2 - 1
    with torch.no_grad():
        z = m.encode(x)
        assert z.shape == (2, 3, 32 // f, 24 // f)
        assert m.decode(z).shape == x.shape
        out = m(x)
    assert out.recon.shape == x.shape
    if kind == 'vqvae': assert out.indices.shape == (2, 32 // f, 24 // f)


def test_greyscale_input():
    m = build_autoencoder(AEConfig(kind='vae', in_ch=1, f=2, **SMALL)).eval()
    with torch.no_grad(): assert m(torch.zeros(1, 1, 8, 8)).recon.shape == (1, 1, 8, 8)


@pytest.mark.parametrize('f', [1, 3, 16])
def test_unsupported_factor_is_a_clear_error(f):
    with pytest.raises(ValueError, match=r'f=\d+ is not supported; use one of \(2, 4, 8\)'):
        AEConfig(f=f)
    with pytest.raises(ValueError, match='use one of'):
        build_autoencoder({'kind': 'vqvae', 'f': f})


def test_bad_inputs_are_clear_errors():
    m = build_autoencoder(AEConfig(kind='vae', f=4, **SMALL))
    with pytest.raises(ValueError, match='multiples of f=4'): m(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r'x\[None\]'): m(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="choose one of"): build_autoencoder({'kind': 'gan'})


# ---------------------------------------------------------------- VQ lookup and gradients
def test_nearest_code_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    z, e = torch.randn(3000, 8, generator=g), torch.randn(100, 8, generator=g)
    # reference: exact pairwise distances (no matrix-product shortcut), then argmin
    ref = torch.cdist(z.double(), e.double(), compute_mode='donot_use_mm_for_euclid_dist').argmin(1)
    assert torch.equal(nearest_code(z, e, chunk=256), ref)       # several chunks, one ragged
    assert torch.equal(nearest_code(z, e, chunk=10**6), ref)     # one chunk
    # a plain Python loop on a few rows
    for i in range(0, 3000, 500):
        best = min(range(100), key=lambda k: float(((z[i] - e[k]) ** 2).sum()))
        assert int(ref[i]) == best


def test_quantize_uses_nearest_codes():
    torch.manual_seed(0)
    m = VQVAE(AEConfig(kind='vqvae', z_ch=4, codebook_size=50, **SMALL))
    with torch.no_grad(): m.embed.normal_()
    ze = torch.randn(2, 4, 5, 6)
    zq, idx = m.quantize(ze)
    flat = ze.permute(0, 2, 3, 1).reshape(-1, 4)
    ref = torch.cdist(flat.double(), m.embed.detach().double(), compute_mode='donot_use_mm_for_euclid_dist').argmin(1)
    assert torch.equal(idx.flatten(), ref)
    assert torch.equal(zq.permute(0, 2, 3, 1).reshape(-1, 4), m.embed.detach()[ref])


@pytest.mark.parametrize('ema', [False, True])
def test_straight_through_gradient_reaches_encoder(ema):
    torch.manual_seed(0)
    m = VQVAE(AEConfig(kind='vqvae', f=4, codebook_size=32, ema=ema, **SMALL)).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    (m(x).recon - x).abs().mean().backward()      # reconstruction loss only, no commitment / codebook terms
    grads = [p.grad for p in m.encoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert float(m.encoder.conv_in.weight.grad.abs().sum()) > 0
    # control: decoding z_q without the straight-through estimator gives the encoder no gradient
    m.zero_grad(set_to_none=True)
    zq, _ = m.quantize(m.encoder(x))
    (m.decoder(zq) - x).abs().mean().backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in m.encoder.parameters())


# ---------------------------------------------------------------- VAE KL
def mc_kl(mean, logvar, S=20000, seed=0):
    "Monte-Carlo KL(q || N(0, I)) per sample: mean over S draws of log q(z) - log p(z); returns (estimate, std error)."
    torch.manual_seed(seed)
    q = torch.distributions.Normal(mean.double(), (0.5 * logvar.double()).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean.double()), torch.ones_like(mean.double()))
    z = q.sample((S,))
    r = (q.log_prob(z) - p.log_prob(z)).flatten(2).sum(-1)   # (S, N)
    return r.mean(0), r.std(0) / S ** 0.5


def test_kl_closed_form_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 4, 4, 4, generator=g)
    logvar = torch.rand(3, 4, 4, 4, generator=g) * 3 - 2          # sigma^2 in [e^-2, e^1]
    closed = DiagonalGaussian(mean, logvar).kl()
    est, se = mc_kl(mean, logvar)
    print('KL closed form', closed.tolist(), 'Monte Carlo', est.tolist(), '+-', se.tolist())
    # tolerance: 5 Monte-Carlo standard errors (20000 draws, fixed seed)
    assert torch.all((closed.double() - est).abs() < 5 * se)


def test_vae_kl_loss_matches_monte_carlo_on_its_posterior():
    torch.manual_seed(0)
    cfg = AEConfig(kind='vae', f=4, kl_weight=1e-3, **SMALL)
    m = VAE(cfg).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        q = m.posterior(x)
        out = m(x)
    est, se = mc_kl(q.mean, q.logvar)
    kl = out.losses['kl'].double() / cfg.kl_weight               # forward reports kl_weight * batch mean
    print('model KL', float(kl), 'Monte Carlo', float(est.mean()), '+-', float(se.pow(2).sum().sqrt() / 2))
    # tolerance: 5 standard errors of the batch-mean estimate
    assert abs(kl - est.mean()) < 5 * se.pow(2).sum().sqrt() / len(se)
    assert float(out.stats['kl']) > 1.0                           # a non-trivial posterior, not q = p


def test_vae_logvar_is_clamped():
    m = VAE(AEConfig(kind='vae', f=2, logvar_min=-3.0, logvar_max=2.0, **SMALL))
    with torch.no_grad():
        m.encoder.conv_out.bias[4:].fill_(100.0)                  # push log-variance far above the clamp
        q = m.posterior(torch.zeros(1, 3, 8, 8))
    assert float(q.logvar.max()) <= 2.0 and torch.isfinite(q.kl()).all()


# ---------------------------------------------------------------- latent scale factor
@pytest.mark.parametrize('kind', ['vae', 'vqvae'])
def test_scale_factor_gives_unit_std(kind, astronaut):
    torch.manual_seed(0)
    m = build_autoencoder(AEConfig(kind=kind, f=4, codebook_size=32, **SMALL))
    batches = [crops(astronaut, 6, 32, s) for s in range(3)]
    with torch.no_grad():
        raw = torch.cat([m.eval().encode(b) for b in batches])
    assert abs(float(raw.std()) - 1) > 0.1                       # the test is not trivially satisfied
    sf = estimate_scale_factor(m, ((b, 'label') for b in batches))  # tuples: first item is the image
    assert float(m.scale_factor) == pytest.approx(sf)
    assert 'scale_factor' in m.state_dict()
    with torch.no_grad():
        z = torch.cat([m.encode_scaled(b) for b in batches])
        back = m.decode_scaled(z[:6])
        ref = m.decode(raw[:6])
    # tolerance: 1e-3 (population vs sample std over ~1500 values differ by ~3e-4)
    assert abs(float(z.std()) - 1) < 1e-3
    assert torch.allclose(back, ref, atol=1e-5)


def test_scale_factor_errors():
    m = build_autoencoder(AEConfig(kind='vae', f=2, **SMALL))
    with pytest.raises(ValueError, match='empty'): estimate_scale_factor(m, [])
    with pytest.raises(ValueError, match="key="): estimate_scale_factor(m, [{'hr': torch.zeros(1, 3, 8, 8)}])


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize('kind,ema', [('vae', False), ('vqvae', False), ('vqvae', True)])
def test_save_load_roundtrip(kind, ema, astronaut, tmp_path):
    torch.manual_seed(0)
    cfg = AEConfig(kind=kind, f=4, codebook_size=32, ema=ema, **SMALL)
    m = build_autoencoder(cfg)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    for s in range(3):                                            # a few steps: non-trivial EMA / usage buffers
        loss, _ = autoencoder_step(m.train(), crops(astronaut, 4, 16, s))
        opt.zero_grad(); loss.backward(); opt.step()
    estimate_scale_factor(m, [crops(astronaut, 4, 16, 9)])
    x = crops(astronaut, 4, 16, 10)
    with torch.no_grad(): ref = m.eval()(x).recon

    save_autoencoder(m, cfg, tmp_path / 'fp32')
    assert sorted(os.listdir(tmp_path / 'fp32')) == ['config.json', 'model.safetensors']   # no pickles, no temp files
    assert json.loads((tmp_path / 'fp32' / 'config.json').read_text())['kind'] == kind
    m2, cfg2 = load_autoencoder(tmp_path / 'fp32')
    assert cfg2 == cfg and not m2.training
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad(): assert torch.equal(m2(x).recon, ref)   # fp32: exactly equal

    save_autoencoder(m, cfg, tmp_path / 'fp16', fp16=True)
    m3, _ = load_autoencoder(tmp_path / 'fp16')
    assert float(m3.scale_factor) == float(m.scale_factor)      # kept in float32
    with torch.no_grad(): err = (m3(x).recon - ref).abs()
    print(kind, 'ema' if ema else '', 'fp16 round trip: mean abs err', float(err.mean()), 'max', float(err.max()))
    # tolerance: fp16 weights carry ~5e-4 relative error; for images in [-1, 1] we allow mean 5e-3, max 0.1
    # (the max is loose because a VQ code can flip to a near-tied neighbour)
    assert float(err.mean()) < 5e-3 and float(err.max()) < 0.1
    assert (tmp_path / 'fp16' / 'model.safetensors').stat().st_size < 0.6 * (tmp_path / 'fp32' / 'model.safetensors').stat().st_size


def test_save_is_atomic(tmp_path, monkeypatch):
    cfg = AEConfig(kind='vae', f=2, **SMALL)
    m = build_autoencoder(cfg)
    save_autoencoder(m, cfg, tmp_path)
    before = (tmp_path / 'model.safetensors').read_bytes()
    import safetensors.torch
    def broken(tensors, path, metadata=None):
        with open(path, 'wb') as fh: fh.write(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(safetensors.torch, 'save_file', broken)
    with torch.no_grad(): m.decoder.conv_out.bias.add_(1.0)
    with pytest.raises(OSError, match='disk full'): save_autoencoder(m, cfg, tmp_path)
    assert (tmp_path / 'model.safetensors').read_bytes() == before    # old checkpoint intact
    assert sorted(os.listdir(tmp_path)) == ['config.json', 'model.safetensors']


def test_load_missing_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match='save_autoencoder'): load_autoencoder(tmp_path)


# ---------------------------------------------------------------- dead-code restart
def run_collapsed(restart, astronaut, steps=150):
    "Train a K=64 VQ-VAE whose codebook starts far from every encoder output; return the model."
    torch.manual_seed(0)
    cfg = AEConfig(kind='vqvae', f=4, codebook_size=64, init_from_data=False,
                   restart_dead=restart, dead_after=10, restart_every=5, **SMALL)
    m = VQVAE(cfg)
    # deliberately bad initialisation, the same in both runs: all codes far from the encoder outputs, on one ray
    # at distances 5, 10, ..., 320, so every latent vector first picks code 0 and the others never get used
    u = F.normalize(torch.ones(cfg.z_ch), dim=0)
    with torch.no_grad(): m.embed.copy_((5.0 + 5.0 * torch.arange(64.0))[:, None] * u)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    m.train()
    for s in range(steps):
        loss, _ = autoencoder_step(m, crops(astronaut, 8, 16, 1000 + s))
        opt.zero_grad(); loss.backward(); opt.step()
    return m.eval()


def test_dead_code_restart_raises_codebook_usage(astronaut):
    held_out = crops(astronaut, 16, 16, 99)                       # 16 crops -> 256 latent vectors
    res = {}
    for restart in (False, True):
        m = run_collapsed(restart, astronaut)
        with torch.no_grad(): out = m(held_out)
        idx = out.indices.flatten().numpy()
        used = len(np.unique(idx))                                 # independent of codebook_usage
        counts = np.bincount(idx, minlength=64)
        ppl = float(np.exp(scipy.stats.entropy(counts)))           # scipy normalises the counts
        assert float(out.stats['perplexity']) == pytest.approx(ppl, rel=1e-4)
        assert int(out.stats['codes_used']) == used
        res[restart] = (used, ppl)
    print(f'codes used / perplexity on a held-out batch: without restart {res[False]}, with restart {res[True]}')
    # robust margins: the collapsed run keeps a handful of codes, the restarted one uses many
    assert res[True][0] >= 16 and res[True][0] >= 3 * res[False][0]
    assert res[True][1] > 2 * res[False][1]


def test_ema_codebook_moves_to_cluster_means():
    "With decay 0, one EMA step sets every used code to the mean of its assigned vectors (Laplace smoothing ~ exact)."
    torch.manual_seed(0)
    m = VQVAE(AEConfig(kind='vqvae', z_ch=2, codebook_size=3, ema=True, ema_decay=0.0, ema_eps=1e-9,
                       init_from_data=False, restart_dead=False, **SMALL))
    flat = torch.randn(200, 2)
    idx = nearest_code(flat, m.embed)
    m._ema_update(flat, idx)
    for k in idx.unique().tolist():
        assert torch.allclose(m.embed[k], flat[idx == k].mean(0), atol=1e-5)

def test_grouped_vq_equals_per_group_brute_force():
    # each group of each latent vector maps to its own nearest code (brute-force cdist reference)
    torch.manual_seed(0)
    vq = VQVAE(AEConfig(kind='vqvae', f=4, z_ch=8, groups=4, codebook_size=32)).eval()
    z = torch.randn(3, 8, 5, 6)
    zq, idx = vq.quantize(z)
    assert idx.shape == (3, 4, 5, 6)
    for g in range(4):
        part = z[:, 2 * g:2 * g + 2].permute(0, 2, 3, 1).reshape(-1, 2)
        ref = torch.cdist(part.double(), vq.codebook.double()).argmin(1).view(3, 5, 6)
        assert torch.equal(idx[:, g], ref)
        assert torch.equal(zq[:, 2 * g:2 * g + 2], vq.codebook[ref].permute(0, 3, 1, 2))

@pytest.mark.parametrize('kind', ['vae', 'vqvae'])
def test_shortcut_starts_as_the_pca_code(kind):
    # after the first training batch the shortcut pair is the PCA code of the f x f blocks (numpy eigh reference)
    torch.manual_seed(1)
    unshuffle = torch.nn.functional.pixel_unshuffle
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    m = build_autoencoder(AEConfig(kind=kind, f=4, z_ch=8, shortcut=True)).train()
    m(x)                                          # the first training call initialises the shortcut
    B = unshuffle(x, 4).permute(0, 2, 3, 1).reshape(-1, 48).double().numpy()
    mu = B.mean(0)
    _, V = np.linalg.eigh(np.cov(B.T))
    P = V[:, ::-1][:, :8]                         # top-8 principal directions
    with torch.no_grad():
        z = m.encoder.skip(unshuffle(x, 4)).permute(0, 2, 3, 1).reshape(-1, 8).double().numpy()
        out = m.decoder.skip(m.encoder.skip(unshuffle(x, 4))).permute(0, 2, 3, 1).reshape(-1, 48).double().numpy()
    z_ref = (B - mu) @ P
    for j in range(8):                            # each latent channel is a principal coefficient (up to sign)
        assert abs(abs(np.corrcoef(z[:, j], z_ref[:, j])[0, 1]) - 1) < 1e-6
    assert np.abs(out - (z_ref @ P.T + mu)).max() < 1e-4   # the pair reconstructs the rank-8 PCA projection
