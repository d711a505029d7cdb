"""The Gradio demo: the upscale function called directly, then the app through gradio_client on 127.0.0.1,
then `diffsr demo` (demo_cli_run) in a subprocess. References are PIL and scikit-image, never the demo itself."""
import io, os, signal, socket, struct, subprocess, sys, tempfile, time, warnings, zlib
from pathlib import Path

os.environ['GRADIO_ANALYTICS_ENABLED'] = 'False'

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from skimage.metrics import peak_signal_noise_ratio as sk_psnr, structural_similarity as sk_ssim

from diffsr_kit.data import load_image
from diffsr_kit.core import assets_dir
ASSETS_DIR = assets_dir()
from diffsr_kit.demo import (MODELS, DemoConfig, DemoInputError, SRModel, bicubic_upsample, free_port, launch_demo,
                             make_demo, models_available, read_upload, register_model, upscale)

pytestmark = [pytest.mark.filterwarnings('ignore:.*no_silent_downcasting'),  # pandas 3 deprecations inside Gradio's queue
              pytest.mark.filterwarnings('ignore:The copy keyword is deprecated')]

WAIT = 120  # seconds: upper bound on any single wait (server start, one request) on a loaded 2-core machine


# ---------------------------------------------------------------- helpers and files

def png16(path, a):
    "Write a 16-bit PNG (grey, RGB or RGBA) by hand: PIL cannot write 16-bit colour."
    h, w, c = a.shape
    raw = b''.join(b'\x00' + a[y].astype('>u2').tobytes() for y in range(h))
    chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xffffffff)
    ihdr = struct.pack('>IIBBBBB', w, h, 16, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    Path(path).write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))

def pil_resize(a, size):
    "PIL's bicubic on each channel of a float HWC array (the independent reference); size = (w, h)."
    return np.stack([np.asarray(Image.fromarray(a[..., c].astype(np.float32)).resize(size, Image.BICUBIC))
                     for c in range(a.shape[-1])], -1)

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('demo_inputs')
    rgb = (load_image('chelsea')[100:148, 200:240] * 255 + 0.5).astype(np.uint8)  # real photo crop, 48x40 (HxW)
    f = dict(rgb=rgb)
    Image.fromarray(rgb).save(d / 'good.png'); f['good'] = d / 'good.png'
    Image.fromarray(rgb).save(d / 'good.jpg', quality=95); f['jpeg'] = d / 'good.jpg'
    Image.fromarray(rgb).save(d / 'good.webp', lossless=True); f['webp'] = d / 'good.webp'
    Image.fromarray(rgb).save(d / 'good.tif'); f['tiff'] = d / 'good.tif'
    g16 = (np.arange(40 * 48).reshape(40, 48) * 34).astype(np.uint16)
    Image.fromarray(g16).save(d / 'grey16.png'); f['grey16'], f['g16'] = d / 'grey16.png', g16
    rgba16 = np.random.default_rng(1).integers(0, 65536, (40, 48, 4)).astype(np.uint16)
    png16(d / 'rgba16.png', rgba16); f['rgba16'], f['rgba16_a'] = d / 'rgba16.png', rgba16
    rgba = np.random.default_rng(2).integers(0, 256, (40, 48, 4)).astype(np.uint8)
    Image.fromarray(rgba).save(d / 'rgba.png'); f['rgba'], f['rgba_a'] = d / 'rgba.png', rgba
    (d / 'notes.txt').write_text('these are not pixels\n' * 20); f['text'] = d / 'notes.txt'
    noise = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / 'noise.png')
    (d / 'corrupt.png').write_bytes((d / 'noise.png').read_bytes()[:4000]); f['corrupt'] = d / 'corrupt.png'
    Image.fromarray(noise).resize((100, 90)).save(d / 'big.png'); f['big'] = d / 'big.png'  # > 64 (server limit)
    Image.fromarray(rgb).save(d / 'anim.gif'); f['gif'] = d / 'anim.gif'
    (d / 'empty.png').write_bytes(b''); f['empty'] = d / 'empty.png'
    return f

