"The one-protocol quality harness (`diffsr_kit.quality`, `diffsr bench quality`) against independent recomputations."
import json, os, shutil, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffsr_kit.quality import QUALITY_COLUMNS, QUALITY_METHODS, bench_quality

DIFFSR = str(Path(sys.executable).with_name('diffsr'))
ASSETS = Path(__file__).resolve().parents[1] / 'assets'
CROP = 4  # the protocol's border crop


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    "A hub cache with no weights in it: LPIPS cannot be computed."
    home = tmp_path / 'torch_home'; home.mkdir()
    monkeypatch.setenv('TORCH_HOME', str(home))
    return home


def u8(x: torch.Tensor) -> np.ndarray:
    "CHW [0,1] -> HWC uint8, rounding half up in float32 (as PIL-bound converters do)."
    return np.floor(x.permute(1, 2, 0).float().clamp(0, 1).numpy() * np.float32(255) + np.float32(0.5)).astype(np.uint8)


def sk_metrics(sr: np.ndarray, hr: np.ndarray) -> tuple[float, float]:
    "scikit-image PSNR and SSIM (Gaussian 11x11, sigma 1.5, population covariance) on uint8 HWC, 4-px border removed."
    c = (slice(CROP, -CROP), slice(CROP, -CROP))
    a, b = sr[c].astype(np.float64) / 255, hr[c].astype(np.float64) / 255
    return (peak_signal_noise_ratio(b, a, data_range=1.0),
            structural_similarity(b, a, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False))


def protocol_inputs(n: int):
    "HR crops (uint8) and LR inputs of the protocol, built here: centre crops of the test split, bicubic x4, 8 bits."
    from diffsr_kit.bench import held_out_crops
    from diffsr_kit.degrade import DegradeConfig, degrade
    crops = held_out_crops('test', 128)
    names = list(crops)[:n]
    hr8 = [u8(crops[k]) for k in names]
    hr = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in hr8])
    lr, _ = degrade(hr, DegradeConfig(pipeline='classic', scale=4), 0)
    lr = torch.from_numpy(np.stack([u8(x) for x in lr])).permute(0, 3, 1, 2).float() / 255
    return names, hr8, lr


def test_rows_match_skimage_recomputation(tmp_path, empty_torch_home):
    "bicubic + regression on 2 crops: each row's PSNR/SSIM equals scikit-image's on the same 8-bit images."
    res = bench_quality(methods='bicubic,regression', max_images=2, out=tmp_path, progress=False)
    assert [r['method'] for r in res['rows']] == [QUALITY_METHODS['bicubic'].label, QUALITY_METHODS['regression'].label]
    names, hr8, lr = protocol_inputs(2)
    from diffsr_kit.bench import bicubic_sr
    from diffsr_kit.train import load_task
    reg = load_task(ASSETS / 'tiny_regression_x4', 'cpu')
    with torch.no_grad():
        outs = {'bicubic': (bicubic_sr(lr * 2 - 1, 4) + 1) / 2, 'regression': (reg.predict(lr * 2 - 1, seed=0) + 1) / 2}
    for row, key in zip(res['rows'], ['bicubic', 'regression']):
        ps, ss = zip(*[sk_metrics(u8(sr), h) for sr, h in zip(outs[key], hr8)])
        # same 8-bit images; PSNR is float64 on both sides (1e-6 dB); the kit's SSIM filters float32 inputs in float32
        # (observed up to 2.4e-6 from skimage's float64), so 1e-5 (tables print 4 decimals)
        assert row['psnr'] == pytest.approx(np.mean(ps), abs=1e-6), key
        assert row['ssim'] == pytest.approx(np.mean(ss), abs=1e-5), key
    assert res['rows'][1]['psnr'] > res['rows'][0]['psnr']     # the trained U-Net beats bicubic on these crops
    assert res['rows'][0]['params'] == 0 and res['rows'][1]['params'] == sum(p.numel() for p in reg.eval_modules['unet'].parameters())
    assert res['rows'][0]['steps'] is None and res['rows'][1]['steps'] == 1


