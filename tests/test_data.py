"diffsr_kit.data: registry, split, conversions, HRPatches, folder datasets; checked against PIL, numpy, gzip and pydicom directly."
import gzip, sys, warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from diffsr_kit import data as D
from diffsr_kit.core import from_model
from diffsr_kit.degrade import DegradeConfig, degrade

SK_DIR = Path(__import__('skimage').data.__file__).parent
NON_LFW = [n for n in D.IMAGES if not n.startswith('lfw_')]
BT601 = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luma weights, written out independently of core


# ---------------------------------------------------------------- registry

@pytest.mark.parametrize('name', list(D.IMAGES))
def test_every_image_loads_offline_with_documented_shape_dtype(name):
    info = D.IMAGES[name]
    raw = D.load_raw(name)
    assert raw.shape == tuple(info.shape), (name, raw.shape, info.shape)
    assert raw.dtype == np.dtype(info.dtype), (name, raw.dtype, info.dtype)
    assert (raw.shape[2] if raw.ndim == 3 else 1) == info.channels
    assert info.modality in D.MODALITIES
    assert info.source and info.licence
    if np.issubdtype(raw.dtype, np.integer):  # stated bit depth holds the data
        assert raw.min() >= 0 and raw.max() < 2 ** info.bit_depth, (name, raw.min(), raw.max(), info.bit_depth)
    elif raw.dtype == bool: assert info.bit_depth == 1
    else: assert info.bit_depth is None and 0 <= raw.min() and raw.max() <= 1


@pytest.mark.parametrize('name', NON_LFW + ['lfw_000', 'lfw_199'])
@pytest.mark.parametrize('channels', [3, 1, None])
def test_load_image_float32_01_with_channels(name, channels):
    a = D.load_image(name, channels=channels)
    assert a.dtype == np.float32 and a.ndim == 3
    assert a.shape[:2] == tuple(D.IMAGES[name].shape[:2])
    assert a.min() >= 0 and a.max() <= 1
    want = {3: 3, 1: 1, None: D.IMAGES[name].channels}[channels]
    assert a.shape[2] == want


@pytest.mark.parametrize('name,file', [('astronaut', 'astronaut.png'), ('coffee', 'coffee.png'), ('camera', 'camera.png'),
                                       ('immunohistochemistry', 'ihc.png'), ('rocket', 'rocket.jpg')])
def test_load_image_matches_pil_decode_of_the_shipped_file(name, file):
    ref = np.asarray(Image.open(SK_DIR / file).convert('RGB'), np.float64) / 255  # PIL decode, independent of skimage.io
    # PNG is lossless: exact to float32 rounding; JPEG decoders (libjpeg in PIL vs imageio) may differ by a level
    tol = 1e-6 if file.endswith('.png') else 2 / 255
    assert np.abs(D.load_image(name, channels=3) - ref).max() <= tol


def test_grey_is_bt601_and_rgba_is_composited_over_white():
    rgb = np.asarray(Image.open(SK_DIR / 'astronaut.png').convert('RGB'), np.float64) / 255
    np.testing.assert_allclose(D.load_image('astronaut', channels=1)[..., 0], rgb @ BT601, atol=1e-5)
    rgba = np.asarray(Image.open(SK_DIR / 'logo.png'), np.float64) / 255
    assert rgba.shape[-1] == 4
    over_white = rgba[..., :3] * rgba[..., 3:] + (1 - rgba[..., 3:])
    np.testing.assert_allclose(D.load_image('logo', channels=3), over_white, atol=1e-6)
    horse = D.load_image('horse', channels=None)
    assert set(np.unique(horse)) == {0.0, 1.0}


def test_brain_mri_is_big_endian_8bit_data():
    path = Path(__import__('matplotlib').get_data_path()) / 'sample_data' / 's1045.ima.gz'
    raw = gzip.open(path).read()
    assert len(raw) == 256 * 256 * 2
    le = np.frombuffer(raw, '<u2')
    assert (le % 256 == 0).all()  # little-endian reading: low byte always 0 -> the words are big-endian
    be = np.frombuffer(raw, '>u2').reshape(256, 256)
    np.testing.assert_array_equal(D.load_raw('brain_mri'), be)
    assert be.max() < 256  # 8 significant bits
    np.testing.assert_allclose(D.load_image('brain_mri', channels=None)[..., 0], be / 255, atol=1e-6)