def toy_model():
    "A stochastic stand-in for a diffusion model: bicubic x2 plus seeded noise, with a 25-frame trajectory."
    def run(lr, sampler=None, steps=None, seed=0, n_samples=1, progress=None):
        g = torch.Generator().manual_seed(seed)
        base = bicubic_upsample(lr, 2).expand(n_samples, -1, -1, -1)
        noise = torch.randn(base.shape, generator=g)
        traj = []
        for k in range(steps):
            traj.append((base[0] + noise[0] * (1 - (k + 1) / steps)).clamp(0, 1))
            if progress: progress((k + 1) / steps, desc='toy')
        return dict(sr=(base + 0.1 * noise).clamp(0, 1), trajectory=traj)
    return SRModel('toy-x2', 2, {'fade': 25, 'fast': 5}, run, 'test stand-in')

def missing_model():
    raise FileNotFoundError('assets/nothing-x4/ema.safetensors is missing; run make assets')

def broken_model():
    "A model that fails at run time: a bug must become a message, not a dead server."
    def run(lr, sampler=None, steps=None, seed=0, n_samples=1, progress=None):
        if seed == 7: return dict(sr=torch.zeros(1, 3, 5, 5), trajectory=[])  # wrong size
        raise RuntimeError('CUDA out of memory (simulated)')
    return SRModel('broken-x2', 2, {}, run)

REGISTRY = {**MODELS, 'toy-x2': toy_model, 'missing-x4': missing_model, 'broken-x2': broken_model}


# ---------------------------------------------------------------- the function, called directly

def test_bicubic_baseline_matches_pil():
    a = np.random.default_rng(0).random((7, 9, 3), dtype=np.float32)
    x = torch.from_numpy(a.transpose(2, 0, 1))[None]
    for s in (2, 4, 8):
        ref = np.clip(pil_resize(a, (9 * s, 7 * s)), 0, 1)
        got = bicubic_upsample(x, s)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)  # float32 rounding only
        out = MODELS[f'bicubic-x{s}']().run(x, n_samples=3)
        assert out['sr'].shape == (3, 3, 7 * s, 9 * s) and out['trajectory'] == []

def test_default_model_is_a_trained_one_when_its_checkpoint_exists():
    from diffsr_kit.demo import default_model, models_available, default_models
    models, missing = models_available()
    shipped = [n for n in default_models() if n in models]
    if (ASSETS_DIR / 'tiny_sr4_x4' / 'meta.json').exists(): assert 'sr4-x4' in shipped
    assert default_model(models, 4) == (shipped[0] if shipped else 'bicubic-x4')
    assert default_model({'bicubic-x4': models['bicubic-x4']}, 4) == 'bicubic-x4'  # nothing trained: bicubic
    assert default_model(models, 3) is None
    r = upscale(sample='astronaut', scale=4, steps=2)
    assert r.metrics['model'] == default_model(models, 4)
    assert (r.metrics['model'] != 'bicubic-x4') == bool(shipped)

def test_good_png_gives_sr_of_the_right_size(files):
    r = upscale(image=files['good'], sample=None, scale=4, degradation='none', model='bicubic-x4')
    assert r.metrics['model'] == 'bicubic-x4'
    np.testing.assert_array_equal(r.lr, files['rgb'])  # lossless PNG read exactly
    assert r.sr.shape == (48 * 4, 40 * 4, 3) and r.sr.dtype == np.uint8 and r.bicubic.shape == r.sr.shape
    buf = io.BytesIO(); Image.fromarray(r.sr).save(buf, 'PNG')  # PNG-able, and the round trip is exact
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(buf.getvalue()))), r.sr)
    ref = np.clip(pil_resize(files['rgb'] / 255.0, (160, 192)), 0, 1)
    assert np.abs(r.sr / 255.0 - ref).max() <= 0.5 / 255 + 1e-5  # uint8 rounding of PIL's bicubic
    assert r.hr is None and 'psnr' not in r.metrics['sr'] and r.std_map is None and r.trajectory == []