def test_lr_psnr_matches_independent_degradation(tmp_path, empty_torch_home):
    "LR-PSNR = PSNR(bicubic-down(SR), LR): recomputed with scikit-image PSNR on the kit's classic degradation of the 8-bit SR."
    from diffsr_kit.bench import bicubic_sr
    from diffsr_kit.degrade import DegradeConfig, degrade
    res = bench_quality(methods='bicubic', max_images=2, progress=False)
    names, hr8, lr = protocol_inputs(2)
    sr = torch.from_numpy(np.stack([u8((x + 1) / 2) for x in bicubic_sr(lr * 2 - 1, 4)])).permute(0, 3, 1, 2).double() / 255
    down, _ = degrade(sr.float(), DegradeConfig(pipeline='classic', scale=4), 0)
    ref = np.mean([peak_signal_noise_ratio(l.double().numpy(), d.double().clamp(0, 1).numpy(), data_range=1.0)
                   for l, d in zip(lr, down)])
    assert res['rows'][0]['lr_psnr'] == pytest.approx(ref, abs=1e-4)   # float32 resize on both sides


def test_missing_checkpoint_is_skipped_with_reason(tmp_path, empty_torch_home):
    "With an assets folder holding only the regression checkpoint, every other checkpoint row is skipped and says why."
    assets = tmp_path / 'assets'; assets.mkdir()
    shutil.copytree(ASSETS / 'tiny_regression_x4', assets / 'tiny_regression_x4')
    res = bench_quality(max_images=1, assets=assets, progress=False)
    assert [r['method'] for r in res['rows']] == ['Bicubic', QUALITY_METHODS['regression'].label]
    notes = res['convention']['notes']
    for key, m in QUALITY_METHODS.items():
        if m.folder in (None, 'tiny_regression_x4'): assert f'skipped: {key}' not in notes
        else:
            assert str(assets / m.folder) in notes[f'skipped: {key}'] and f'configs/{m.folder}.yaml' in notes[f'skipped: {key}']


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="Unknown method.*esrgan.*bicubic"):
        bench_quality(methods='bicubic,esrgan', progress=False)


def test_data_folder_empty_and_missing(tmp_path):
    with pytest.raises(ValueError, match='No image files'):
        bench_quality(data=tmp_path, methods='bicubic', progress=False)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        bench_quality(data=tmp_path / 'nope', methods='bicubic', progress=False)


def test_data_folder_centre_crops(tmp_path, empty_torch_home):
    "A folder of PNG/JPEG HR images: each is centre-cropped to 128; bicubic PSNR equals scikit-image's on PIL's own crop."
    from skimage import data
    Image.fromarray(data.coffee()[:200, :300]).save(tmp_path / 'coffee.png')
    Image.fromarray(data.rocket()[:150, :140]).save(tmp_path / 'rocket.png')
    Image.fromarray(data.chelsea()).save(tmp_path / 'cat.jpg', quality=95)
    Image.fromarray(data.camera()[:64, :64]).save(tmp_path / 'small.png')    # too small: left out with a warning
    with pytest.warns(UserWarning, match='smaller than 128x128'):
        res = bench_quality(data=tmp_path, methods='bicubic', progress=False)
    assert res['convention']['n_images'] == 3 and 'cat, coffee, rocket' in res['convention']['notes']['image source']
    from diffsr_kit.bench import bicubic_sr
    from diffsr_kit.degrade import DegradeConfig, degrade
    ps = []
    for f in ('cat.jpg', 'coffee.png', 'rocket.png'):
        im = Image.open(tmp_path / f).convert('RGB')
        W, H = im.size
        l, t = (W - 128) // 2, (H - 128) // 2
        hr = np.asarray(im.crop((l, t, l + 128, t + 128)))
        x = torch.from_numpy(hr.copy()).permute(2, 0, 1)[None].float() / 255
        lr, _ = degrade(x, DegradeConfig(pipeline='classic', scale=4), 0)
        lr = torch.from_numpy(u8(lr[0])).permute(2, 0, 1)[None].float() / 255
        ps.append(sk_metrics(u8((bicubic_sr(lr * 2 - 1, 4)[0] + 1) / 2), hr)[0])
    assert res['rows'][0]['psnr'] == pytest.approx(np.mean(ps), abs=1e-6)


