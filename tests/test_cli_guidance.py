"`--guidance-scale` of `diffsr sample` / `diffsr eval`: CG-DPM at scale 0 is its base model (the shipped SR3), exactly."
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

def _sample(ckpt, lr_png, out, *extra):
    run('sample', '--ckpt', ASSETS / ckpt, '--input', lr_png, '--sampler', 'ddim', '--steps', 4, '--seed', 3, '--out', out, *extra)
    return np.asarray(Image.open(out))

def test_scale_zero_is_the_base_and_scale_one_differs(lr_png, tmp_path):
    # The CG-DPM asset's base U-Net holds the same weights as assets/tiny_sr3_x4 (it was trained on top of it), so with
    # s = 0 (eq. 14-15 without F_phi) the guided sampler must reproduce the SR3 checkpoint's sample bit for bit.
    base = _sample('tiny_sr3_x4', lr_png, tmp_path / 'sr3.png')
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