def test_metrics_match_an_independent_pipeline(files):
    "classic x2 on an upload: LR, PSNR, SSIM and LR-PSNR recomputed with PIL and scikit-image."
    r = upscale(image=files['good'], sample=None, scale=2, model='bicubic-x2', degradation='classic')
    hr = files['rgb'] / 255.0
    lr = np.clip(pil_resize(hr, (20, 24)), 0, 1)
    sr = np.clip(pil_resize(lr, (40, 48)), 0, 1)
    assert np.abs(r.lr / 255.0 - lr).max() <= 0.5 / 255 + 1e-5
    m = r.metrics['sr']
    assert abs(m['psnr'] - sk_psnr(hr, sr, data_range=1)) < 1e-3  # float32 vs float64, and 4-decimal rounding
    ref_ssim = sk_ssim(hr, sr, data_range=1, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert abs(m['ssim'] - ref_ssim) < 1e-3
    assert abs(m['lr_psnr'] - sk_psnr(lr, np.clip(pil_resize(sr, (20, 24)), 0, 1), data_range=1)) < 1e-2
    assert r.metrics['seconds_model'] >= 0 and r.metrics['seconds_total'] >= r.metrics['seconds_model']

@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_matches_pil(tmp_path, orientation):
    a = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)  # non-square, no symmetry
    im = Image.fromarray(a); exif = im.getexif(); exif[0x0112] = orientation
    im.save(tmp_path / 'o.png', exif=exif)
    ref = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / 'o.png')).convert('RGB')) / 255.0
    got, notes = read_upload(tmp_path / 'o.png')
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert any('EXIF orientation' in n for n in notes) == (orientation != 1)

def test_conversions_are_correct_and_noted(files):
    a, notes = read_upload(files['grey16'])
    np.testing.assert_allclose(a, np.repeat(files['g16'][..., None] / 65535.0, 3, -1), atol=1e-6)
    assert '16-bit' in notes[0] and 'RGB' in notes[0]
    a, notes = read_upload(files['rgba'])
    c, al = files['rgba_a'][..., :3] / 255.0, files['rgba_a'][..., 3:] / 255.0
    np.testing.assert_allclose(a, c * al + (1 - al), atol=1e-6)  # over white
    assert any('alpha' in n for n in notes)
    a, notes = read_upload(files['rgba16'])  # PIL keeps the high byte of 16-bit colour
    hi = (files['rgba16_a'] >> 8) / 255.0
    np.testing.assert_allclose(a, hi[..., :3] * hi[..., 3:] + (1 - hi[..., 3:]), atol=1e-6)
    assert any('alpha' in n for n in notes) and any('16-bit' in n for n in notes)
    a, notes = read_upload(files['good'])
    assert notes == []

@pytest.mark.parametrize('fmt', ['jpeg', 'webp', 'tiff'])
def test_jpeg_webp_tiff_are_read(files, fmt):
    a, notes = read_upload(files[fmt])
    ref = np.asarray(Image.open(files[fmt]).convert('RGB')) / 255.0
    np.testing.assert_allclose(a, ref, atol=1e-6)
    if fmt != 'jpeg': np.testing.assert_array_equal((a * 255).round(), files['rgb'])  # lossless ones are exact

BAD = [  # file key, DemoInputError.kind, the documented start of the message
    ('text', 'not_image', 'is not an image file'),
    ('corrupt', 'corrupt', 'could not be decoded'),
    ('big', 'too_large', 'is too large'),
    ('gif', 'format', 'is a GIF file; the demo accepts'),
    ('empty', 'empty', 'is empty'),
]

@pytest.mark.parametrize('key,kind,msg', BAD)
def test_bad_files_give_documented_messages(files, key, kind, msg):
    with pytest.raises(DemoInputError, match=msg) as e:
        upscale(image=files[key], sample=None, scale=2, degradation='none', cfg=DemoConfig(max_lr_side=64))
    assert e.value.kind == kind