def test_ct_maps_hounsfield_window_and_mr_is_12bit():
    pydicom = pytest.importorskip('pydicom')
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_rescale
    ds = pydicom.dcmread(get_testdata_file('CT_small.dcm'))
    hu = apply_rescale(ds.pixel_array, ds)  # pydicom's own slope/intercept
    want = np.clip((hu + 1024) / 4095, 0, 1)
    np.testing.assert_allclose(D.load_image('ct_small', channels=None)[..., 0], want, atol=1e-6)
    mr = pydicom.dcmread(get_testdata_file('MR_small.dcm')).pixel_array
    np.testing.assert_allclose(D.load_image('mr_small', channels=None)[..., 0], mr / 4095, atol=1e-6)


def test_missing_pydicom_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'pydicom', None)  # makes `import pydicom` raise ImportError
    with pytest.raises(ImportError, match=r'pip install diffsr_kit\[medical\]'):
        D.load_image('ct_small')
    with pytest.warns(UserWarning, match=r'Left out 1 image.*ct_small'):
        ds = D.HRPatches(['camera', 'ct_small'], patch=32)
    assert ds.names == ['camera']


def test_lfw_entries_are_the_lfw_subset_rows():
    import skimage.data
    lfw = skimage.data.lfw_subset()
    for i in (0, 57, 99, 100, 199):
        np.testing.assert_array_equal(D.load_raw(f'lfw_{i:03d}'), lfw[i])
        assert D.IMAGES[f'lfw_{i:03d}'].modality == ('face' if i < 100 else 'natural')


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"Unknown image 'astronot'.*Did you mean 'astronaut'"):
        D.load_image('astronot')
    with pytest.raises(ValueError, match=r"Unknown image 'zzzz'\. See list_images"):
        D.get_info('zzzz')
    assert D.get_info('cat').name == 'chelsea'


# ---------------------------------------------------------------- split and listing

def test_split_is_disjoint_by_image_and_covers_registry():
    seen = [n for names in D.SPLITS.values() for n in names]
    assert len(seen) == len(set(seen))  # no image in two splits (or twice in one)
    assert set(seen) == set(D.IMAGES)
    assert set(D.SPLITS) == {'train', 'val', 'test', 'extra'}
    assert all(D.IMAGES[n].modality == 'natural' for n in D.SPLITS['extra'])
    test = D.SPLITS['test']
    assert sum(D.IMAGES[n].modality == 'natural' and not n.startswith('lfw_') for n in test) >= 2
    assert 'brain_mri' in test and ({'immunohistochemistry', 'retina'} & set(test))
    for s, names in D.SPLITS.items():
        assert all(D.split_of(n) == s for n in names)


def test_joined_source_adds_the_extra_photos():
    both = D.HRPatches('train+extra', patch=64, small='skip', length=2)
    alone = D.HRPatches('train', patch=64, small='skip', length=2)
    assert both.names == alone.names + ['motorcycle', 'grace_hopper']
    assert D.HRPatches('extra', patch=64).sizes == [(500, 741), (600, 512)]
    with pytest.raises(ValueError, match=r"not a split"):
        D.HRPatches('train+extar', patch=64)


def test_list_images_and_table():
    assert D.list_images(split='val', modality='face') == [f'lfw_{i:03d}' for i in range(80, 90)]
    assert all(min(D.IMAGES[n].shape[:2]) >= 300 for n in D.list_images(min_size=300))
    assert 'retina' in D.list_images(min_size=300) and 'coins' in D.list_images(min_size=300)
    rows = D.images_table(group_lfw=False)
    assert len(rows) == len(D.IMAGES)
    assert set(rows[0]) == {'name', 'modality', 'shape', 'dtype', 'bit_depth', 'split', 'source', 'licence'}
    text = D.images_table(as_text=True)
    assert 'brain_mri' in text and 'lfw_000..lfw_099 (100)' in text and 'train:80 val:10 test:10' in text
    with pytest.raises(ValueError, match="Unknown split 'training'"):
        D.list_images(split='training')


