"`--guidance-scale` of `diffsr sample` / `diffsr eval`: CG-DPM at scale 0 is its base model (the SR3 it was trained on), exactly."
import numpy as np
import pytest
from PIL import Image
from test_cli import run

ASSETS = __import__('pathlib').Path(__file__).resolve().parents[1] / 'assets'

@pytest.fixture(scope='module')
def lr_png(tmp_path_factory):
    from skimage import data
    p = tmp_path_factory.mktemp('lr') / 'lr.png'
    Image.fromarray(data.astronaut()[::16, ::16][:24, :24]).save(p)   # a 24x24 LR image
    return p

def _base_of_cgdpm(tmp_path):
    "A plain 'ddpm' checkpoint folder holding the CG-DPM asset's frozen base (its 'unet' and, if any, 'regressor' weights)."
    import json
    from safetensors.torch import save_file
    src = ASSETS / 'tiny_cgdpm_x4'
    meta = json.loads((src / 'meta.json').read_text())
    cfg = {k: v for k, v in meta['config'].items() if k != 'guide'}
    cfg['task'] = 'ddpm'
    from diffsr_kit.checkpoint import read_weights, resolve_shared
    whole = resolve_shared(read_weights(src / 'model.safetensors'), meta.get('shared') or {}, src)  # shared modules read back
    flat = {k: v for k, v in whole.items() if k.split('.')[0] in ('unet', 'regressor')}
    out = tmp_path / 'cgdpm_base'; out.mkdir()
    save_file(flat, str(out / 'model.safetensors'))
    (out / 'meta.json').write_text(json.dumps({'step': meta['step'], 'task': 'ddpm', 'config': cfg}))
    return out

def _sample(ckpt, lr_png, out, *extra):
    run('sample', '--ckpt', ckpt if isinstance(ckpt, __import__('pathlib').Path) else ASSETS / ckpt, '--input', lr_png, '--sampler', 'ddim', '--steps', 4, '--seed', 3, '--out', out, *extra)
    return np.asarray(Image.open(out))

def test_scale_zero_is_the_base_and_scale_one_differs(lr_png, tmp_path):
    # The CG-DPM checkpoint holds the frozen SR3 it was trained on; with s = 0 (eq. 14-15 without F_phi) the guided
    # sampler must reproduce that SR3's own sample, through the plain 'ddpm' task, bit for bit.
    base = _sample(_base_of_cgdpm(tmp_path), lr_png, tmp_path / 'sr3.png')
    g0 = _sample('tiny_cgdpm_x4', lr_png, tmp_path / 'g0.png', '--guidance-scale', 0)
    g1 = _sample('tiny_cgdpm_x4', lr_png, tmp_path / 'g1.png', '--guidance-scale', 1)
    assert base.shape == (96, 96, 3)
    np.testing.assert_array_equal(g0, base)
    assert np.abs(g1.astype(int) - base.astype(int)).mean() > 0.5   # the guide moves the sample (mean |diff| in uint8 steps)

def test_guidance_scale_on_an_unguided_model_is_a_clear_error(lr_png, tmp_path):
    r = run('sample', '--ckpt', ASSETS / 'tiny_regression_x4', '--input', lr_png, '--out', tmp_path / 'x.png',
            '--guidance-scale', 1, ok=False)
    assert r.returncode != 0
    assert 'no guided network' in r.stderr and 'CG-DPM' in r.stderr
    assert not (tmp_path / 'x.png').exists()