def test_bad_options_give_documented_messages(files):
    kw = dict(image=files['good'], sample=None, degradation='none', registry=REGISTRY)
    cases = [(dict(scale=2, model='bicubic-x4'), "upscales by 4, not 2"),
             (dict(scale=4, model='nope'), "Unknown model 'nope'"),
             (dict(scale=4, model='missing-x4'), "not available: assets/nothing-x4"),
             (dict(scale=2, model='toy-x2', sampler='ddim'), "no sampler 'ddim'"),
             (dict(scale=2, model='toy-x2', steps=5000), "steps=5000"),
             (dict(scale=2, n_samples=99), "n_samples=99"),
             (dict(scale=2, seed=-1), "seed=-1"),
             (dict(scale=2, degradation='blurry'), "degradation='blurry'"),
             (dict(scale=3), r"scale=3: no model here upscales by 3; use one of the scales \[2, 4, 8\]"),
             (dict(scale=1), r"scale=1: use a whole number from 2 to 16"),
             (dict(scale=2, model='toy-x2', steps=-1), r"steps=-1: use a whole number from 0 to \d+ \(0: the model's default\)"),
             (dict(scale=4, model='missing-x4'), "Usable here: "),
             (dict(image=None, sample='no_such_image', scale=2), "sample='no_such_image': Unknown image")]
    for extra, msg in cases:
        with pytest.raises(DemoInputError, match=msg): upscale(**{**kw, **extra})
    with pytest.raises(DemoInputError, match='No image'): upscale(image=None, sample=None)
    r = upscale(**{**kw, 'scale': 2, 'model': 'toy-x2', 'steps': '0'})  # '0' (a text box) means the model's default, as 0 does
    assert r.metrics['steps'] == 25
    with pytest.raises(DemoInputError, match='too small'):  # 48x40 HR at x8 -> 6x5 LR
        upscale(image=files['good'], sample=None, scale=8, degradation='classic')

def test_model_failures_are_reported(files):
    kw = dict(image=files['good'], sample=None, scale=2, model='broken-x2', degradation='none', registry=REGISTRY)
    with pytest.raises(RuntimeError, match='simulated'): upscale(**kw)
    with pytest.raises(RuntimeError, match=r'expected \(K, 3, 96, 80\)'): upscale(**kw, seed=7)

def test_samples_trajectory_diversity_and_progress(files):
    seen = []
    r = upscale(image=files['good'], sample=None, scale=2, model='toy-x2', seed=3, n_samples=3, degradation='none',
                registry=REGISTRY, cfg=DemoConfig(max_frames=10), progress=lambda f, desc=None: seen.append(f))
    assert r.metrics['sampler'] == 'fade' and r.metrics['steps'] == 25  # the model's defaults
    assert len(r.samples) == 3 and len(r.trajectory) == 10
    assert r.trajectory[0][1] == '1/25' and r.trajectory[-1][1] == '25/25'
    # the diversity number against numpy's std of the model's own float output (ddof=1, channel mean)
    lr = torch.from_numpy(files['rgb'].transpose(2, 0, 1) / 255.0).float()[None]
    sr = toy_model().run(lr, 'fade', 25, 3, 3)['sr'].double().numpy()
    assert abs(r.metrics['sr']['std_mean'] - sr.std(0, ddof=1).mean()) < 1e-4
    assert r.std_map.shape == r.sr.shape and r.std_map.dtype == np.uint8 and r.std_map.max() > 0
    assert seen[0] == 0.0 and seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen) and seen == sorted(seen)
    r2 = upscale(image=files['good'], sample=None, scale=2, model='toy-x2', sampler='fast', steps=0, n_samples=1,
                 degradation='none', registry=REGISTRY)
    assert r2.metrics['steps'] == 5 and r2.std_map is None