# ---------------------------------------------------------------- HRPatches

@pytest.mark.parametrize('pipeline', ['classic', 'shuffled'])
def test_hrpatches_deterministic_and_lr_is_degrade_of_hr(pipeline):
    cfg = DegradeConfig(pipeline=pipeline, scale=4)
    ds = D.HRPatches(['camera', 'coffee', 'retina'], patch=64, scale=4, degradation=cfg, seed=3, length=6)
    ds2 = D.HRPatches(['camera', 'coffee', 'retina'], patch=64, scale=4, degradation=cfg, seed=3, length=6)
    other = D.HRPatches(['camera', 'coffee', 'retina'], patch=64, scale=4, degradation=cfg, seed=4, length=6)
    for i in range(6):
        a, b = ds[i], ds2[i]
        assert torch.equal(a['hr'], ds[i]['hr']) and torch.equal(a['lr'], ds[i]['lr'])  # same item twice
        assert torch.equal(a['hr'], b['hr']) and torch.equal(a['lr'], b['lr'])  # a second dataset with the same seed
        assert a['hr'].shape == (3, 64, 64) and a['lr'].shape == (3, 16, 16)
        assert a['hr'].min() >= -1 and a['hr'].max() <= 1
        # HR is the crop `locate` names, cut here from load_image independently
        d = ds.locate(i)
        img = D.load_image(a['name'])
        crop = img[d['top']:d['top'] + 64, d['left']:d['left'] + 64]
        np.testing.assert_allclose(from_model(a['hr']).permute(1, 2, 0).numpy(), crop, atol=1e-6)
        # LR = degrade(HR crop) with the item's seed; 1e-5 covers the [0,1] <-> [-1,1] round trip in float32
        ref, _ = degrade(torch.from_numpy(crop.transpose(2, 0, 1).copy())[None], cfg, [a['seed']])
        np.testing.assert_allclose(from_model(a['lr']).numpy(), ref[0].numpy(), atol=1e-5)
    assert any(not torch.equal(ds[i]['hr'], other[i]['hr']) for i in range(6))  # another seed, other crops
    ds.set_epoch(1)
    assert any(not torch.equal(ds[i]['hr'], ds2[i]['hr']) for i in range(6))  # another epoch, other crops


def test_hrpatches_callable_degradation_and_augment():
    def pool(hr, seeds):  # a custom degradation: 4x4 average pooling
        return torch.nn.functional.avg_pool2d(hr, 4), [dict(kind='pool', seed=seeds[0])]
    ds = D.HRPatches(['chelsea'], patch=32, scale=4, degradation=pool, augment=True, length=8, with_params=True)
    img = D.load_image('chelsea')
    for i in range(8):
        it, d = ds[i], ds.locate(i)
        crop = img[d['top']:d['top'] + 32, d['left']:d['left'] + 32]
        if d['flip']: crop = crop[:, ::-1]
        crop = np.rot90(crop, d['rot'])
        hr = from_model(it['hr']).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(hr, crop, atol=1e-6)
        pooled = crop.reshape(8, 4, 8, 4, 3).mean((1, 3))  # numpy block mean, independent of torch
        np.testing.assert_allclose(from_model(it['lr']).permute(1, 2, 0).numpy(), pooled, atol=1e-5)
        assert it['params'] == dict(kind='pool', seed=it['seed'])
    assert {ds.locate(i)['rot'] for i in range(8)} != {0}  # augmentation happened


