"`diffsr tour` end to end (fast mode): every section on the page, and metrics.json numbers recomputed from the written PNGs."
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

DIFFSR = str(Path(sys.executable).with_name('diffsr'))


@pytest.fixture(scope='module')
def tour(tmp_path_factory):
    out = tmp_path_factory.mktemp('tour') / 'tour'
    th = tmp_path_factory.mktemp('torch_home')          # no LPIPS weights: the card must say so
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'TQDM_DISABLE': '1', 'TORCH_HOME': str(th),
           'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '2')}
    r = subprocess.run([DIFFSR, 'tour', '--fast', '--out', str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, f'diffsr tour failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}'
    return out, json.loads((out / 'metrics.json').read_text()), (out / 'index.html').read_text()


def test_tour_writes_every_section(tour):
    out, m, page = tour
    from diffsr_kit.tour import SECTIONS
    assert set(m['sections']) == set(SECTIONS) and 'sr' in SECTIONS
    for name in SECTIONS: assert f'id="{name}"' in page
    for img in out.glob('*.png'): assert img.name in page
    for img in (out / 'sr').glob('*.png'): assert f'sr/{img.name}' in page
    assert {'astronaut', 'brain_mri'} <= set(m['images']) and m['fast'] is True


def test_sr_section_images_and_methods(tour):
    out, m, page = tour
    from diffsr_kit.data import IMAGES
    sr = m['sections']['sr']
    names = list(sr['files'])
    assert {IMAGES[n].modality == 'medical' for n in names} == {True, False}    # natural AND medical
    labels = [r['method'] for r in sr['rows']]
    assert labels[0] == 'Bicubic' and 'SRDDGAN' in labels and 'SR3 (DDIM)' in labels
    from diffsr_kit.quality import QUALITY_METHODS
    own = {m.label: m.steps for m in QUALITY_METHODS.values()}  # the zoo's rows: each model's own DDIM steps
    assert all(r['steps'] == min(own[r['method']], sr['steps']) for r in sr['rows'] if '(DDIM)' in r['method'])
    assert 'Convention card' in page and 'crop border' in page and '4 px each side' in page
    assert 'alexnet-owt-7be5be79.pth' in page                       # LPIPS missing: the card says which file
    for n in names: assert f'sr_{n}.png' in page


def test_sr_numbers_match_recomputation_from_pngs(tour):
    "Per-image PSNR/SSIM in metrics.json equal scikit-image's on the PNG files the tour wrote (HR and SR, 4-px border cropped)."
    out, m, _ = tour
    sr = m['sections']['sr']
    n_checked = 0
    for key, per in sr['per_image'].items():
        for name, nums in per.items():
            files = sr['files'][name]
            hr = np.asarray(Image.open(out / files['hr']).convert('RGB')).astype(np.float64)[4:-4, 4:-4] / 255
            x = np.asarray(Image.open(out / files[key]).convert('RGB')).astype(np.float64)[4:-4, 4:-4] / 255
            # PSNR: float64 on both sides, same 8-bit pixels -> 1e-6 dB; SSIM: the kit filters float32 images in float32
            # (observed up to 2.4e-6 from skimage's float64), so 1e-5 (tables print 4 decimals)
            assert nums['psnr'] == pytest.approx(peak_signal_noise_ratio(hr, x, data_range=1.0), abs=1e-6), (key, name)
            ref = structural_similarity(hr, x, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False)
            assert nums['ssim'] == pytest.approx(ref, abs=1e-5), (key, name)
            n_checked += 1
    assert n_checked == len(sr['files']) * len(sr['rows']) >= 4
    for row, (key, per) in zip(sr['rows'], sr['per_image'].items()):   # the table's means are the per-image means
        assert row['psnr'] == pytest.approx(np.mean([v['psnr'] for v in per.values()]), abs=1e-9)