def test_trained_diffusion_checkpoint_in_the_demo(tmp_path, files):
    # a real (2-step) DDPM run through checkpoint_model and upscale: samples, trajectory frames, std map
    from diffsr_kit.config import config_from_dict
    from diffsr_kit.demo import checkpoint_model
    from diffsr_kit.tasks import SRConfig
    from diffsr_kit.train import train
    cfg = config_from_dict(SRConfig, {'model': {'base_ch': 16, 'ch_mult': [1, 2], 'n_res': 1, 'attn_res': [], 'image_size': 32},
                                      'diffusion': {'T': 20}, 'data': {'patch': 32, 'scale': 2, 'batch': 2, 'val_images': 2},
                                      'sample': {'steps': 3}, 'run': {'out': str(tmp_path / 'run'), 'steps': 2, 'progress': False}})
    train(cfg)
    reg = {}
    register_model('ddpm-x2', lambda: checkpoint_model(tmp_path / 'run'), reg)
    r = upscale(image=files['good'], sample=None, scale=2, model='ddpm-x2', sampler='ddim', steps=3, seed=0, n_samples=2,
                degradation='none', registry=reg, cfg=DemoConfig(max_frames=10))
    assert r.metrics['sampler'] == 'ddim' and r.metrics['steps'] == 3
    assert len(r.samples) == 2 and len(r.trajectory) == 3 and r.trajectory[-1][1] == '3/3'
    assert r.sr.shape[:2] == (2 * files['rgb'].shape[0], 2 * files['rgb'].shape[1]) and r.std_map is not None

def test_registry_skips_missing_models_with_reason():
    reg = {}
    register_model('toy-x2', toy_model, reg); register_model('missing-x4', missing_model, reg)
    ok, missing = models_available(reg)
    assert list(ok) == ['toy-x2'] and 'make assets' in missing['missing-x4']
    with pytest.raises(TypeError, match='must return an SRModel'): models_available({'bad': lambda: 42})


# ---------------------------------------------------------------- the app through gradio_client

@pytest.fixture(scope='module')
def app(request, tmp_path_factory):
    from gradio_client import Client
    demo = make_demo(registry=REGISTRY, cfg=DemoConfig(max_lr_side=64, max_file_size='300kb'))
    launch_demo(demo, host='127.0.0.1', port=free_port(), where='script')
    request.addfinalizer(demo.close)
    client = Client(demo.local_url, verbose=False, analytics_enabled=False, httpx_kwargs={'timeout': WAIT},
                    download_files=str(tmp_path_factory.mktemp('client_downloads')))
    return demo, client

def call(client, **kw):
    "One bounded call of the upscale endpoint."
    from gradio_client import handle_file
    args = dict(image=None, sample='', scale=2, model='', sampler='', steps=0, seed=0, n_samples=1, degradation='none')
    args.update(kw)
    if args['image'] is not None: args['image'] = handle_file(str(args['image']))
    return client.submit(api_name='/upscale', **args).result(timeout=WAIT)

def test_api_inputs_are_the_documented_ones(app):
    _, client = app
    info = client.view_api(return_format='dict', print_info=False)['named_endpoints']['/upscale']
    assert [p['parameter_name'] for p in info['parameters']] == [
        'image', 'sample', 'scale', 'model', 'sampler', 'steps', 'seed', 'n_samples', 'degradation']
    assert len(info['returns']) == 8

def test_api_good_image(app, files):
    demo, client = app
    assert demo.server_name == '127.0.0.1'
    lr, bic, sr, samples, traj, std, metrics, notes = call(client, image=files['good'], scale=2)
    with Image.open(sr) as im: assert im.format == 'PNG' and im.size == (80, 96) and im.mode == 'RGB'
    with Image.open(lr) as im: np.testing.assert_array_equal(np.asarray(im), files['rgb'])
    assert metrics['sr_hw'] == [96, 80] and metrics['model'] == 'bicubic-x2' and 'bicubic-x2' in notes
    assert len(samples) == 1 and traj == [] and std is None

def test_api_toy_model_panels(app, files):
    _, client = app
    lr, bic, sr, samples, traj, std, metrics, notes = call(client, image=files['good'], model='toy-x2', n_samples=2,
                                                           sampler='fast', steps=5, seed=1)
    assert len(samples) == 2 and len(traj) == 5 and traj[-1]['caption'] == '5/5'
    with Image.open(std) as im: assert im.size == (80, 96) and im.format == 'PNG'
    assert metrics['sr']['std_mean'] > 0 and metrics['steps'] == 5