def test_hrpatches_collate():
    ds = D.HRPatches(['camera', 'coins'], patch=32, length=4)
    b = next(iter(DataLoader(ds, batch_size=4)))  # torch's default collate
    assert b['hr'].shape == (4, 3, 32, 32) and b['lr'].shape == (4, 3, 8, 8)
    assert b['name'] == ['camera', 'coins', 'camera', 'coins']
    assert torch.equal(b['hr'][1], ds[1]['hr'])
    dp = D.HRPatches(['camera', 'coins'], patch=32, length=4, with_params=True,
                     degradation=DegradeConfig(pipeline='shuffled', scale=4))
    b = next(iter(DataLoader(dp, batch_size=4, collate_fn=D.collate)))
    assert b['hr'].shape == (4, 3, 32, 32)
    assert isinstance(b['params'], list) and len(b['params']) == 4
    _, ref = degrade(from_model(dp[2]['hr'])[None], dp.degradation, [dp[2]['seed']])
    assert b['params'][2] == ref[0]  # the params of item 2, as degrade draws them for its seed


def test_hrpatches_small_images():
    with pytest.raises(ValueError, match=r"smaller than patch=32: 'lfw_000' \(25x25\).*Use a smaller patch \(24 fits"):
        D.HRPatches(['lfw_000', 'camera'], patch=32)
    with pytest.warns(UserWarning, match='Left out 1 image'):
        ds = D.HRPatches(['lfw_000', 'camera'], patch=32, small='skip')
    assert ds.names == ['camera']
    up = D.HRPatches(['lfw_000'], patch=32, small='upscale', channels=1)
    assert up[0]['hr'].shape == (1, 32, 32)
    faces = D.HRPatches(D.list_images('face', 'train'), patch=24, channels=1)
    assert len(faces) == 80 and faces[0]['lr'].shape == (1, 6, 6)


def test_hrpatches_bad_inputs():
    with pytest.raises(ValueError, match='must be a positive multiple of scale=4'):
        D.HRPatches(['camera'], patch=30)
    with pytest.raises(ValueError, match=r'DegradeConfig.scale=2 but HRPatches scale=4'):
        D.HRPatches(['camera'], patch=32, degradation=DegradeConfig(scale=2))
    with pytest.raises(ValueError, match=r"not a split .*Did you mean 'train'"):
        D.HRPatches('trian')
    with pytest.raises(ValueError, match="small='tiny'"):
        D.HRPatches(['camera'], small='tiny')
    ds = D.HRPatches(['camera'], patch=32, degradation=lambda hr, s: hr[..., ::2, ::2])  # wrong scale
    with pytest.raises(ValueError, match=r'expected \(1, 3, 8, 8\)'):
        ds[0]
    with pytest.raises(IndexError):
        ds[5]


# ---------------------------------------------------------------- folders

def _save(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)


def test_read_image_modes(tmp_path):
    g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    _save(tmp_path / 'g.png', g)
    a = D.read_image(tmp_path / 'g.png', channels=None)
    np.testing.assert_allclose(a[..., 0], g / 255, atol=1e-7)
    np.testing.assert_allclose(D.read_image(tmp_path / 'g.png'), np.repeat(g[..., None] / 255, 3, -1), atol=1e-7)
    # 16-bit PNG and TIFF: / 65535
    v16 = np.array([[0, 1000], [32768, 65535]], np.uint16)
    for ext in ('png', 'tif'):
        Image.fromarray(v16).save(tmp_path / f'v16.{ext}')
        assert Image.open(tmp_path / f'v16.{ext}').mode.startswith('I;16')
        np.testing.assert_allclose(D.read_image(tmp_path / f'v16.{ext}', channels=None)[..., 0], v16 / 65535, atol=1e-7)
    # int32 'I' TIFF holding 16-bit values
    Image.fromarray(v16.astype(np.int32)).save(tmp_path / 'i32.tif')
    assert Image.open(tmp_path / 'i32.tif').mode == 'I'
    np.testing.assert_allclose(D.read_image(tmp_path / 'i32.tif', channels=None)[..., 0], v16 / 65535, atol=1e-7)
    Image.fromarray(np.array([[70000]], np.int32)).save(tmp_path / 'big.tif')
    with pytest.raises(ValueError, match='only 16-bit data'):
        D.read_image(tmp_path / 'big.tif')
    # grey + alpha: alpha 0 -> white, alpha 255 -> the grey value
    la = np.array([[[40, 0], [40, 255]]], np.uint8)
    _save(tmp_path / 'la.png', la, 'LA')
    np.testing.assert_allclose(D.read_image(tmp_path / 'la.png', channels=1)[0, :, 0], [1.0, 40 / 255], atol=1e-6)
    # palette with a transparent entry -> RGBA -> over white
    p = Image.new('P', (2, 1)); p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762); p.putpixel((0, 0), 0); p.putpixel((1, 0), 1)
    p.info['transparency'] = 0; p.save(tmp_path / 'p.png', transparency=0)
    np.testing.assert_allclose(D.read_image(tmp_path / 'p.png')[0], [[1, 1, 1], [0, 0, 1]], atol=1e-7)
    # float TIFF in [0, 1] passes, outside is refused
    Image.fromarray(np.array([[0.25, 1.0]], np.float32)).save(tmp_path / 'f.tif')
    np.testing.assert_allclose(D.read_image(tmp_path / 'f.tif', channels=None)[0, :, 0], [0.25, 1.0])
    Image.fromarray(np.array([[2.0]], np.float32)).save(tmp_path / 'f2.tif')
    with pytest.raises(ValueError, match=r'outside \[0, 1\]'):
        D.read_image(tmp_path / 'f2.tif')
    # bilevel
    Image.fromarray(np.array([[True, False]])).save(tmp_path / 'b.png')
    np.testing.assert_array_equal(D.read_image(tmp_path / 'b.png', channels=None)[0, :, 0], [1.0, 0.0])