def test_lpips_null_and_card_says_which_file(tmp_path, empty_torch_home):
    res = bench_quality(methods='bicubic', max_images=1, out=tmp_path, progress=False)
    assert res['rows'][0]['lpips'] is None
    note = res['convention']['metrics']['LPIPS']
    assert note.startswith('not computed') and 'alexnet-owt-7be5be79.pth' in note and str(empty_torch_home / 'hub' / 'checkpoints') in note
    assert 'random' not in json.dumps(res['rows'])                  # no random-backbone numbers slipped in
    md = (tmp_path / 'quality.md').read_text()
    assert 'alexnet-owt-7be5be79.pth' in md and '| Bicubic | – |' in md


def test_lpips_computed_when_weights_present(tmp_path, empty_torch_home):
    "A stand-in AlexNet features file in the cache turns the column on; values equal the lpips package's on the same images."
    import lpips
    from torchvision.models import alexnet
    torch.manual_seed(3)
    sd = {k: v for k, v in alexnet(weights=None).state_dict().items() if k.startswith('features.')}
    path = empty_torch_home / 'hub' / 'checkpoints' / 'alexnet-owt-7be5be79.pth'
    path.parent.mkdir(parents=True); torch.save(sd, path)
    res = bench_quality(methods='bicubic', max_images=2, progress=False)
    names, hr8, lr = protocol_inputs(2)
    from diffsr_kit.bench import bicubic_sr
    sr = torch.from_numpy(np.stack([u8((x + 1) / 2) for x in bicubic_sr(lr * 2 - 1, 4)])).permute(0, 3, 1, 2).float() / 255
    hr = torch.from_numpy(np.stack(hr8)).permute(0, 3, 1, 2).float() / 255
    ref = lpips.LPIPS(net='alex', pnet_rand=True, verbose=False).eval()
    trunk = ref.net   # torchvision 'features.<i>' -> lpips 'slice<k>.<i>'
    owner = {i: s for s, sl in trunk.named_children() for i, _ in sl.named_children()}
    trunk.load_state_dict({f"{owner[k.split('.')[1]]}.{k.split('.', 1)[1]}": v for k, v in sd.items()})
    with torch.no_grad(): want = ref(sr, hr, normalize=True).flatten().mean().item()
    assert res['rows'][0]['lpips'] == pytest.approx(want, rel=1e-5)    # same float32 network, same inputs
    assert 'LPIPS' not in res['convention']['metrics'] and 'LPIPS-alex' in res['convention']['metrics']


def run_cli(*args, env_extra=None):
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'TQDM_DISABLE': '1', **(env_extra or {})}
    return subprocess.run([DIFFSR, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def test_cli_json_schema_and_files(tmp_path):
    home = tmp_path / 'th'; home.mkdir()
    out = tmp_path / 'results'
    r = run_cli('bench', 'quality', '--methods', 'bicubic,regression', '--max-images', 2, '--out', out, '--json',
                env_extra={'TORCH_HOME': str(home)})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)                                        # stdout is exactly the JSON dict
    assert set(res) == {'convention', 'rows'}
    assert [list(row) for row in res['rows']] == [list(QUALITY_COLUMNS)] * 2
    for row in res['rows']:
        assert isinstance(row['method'], str) and isinstance(row['params'], int) and row['lpips'] is None
        for k in ('psnr', 'ssim', 'niqe', 'lr_psnr', 'sec_per_img'): assert isinstance(row[k], float) and np.isfinite(row[k])
    c = res['convention']
    assert 'not the published model' in c['notes']['niqe']
    assert (c['colour_space'], c['crop_border'], c['seeds'], c['n_images']) == ('RGB', 4, [0], 2)
    assert json.loads((out / 'quality.json').read_text()) == res
    lines = (out / 'quality.csv').read_text().strip().splitlines()
    assert lines[0] == ','.join(QUALITY_COLUMNS) and len(lines) == 3
    md = (out / 'quality.md').read_text()
    assert '| Method | Steps | PSNR↑ | SSIM↑ | LPIPS↓ | NIQE↓ | LR-PSNR↑ | Params | s/img |' in md and '## Convention card' in md
    assert '](quality_pd.png)' in md and (out / 'quality_pd.png').stat().st_size > 5000   # the perception-distortion plot
    assert f"| Bicubic | – | {res['rows'][0]['psnr']:.2f} |" in md


def test_cli_empty_data_folder_error(tmp_path):
    r = run_cli('bench', 'quality', '--data', tmp_path, '--methods', 'bicubic', '--out', '')
    assert r.returncode == 2 and 'No image files' in r.stderr and str(tmp_path) in r.stderr