def test_concurrent_identical_requests_all_download_whole_files(app, files):
    "8 threads x 5 requests with identical outputs. Before: they shared one content-hashed cache file that each request "
    "rewrote while others downloaded it (15-17 % failed: 'Too little/much data for declared Content-Length')."
    import concurrent.futures as cf
    from gradio_client import Client
    from diffsr_kit.demo import output_root
    demo, _ = app
    want = np.asarray(Image.open(call(app[1], image=files['good'], scale=2)[2]))  # the SR image of this input
    def worker(k):
        c = Client(demo.local_url, verbose=False, analytics_enabled=False, httpx_kwargs={'timeout': WAIT},
                   download_files=tempfile.mkdtemp(prefix=f'diffsr_client{k}_'))
        out = []
        for _ in range(5):
            lr, bic, sr, *_ = call(c, image=files['good'], scale=2)
            with Image.open(sr) as im: out.append(np.array_equal(np.asarray(im), want))
            with Image.open(lr) as im: out.append(np.array_equal(np.asarray(im), files['rgb']))
        return out
    before = set(output_root().iterdir()) if output_root().is_dir() else set()
    with cf.ThreadPoolExecutor(8) as ex: results = [r for f in [ex.submit(worker, k) for k in range(8)] for r in f.result()]
    assert len(results) == 80 and all(results)
    new = set(output_root().iterdir()) - before
    assert len(new) >= 40  # one folder of files per request: nothing served is shared or rewritten

def test_cancelled_request_stops_its_work_and_holds_its_slot_until_then(tmp_path):
    "Before: cancelling freed the queue slot while the computation ran on (4 cancelled jobs held both cores)."
    from gradio_client import Client
    from diffsr_kit.core import step_done
    log = dict(steps=[], active=0, max_active=0)
    def slow_model():
        def run(lr, sampler=None, steps=None, seed=0, n_samples=1, progress=None):
            log['active'] += 1; log['max_active'] = max(log['max_active'], log['active'])
            done = 0
            try:
                for i in range(steps):
                    time.sleep(0.05); done = i + 1
                    step_done(i + 1, steps)  # a real sampler reports each step like this
            finally:
                log['active'] -= 1; log['steps'].append(done)
            return dict(sr=bicubic_upsample(lr, 2).repeat(n_samples, 1, 1, 1), trajectory=[])
        return SRModel('slow-x2', 2, {'loop': 100}, run)
    demo = make_demo(registry={'slow-x2': slow_model}, cfg=DemoConfig(max_lr_side=64), samples=['astronaut'])
    launch_demo(demo, host='127.0.0.1', port=free_port(), where='script')
    try:
        c = Client(demo.local_url, verbose=False, analytics_enabled=False, httpx_kwargs={'timeout': WAIT},
                   download_files=str(tmp_path))
        from gradio_client import handle_file
        img = tmp_path / 'in.png'; Image.fromarray(np.full((24, 24, 3), 90, np.uint8)).save(img)
        args = dict(image=handle_file(str(img)), sample='', scale=2, model='slow-x2', sampler='loop', steps=100, seed=0,
                    n_samples=1, degradation='none')
        first = c.submit(api_name='/upscale', **args)
        t_end = time.time() + WAIT
        while log['active'] == 0 and time.time() < t_end: time.sleep(0.02)  # it is computing
        time.sleep(0.3)
        first.cancel()
        second = c.submit(api_name='/upscale', **args)  # queued right away: must not run beside the cancelled one
        second.result(timeout=WAIT)
    finally:
        demo.close()
    assert len(log['steps']) == 2 and log['steps'][0] < 50 and log['steps'][1] == 100, log  # the first stopped early
    assert log['max_active'] == 1, log

def test_old_output_folders_are_cleaned(tmp_path):
    from diffsr_kit.demo import clean_outputs
    old, fresh = tmp_path / 'a', tmp_path / 'b'
    for d in (old, fresh): d.mkdir(); (d / 'sr.png').write_bytes(b'x')
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert clean_outputs(tmp_path, max_age_s=3600) == 1 and not old.exists() and fresh.exists()

def test_api_notes_for_16bit_and_rgba(app, files):
    _, client = app
    *_, notes = call(client, image=files['grey16'])
    assert '16-bit greyscale image' in notes
    *_, notes = call(client, image=files['rgba16'])
    assert 'alpha channel was composited over white' in notes and '16-bit-per-channel' in notes

