"The `diffsr` command end to end, in subprocesses, on real files."
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
from PIL import Image

DIFFSR = str(Path(sys.executable).with_name('diffsr'))
ENV = {**os.environ, 'MPLBACKEND': 'Agg', 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '2')}

def run(*args, ok=True):
    r = subprocess.run([DIFFSR, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=600)
    if ok: assert r.returncode == 0, f'diffsr {args} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}'
    return r

@pytest.fixture(scope='module')
def hr_png(tmp_path_factory):
    from skimage import data
    p = tmp_path_factory.mktemp('img') / 'chelsea.png'
    Image.fromarray(data.chelsea()[:130, :258]).save(p)   # 130x258: not a multiple of 4, so the CLI must crop
    return p

def test_help_lists_commands():
    out = run('--help').stdout
    for c in ('data', 'bench', 'degrade', 'tour'): assert c in out

def test_data_list_json():
    rows = json.loads(run('data', 'list', '--json', '--split', 'test').stdout)
    names = {r['name'] for r in rows}
    assert {'astronaut', 'brain_mri'} <= names
    assert all(r['split'].startswith('test') for r in rows)

def test_degrade_classic_matches_pil_bicubic(hr_png, tmp_path):
    out = tmp_path / 'lr.png'
    r = run('degrade', hr_png, '--scale', 4, '--pipeline', 'classic', '--out', out)
    info = json.loads(r.stdout)
    assert info['hr_size'] == [128, 256] and info['lr_size'] == [32, 64]
    assert 'cropped' in r.stderr
    lr = np.asarray(Image.open(out)).astype(float)
    ref = np.asarray(Image.open(hr_png).crop((0, 0, 256, 128)).resize((64, 32), Image.BICUBIC)).astype(float)
    # torch's antialiased bicubic and PIL's differ slightly in their kernels' support; 3 grey levels mean is generous
    assert lr.shape == ref.shape and np.abs(lr - ref).mean() < 3.0

def test_degrade_shuffled_seeded(hr_png, tmp_path):
    a, b, c = (tmp_path / f'{k}.png' for k in 'abc')
    run('degrade', hr_png, '--pipeline', 'shuffled', '--seed', 1, '--out', a)
    run('degrade', hr_png, '--pipeline', 'shuffled', '--seed', 1, '--out', b)
    run('degrade', hr_png, '--pipeline', 'shuffled', '--seed', 2, '--out', c)
    A, B, C = (np.asarray(Image.open(p)) for p in (a, b, c))
    assert np.array_equal(A, B) and not np.array_equal(A, C)

def test_degrade_bad_inputs(tmp_path, hr_png):
    r = run('degrade', tmp_path / 'missing.png', '--out', tmp_path / 'x.png', ok=False)
    assert r.returncode == 2 and 'No such image file' in r.stderr
    bad = tmp_path / 'notes.png'; bad.write_text('not an image')
    r = run('degrade', bad, '--out', tmp_path / 'x.png', ok=False)
    assert r.returncode == 2 and 'not an image file' in r.stderr
    r = run('degrade', hr_png, '--scale', 5, '--out', tmp_path / 'x.png', ok=False)
    assert r.returncode == 2 and 'scale' in r.stderr

def test_bench_degrade_json():
    res = json.loads(run('bench', 'degrade', '--json', '--batch', 4, '--size', 32).stdout)
    assert set(res) >= {'batched_img_per_s', 'per_image_img_per_s', 'device', 'batch', 'size'}
    assert res['batch'] == 4 and res['size'] == 32 and res['batched_img_per_s'] > 0

def test_tour_sections_option(tmp_path):
    "`diffsr tour --sections` runs only those (the full tour, SR included, is tested in tests/test_tour.py)."
    run('tour', '--out', tmp_path / 'tour', '--sections', 'kernels,schedules')
    m = json.loads((tmp_path / 'tour' / 'metrics.json').read_text())
    assert list(m['sections']) == ['kernels', 'schedules']
    r = run('tour', '--out', tmp_path / 'tour', '--sections', 'nope', ok=False)
    assert r.returncode == 2 and 'Unknown tour section' in r.stderr
