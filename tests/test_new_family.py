"""A new model family is its module, a preset, a test and one zoo entry (DESIGN.md, 'Adding a model family').

A toy family is written to a temporary module that no file of the kit knows about. It registers its task, trains
through `train`, exports, is declared with `zoo.register_shipped`, and then appears in the demo's model list and in
the quality table, samples in both, and reloads with `load_task`, without any other file changing."""
import importlib, json, sys, textwrap

import pytest
import torch

TOY_MODULE = '''
"A toy SR family: Up(LR) plus a learned 3x3 correction (one convolution)."
import torch
import torch.nn.functional as F
from diffsr_kit.train import Task, register_task
from diffsr_kit.tasks import SRConfig

@register_task('toy_residual_conv')
class ToyResidualTask(Task):
    "SR = Up(LR) + conv(Up(LR)): one pass, L1 loss."
    config_cls = SRConfig

    def __init__(self, cfg, device, pretrained=True):
        super().__init__(cfg, device, pretrained)
        self.modules = {'net': torch.nn.Conv2d(cfg.data.channels, cfg.data.channels, 3, padding=1).to(device)}

    def _sr(self, net, lr):
        up = F.interpolate(lr, scale_factor=self.cfg.data.scale, mode='bicubic', align_corners=False)
        return up + net(up)

    def loss(self, phase, batch, step):
        l = (self._sr(self.modules['net'], batch['lr']) - batch['hr']).abs().mean()
        return l, {'loss': l.detach()}

    @torch.no_grad()
    def predict(self, lr, seed=0, modules=None, return_trajectory=False, **options):
        sr = self._sr((modules or self.eval_modules)['net'], lr).clamp(-1, 1)
        return (sr, None) if return_trajectory else sr
'''

@pytest.fixture
def toy_family(tmp_path, monkeypatch):
    "The toy module imported from a temporary folder, its task trained and exported into a temporary assets/."
    from diffsr_kit.train import TASKS, load_run_config, train, export_checkpoint
    from diffsr_kit import zoo
    (tmp_path / 'toyfamily_mod.py').write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module('toyfamily_mod')
    cfg = load_run_config(None, ['task=toy_residual_conv', 'data.patch=32', 'data.batch=2', 'data.val_images=2', 'run.steps=6',
                                 'run.val_every=0', 'run.ckpt_every=0', 'run.log_every=2', 'run.device=cpu', 'run.progress=false',
                                 f'run.out={tmp_path / "run"}', 'optim.ema=0'])
    train(cfg)
    assets = tmp_path / 'assets'
    export_checkpoint(tmp_path / 'run', assets / 'tiny_toy_x4')
    monkeypatch.setenv('DIFFSR_ASSETS', str(assets))
    entry = zoo.register_shipped(zoo.ShippedModel('toy-x4', 'tiny_toy_x4', 'toy_residual_conv',
                                                  (zoo.QualityRow('toy', 'Toy (Up(LR) + conv)', None, 1),)))
    try: yield entry, assets
    finally:
        zoo.ZOO.pop('toy-x4', None); TASKS.pop('toy_residual_conv', None); sys.modules.pop('toyfamily_mod', None)
        from diffsr_kit import demo
        demo.MODELS.pop('toy-x4', None)

def test_a_new_family_reaches_the_demo_and_the_quality_table(toy_family):
    from diffsr_kit import demo, quality
    from diffsr_kit.train import load_task
    entry, assets = toy_family
    task = load_task(assets / 'tiny_toy_x4')
    assert task.name == 'toy_residual_conv' and json.loads((assets / 'tiny_toy_x4' / 'meta.json').read_text())['step'] == 6
    ok, missing = demo.models_available()
    assert 'toy-x4' in ok and 'toy-x4' not in missing
    lr = torch.rand(1, 3, 12, 10)
    out = ok['toy-x4'].run(lr, seed=0, n_samples=2)
    assert out['sr'].shape == (2, 3, 48, 40) and out['trajectory'] == []
    assert ok['toy-x4'].samplers == {}  # no sampler choice: the task declares none
    assert 'toy' in quality.QUALITY_METHODS and quality.QUALITY_METHODS['toy'].folder == 'tiny_toy_x4'
    res = quality.bench_quality(methods='bicubic,toy', size=32, max_images=2, batch=2, device='cpu', assets=assets, progress=False)
    rows = {r['method']: r for r in res['rows']}
    assert set(rows) == {'Bicubic', 'Toy (Up(LR) + conv)'}
    toy, bic = rows['Toy (Up(LR) + conv)'], rows['Bicubic']
    assert toy['psnr'] is not None and 10 < toy['psnr'] < 60 and toy['params'] == 3 * 3 * 9 + 3
    assert toy['psnr'] != bic['psnr']  # it ran its own network, not bicubic

def test_zoo_declarations_match_the_shipped_checkpoints():
    "Each declared checkpoint that is present holds the task the zoo says; every demo and table entry comes from the zoo."
    from diffsr_kit import zoo, demo, quality
    from diffsr_kit.core import assets_dir
    for m in zoo.ZOO.values():
        if m.folder is None: continue
        meta = assets_dir() / m.folder / 'meta.json'
        if meta.exists(): assert json.loads(meta.read_text())['config']['task'] == m.task, m.key
    assert list(quality.QUALITY_METHODS) == list(zoo.quality_rows())
    assert [k for k in demo.MODELS if not k.startswith('bicubic-')] == [m.key for m in zoo.shipped('demo')]