def test_api_bad_inputs_then_still_serving(app, files):
    from gradio_client.exceptions import AppError
    _, client = app
    for key, _, msg in BAD:
        with pytest.raises(AppError, match=msg): call(client, image=files[key])
    with pytest.raises(AppError, match="upscales by 4, not 2"): call(client, image=files['good'], model='bicubic-x4')
    with pytest.raises(AppError, match='No image'): call(client, image=None, sample='')
    with pytest.raises(AppError, match='The model failed: RuntimeError: CUDA out of memory'):
        call(client, image=files['good'], model='broken-x2')
    metrics = call(client, image=files['good'], scale=2)[6]  # the server still answers
    assert metrics['sr_hw'] == [96, 80]

def test_upload_size_limit(app, tmp_path):
    import httpx
    demo, client = app
    big = tmp_path / 'big.bin'; big.write_bytes(os.urandom(400_000))  # over the 300 kB limit of this app
    with open(big, 'rb') as fh:
        r = httpx.post(demo.local_url + 'gradio_api/upload', files={'files': ('big.png', fh)}, timeout=WAIT)
    assert r.status_code == 413, (r.status_code, r.text[:200])
    assert call(client, sample='chelsea', scale=8, degradation='classic')[6]['lr_hw'] == [37, 56]


# ---------------------------------------------------------------- `diffsr demo` (demo_cli_run) in a subprocess

def _wait_http(url, proc, timeout):
    import httpx
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None: return False
        try:
            if httpx.get(url, timeout=5).status_code == 200: return True
        except httpx.HTTPError: pass
        time.sleep(0.5)
    return False

def test_cli_serves_until_ctrl_c(tmp_path):
    host, port = '127.0.0.2', free_port('127.0.0.2')  # a loopback address other than the default: warns, stays local
    # as in a terminal: Ctrl-C raises KeyboardInterrupt even when this test runs under a shell job that ignores SIGINT
    # (bash starts background jobs with SIGINT ignored, and Python then installs no handler); SIGUSR1 dumps the stacks
    code = ("import faulthandler, signal; faulthandler.register(signal.SIGUSR1); "
            "signal.signal(signal.SIGINT, signal.default_int_handler); "
            "import argparse, sys; from diffsr_kit.demo import demo_cli_args, demo_cli_run; "
            "p = argparse.ArgumentParser(); demo_cli_args(p); sys.exit(demo_cli_run(p.parse_args(sys.argv[1:])))")
    out, err = open(tmp_path / 'out', 'w'), open(tmp_path / 'err', 'w')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'GRADIO_ANALYTICS_ENABLED': 'False'}
    proc = subprocess.Popen([sys.executable, '-c', code, '--host', host, '--port', str(port), '--max-side', '128'],
                            stdout=out, stderr=err, env=env)
    try:
        up = _wait_http(f'http://{host}:{port}/config', proc, WAIT)
        logs = (tmp_path / 'err').read_text() + (tmp_path / 'out').read_text()
        assert up, f'the demo did not come up on {host}:{port}:\n{logs[-3000:]}'
        t0 = time.monotonic()  # the server answers a moment before launch() returns and prints its address:
        while 'serving on' not in (tmp_path / 'err').read_text() and time.monotonic() - t0 < WAIT and proc.poll() is None:
            time.sleep(0.2)  # press Ctrl-C only once the user would have seen the address, as a person would
        presses = 0
        for presses in (1, 2):  # Ctrl-C; a second press if the first has not stopped it within 45 s
            proc.send_signal(signal.SIGINT)
            try: rc = proc.wait(timeout=45); break
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGUSR1); time.sleep(1)  # the stacks go to the log shown below
        else: rc = None
    finally:
        if proc.poll() is None: proc.kill(); proc.wait(timeout=30)
        out.close(); err.close()
    logs = (tmp_path / 'err').read_text() + (tmp_path / 'out').read_text()
    assert rc == 0, f'exit code {rc} after {presses} Ctrl-C:\n{logs[-6000:]}'
    if presses > 1: warnings.warn(f'the demo needed {presses} Ctrl-C presses; stacks after the first:\n{logs[-6000:]}')
    assert 'WARNING' in logs and f'listen on {host}' in logs and f'serving on http://{host}:{port}/' in logs
    with socket.socket() as s: assert s.connect_ex((host, port)) != 0  # the port is closed again