def test_image_folder_hr_conversions(tmp_path):
    g = (np.arange(256, dtype=np.uint8).reshape(16, 16))
    _save(tmp_path / 'grey.png', g)
    rgba = np.zeros((16, 16, 4), np.uint8); rgba[..., 1] = 255; rgba[..., 3] = 64
    _save(tmp_path / 'rgba.png', rgba)
    v16 = np.full((16, 16), 65535, np.uint16); v16[0, 0] = 0
    _save(tmp_path / 'deep' / 'mri.png', v16)
    ds = D.ImageFolderHR(tmp_path)
    assert len(ds) == 3 and ds.n_skipped == 0
    items = {it['name']: it['image'] for it in ds}
    assert set(items) == {'grey', 'rgba', 'deep/mri'}
    for x in items.values(): assert x.dtype == torch.float32 and x.shape == (3, 16, 16)
    np.testing.assert_allclose(items['grey'][0].numpy(), g / 255, atol=1e-7)
    a = 64 / 255  # green at alpha a over white: (1-a, 1, 1-a)
    np.testing.assert_allclose(items['rgba'][:, 5, 5].numpy(), [1 - a, 1, 1 - a], atol=1e-6)
    assert items['deep/mri'][0, 3, 3] == 1.0 and items['deep/mri'][0, 0, 0] == 0.0  # 65535 -> 1.0
    grey = D.ImageFolderHR(tmp_path, channels=1)
    assert all(it['image'].shape == (1, 16, 16) for it in grey)
    assert ds.sizes == [(16, 16)] * 3


def test_unreadable_files_one_warning_with_count(tmp_path):
    _save(tmp_path / 'ok.png', np.zeros((8, 8), np.uint8))
    for k in range(3): (tmp_path / f'bad{k}.jpg').write_bytes(b'\x00garbage' * k)
    (tmp_path / 'readme.txt').write_text('not an image, wrong extension: ignored, not counted')
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        ds = D.ImageFolderHR(tmp_path)
    assert len(w) == 1 and 'Skipped 3 unreadable' in str(w[0].message)
    assert len(ds) == 1 and ds.n_skipped == 3
    (tmp_path / 'ok.png').unlink()
    with pytest.warns(UserWarning, match='Skipped 3'), pytest.raises(ValueError, match='None of the 3 image file'):
        D.ImageFolderHR(tmp_path)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        D.ImageFolderHR(tmp_path / 'missing')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'empty' / 'a.txt').write_text('x')
    with pytest.raises(ValueError, match=r'No image files .*\.png, \.jpg'):
        D.ImageFolderHR(tmp_path / 'empty')
    with pytest.raises(NotADirectoryError, match='not a folder'):
        D.ImageFolderHR(tmp_path / 'empty' / 'a.txt')