# ---------------------------------------------------------------- the work one request may ask for (issue: no bound)

def _counting_model(calls):
    "An x4 'diffusion' model with a 50-step sampler whose run only counts its calls (so a refusal costs nothing)."
    def run(lr, sampler=None, steps=None, seed=0, n_samples=1, progress=None):
        calls.append(steps)
        n, c, h, w = lr.shape
        return dict(sr=bicubic_upsample(lr, 4).expand(n_samples, c, 4 * h, 4 * w).clone(), trajectory=[])
    return SRModel('count-x4', 4, {'ddim': 50}, run)

@pytest.mark.parametrize('kw, shape', [
    (dict(n_samples=8, steps=50), '512x512 SR pixels x 8 sample(s) x 50 network call(s) = 105 M'),  # 8 x 50 on a 128^2 LR
    (dict(n_samples=1, steps=1000), '512x512 SR pixels x 1 sample(s) x 1000 network call(s) = 262 M'),
])
def test_request_over_the_work_budget_is_refused_before_any_work(kw, shape):
    calls = []
    reg = {'count-x4': lambda: _counting_model(calls)}
    with pytest.raises(DemoInputError, match='Use fewer samples, fewer steps') as e:
        upscale(sample='astronaut', scale=4, model='count-x4', registry=reg, **kw)
    assert e.value.kind == 'too_much' and shape in str(e.value) and calls == []
    r = upscale(sample='astronaut', scale=4, model='count-x4', registry=reg, n_samples=2, steps=20)  # 10 M: within
    assert calls == [20] and r.sr.shape == (512, 512, 3)

def test_sr_size_over_the_limit_is_refused_for_one_shot_models_too(tmp_path):
    "Before: a 0.8 MB upload at bicubic x8 with 8 samples took 55 s and +5.4 GB."
    photo = tmp_path / 'big.png'
    Image.fromarray((np.random.default_rng(0).random((512, 512, 3)) * 255).astype(np.uint8)).save(photo)
    with pytest.raises(DemoInputError, match=r'4096x4096 = 16.8 M pixels.*at most 1.0 M per sample') as e:
        upscale(image=str(photo), scale=8, model='bicubic-x8', degradation='none', n_samples=8)
    assert e.value.kind == 'too_much'
    cfg = DemoConfig(max_sr_pixels=4096 * 4096, max_work=4096 * 4096 * 8)  # the limits are settings
    assert upscale(image=str(photo), scale=8, model='bicubic-x8', degradation='none', n_samples=1, cfg=cfg).sr.shape == (4096, 4096, 3)


def test_page_opens_with_the_preselected_models_sampler():
    "Before: the Sampler dropdown was empty on load (filled only when the model changed), though requests ran DDIM."
    reg = {'slow-x2': lambda: SRModel('slow-x2', 2, {'ddim': 50, 'ddpm': 1000}, lambda lr, **k: None)}
    demo = make_demo(registry=reg, cfg=DemoConfig(default_scale=2), samples=['astronaut'])
    by_label = {getattr(b, 'label', None): b for b in demo.blocks.values()}
    assert by_label['Model'].value == 'slow-x2'
    assert by_label['Sampler'].value == 'ddim' and [c[0] for c in by_label['Sampler'].choices] == ['ddim', 'ddpm']
    assert by_label['Steps (0: default)'].value == 50 and by_label['Sampler'].interactive


@pytest.mark.parametrize('side', ['4', '100000'])
def test_max_side_out_of_range_is_one_line(side, capsys):
    "--max-side has a floor (the smallest LR image) and a ceiling (beyond it one request would exceed the work budget)."
    from diffsr_kit.cli import main
    assert main(['demo', '--max-side', side]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'--max-side {side}: use 8 to 2048' in err[0], err