def test_hrpatches_from_folder(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    _save(tmp_path / 'x.png', img)
    ds = D.HRPatches(tmp_path, patch=32, scale=4, length=3)
    for i in range(3):
        d, it = ds.locate(i), ds[i]
        crop = img[d['top']:d['top'] + 32, d['left']:d['left'] + 32] / 255
        np.testing.assert_allclose(from_model(it['hr']).permute(1, 2, 0).numpy(), crop, atol=1e-6)
        assert it['name'] == 'x'
    with pytest.raises(ValueError, match=r"'x' \(40x48\)"):
        D.HRPatches(tmp_path, patch=44)


def _pairs(root, n=3, s=4, h=8, w=12, lr_name='{k}x4.png'):
    "HR whose pixel values encode position; LR = HR[::s, ::s] (nearest), so alignment is checkable."
    rng = np.random.default_rng(1)
    for k in range(n):
        hr = rng.integers(0, 256, (h * s, w * s, 3), dtype=np.uint8)
        _save(root / 'HR' / f'{k}.png', hr)
        _save(root / 'LR' / lr_name.format(k=k), np.ascontiguousarray(hr[::s, ::s]))


def test_paired_folder(tmp_path):
    _pairs(tmp_path)
    pf = D.PairedFolder(tmp_path / 'LR', tmp_path / 'HR', scale=4, lr_suffix='x4')
    assert len(pf) == 3 and [pf[i]['name'] for i in range(3)] == ['0', '1', '2']
    it = pf[0]
    assert it['lr'].shape == (3, 8, 12) and it['hr'].shape == (3, 32, 48)
    assert it['hr'].min() >= -1 and it['hr'].max() <= 1
    hr_file = np.asarray(Image.open(tmp_path / 'HR' / '0.png'), np.float64) / 255 * 2 - 1
    np.testing.assert_allclose(it['hr'].permute(1, 2, 0).numpy(), hr_file, atol=1e-6)
    assert default_collate([pf[0], pf[1]])['lr'].shape == (2, 3, 8, 12)
    crops = D.PairedFolder(tmp_path / 'LR', tmp_path / 'HR', scale=4, lr_suffix='x4', patch=16, seed=2)
    for i in range(3):
        c = crops[i]
        assert c['lr'].shape == (3, 4, 4) and c['hr'].shape == (3, 16, 16)
        assert torch.equal(c['hr'][:, ::4, ::4], c['lr'])  # aligned: LR was HR[::4, ::4]
        assert torch.equal(crops[i]['lr'], c['lr'])  # deterministic


def test_paired_folder_errors(tmp_path):
    _pairs(tmp_path)
    with pytest.raises(ValueError, match='set lr_suffix'):
        D.PairedFolder(tmp_path / 'LR', tmp_path / 'HR', scale=4)
    with pytest.raises(ValueError, match=r"'0': HR 32x48 and LR 8x12 do not match scale 2 \(expected HR 16x24\)"):
        D.PairedFolder(tmp_path / 'LR', tmp_path / 'HR', scale=2, lr_suffix='x4')
    _save(tmp_path / 'HR' / '1.png', np.zeros((35, 50, 3), np.uint8))  # 3 and 2 pixels too large
    with pytest.raises(ValueError, match=r"'1': HR 35x50 and LR 8x12 .*modcrop=True"):
        D.PairedFolder(tmp_path / 'LR', tmp_path / 'HR', scale=4, lr_suffix='x4')
    pf = D.PairedFolder(tmp_path / 'LR', tmp_path / 'HR', scale=4, lr_suffix='x4', modcrop=True)
    assert pf[1]['hr'].shape == (3, 32, 48)
    _save(tmp_path / 'HR' / 'extra.png', np.zeros((32, 48, 3), np.uint8))
    with pytest.warns(UserWarning, match='Left out 1 file'):
        D.PairedFolder(tmp_path / 'LR', tmp_path / 'HR', scale=4, lr_suffix='x4', modcrop=True)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        D.PairedFolder(tmp_path / 'nope', tmp_path / 'HR', scale=4)
