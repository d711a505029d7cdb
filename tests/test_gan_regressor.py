"""The diffusion-GAN families (SRDDGAN, LDDPM) with their residual chain taken to a frozen regressor (`regressor=...`):
a regressor that predicts exactly Up(LR) gives the Up(LR)-residual model bit for bit; a trained one shifts the chain by
its own prediction (compared against `RegressionTask.predict`, not the code under test); it is frozen, not optimised,
and travels in the checkpoint; and the config refuses it on a chain that is not residual.
Also: exports leave out `Task.train_only` modules (CG-DPM's chain pool) and still load and sample."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from diffsr_kit.config import load_config, ConfigError
from diffsr_kit.diffusion import upsample_lr
from diffsr_kit.lddpm import LDDPMConfig, LDDPMTask
from diffsr_kit.srddgan import SRDDGANConfig, SRDDGANTask
from diffsr_kit.tasks import RegressionTask, SRConfig
from diffsr_kit.train import export_checkpoint, load_task, save_checkpoint

CPU = torch.device('cpu')
REG = ['task=regression', 'model.base_ch=16', 'model.ch_mult=[1,2]', 'model.attn_res=[]', 'model.image_size=32',
       'data.patch=32', 'diffusion.residual=true', 'model.norm_groups=8']
FAMILIES = {  # task class, config class, small overrides (8 -> 32, x4), the residual switch
    'srddgan': (SRDDGANTask, SRDDGANConfig,
                ['model.base_ch=16', 'model.ch_mult=[1,2]', 'model.attn_res=[]', 'model.image_size=32', 'model.z_dim=8',
                 'model.cond_ch=11', 'rrdb.nf=8', 'rrdb.nb=1', 'rrdb.gc=8', 'disc.base_ch=16', 'disc.ch_mult=[1,2]',
                 'data.patch=32', 'data.batch=2', 'gan.beta=0', 'gan.eta=0', 'gan.pixel=1'], 'gan.residual'),
    'lddpm': (LDDPMTask, LDDPMConfig,
              ['model.base_ch=16', 'model.ch_mult=[1,2]', 'model.attn_res=[]', 'model.image_size=32', 'model.z_dim=8',
               'model.ctx_ch=32', 'cond.ctx_ch=32', 'cond.enc_ch=4', 'cond.n_down=0', 'cond.n_blocks=1', 'cond.z_ch=2',
               'cond.cvae_hidden=8', 'cond.glow_hidden=8', 'disc.base_ch=8', 'disc.ch_mult=[1,2]', 'disc.t_dim=16',
               'data.patch=32', 'data.batch=2', 'lddpm.vgg=random', 'lddpm.w_content=0', 'lddpm.w_style=0'], 'lddpm.residual'),
}


def _batch():
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    return hr, F.avg_pool2d(hr, 4)


@pytest.fixture(scope='module')
def regressors(tmp_path_factory):
    "Two regression checkpoints: 'fresh' (zero output head: predicts exactly Up(LR)) and 'trained' (perturbed weights)."
    d = tmp_path_factory.mktemp('reg')
    torch.manual_seed(0)
    reg = RegressionTask(load_config(SRConfig, None, REG), CPU)
    save_checkpoint(d / 'fresh', 1, reg, None, {})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reg.modules['unet'].parameters(): p.add_(0.05 * torch.randn(p.shape, generator=g))
    save_checkpoint(d / 'trained', 1, reg, None, {})
    return d, reg


def _task(family, *extra):
    cls, cfg_cls, small, switch = FAMILIES[family]
    torch.manual_seed(0)
    return cls(load_config(cfg_cls, None, small + [f'{switch}=true', *extra]), CPU)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_identity_regressor_gives_the_up_lr_residual_model(family, regressors):
    d, _ = regressors
    hr, lr = _batch()
    plain, fresh = _task(family), _task(family, f'regressor={d}/fresh')
    for k, m in plain.modules.items(): fresh.modules[k].load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh.to_chain(hr, lr), plain.to_chain(hr, lr), rtol=0, atol=0)
    torch.testing.assert_close(fresh.predict(lr, seed=2, modules=fresh.modules), plain.predict(lr, seed=2, modules=plain.modules),
                               rtol=0, atol=0)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_trained_regressor_is_the_base_frozen_and_saved(family, regressors, tmp_path):
    d, reg = regressors
    hr, lr = _batch()
    task = _task(family, f'regressor={d}/trained')
    pred = reg.predict(lr)  # the regression model's own SR image (clamped to [-1, 1])
    assert (pred - upsample_lr(lr, (32, 32))).abs().mean() > 1e-3  # it differs from Up(LR): the test can tell them apart
    y0 = task.to_chain(hr, lr)
    torch.testing.assert_close((hr - y0).clamp(-1, 1), pred, rtol=0, atol=1e-6)
    torch.testing.assert_close(task.decode_chain(torch.zeros_like(hr), lr), pred, rtol=0, atol=1e-6)
    trained = {id(p) for ps in task.param_groups().values() for p in ps}
    assert not any(id(p) in trained for p in task.modules['regressor'].parameters())  # frozen: in no optimiser
    before = {k: v.clone() for k, v in task.modules['regressor'].state_dict().items()}
    for phase in task.param_groups():
        loss, _ = task.loss(phase, {'hr': hr, 'lr': lr}, 0)
        assert loss.isfinite()
        loss.backward()
    assert all(p.grad is None for p in task.modules['regressor'].parameters())
    assert all(torch.equal(v, task.modules['regressor'].state_dict()[k]) for k, v in before.items())
    task.name = family
    save_checkpoint(tmp_path / 'run', 1, task, None, {})
    shutil.copytree(d, tmp_path / 'regs'); shutil.rmtree(d / 'trained')  # the regressor's own folder is gone ...
    try:
        back = load_task(tmp_path / 'run')  # ... and the checkpoint still holds it
        torch.testing.assert_close(back.predict(lr, seed=3), task.predict(lr, seed=3, modules=task.modules), rtol=0, atol=0)
    finally:
        shutil.copytree(tmp_path / 'regs' / 'trained', d / 'trained')


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_regressor_needs_a_residual_chain(family, regressors):
    d, _ = regressors
    cls, cfg_cls, small, switch = FAMILIES[family]
    with pytest.raises(ConfigError, match=f'needs {switch}=true'):
        cls(load_config(cfg_cls, None, small + [f'{switch}=false', f'regressor={d}/fresh']), CPU)


def test_export_leaves_out_train_only_modules(tmp_path):
    "CG-DPM's chain pool is training state: the run's checkpoint keeps it (for --resume), the export does not."
    from safetensors import safe_open
    from diffsr_kit.cgdpm import CGDPMTask, CGDPMConfig
    from diffsr_kit.tasks import DDPMTask
    base_over = ['model.base_ch=16', 'model.ch_mult=[1,2]', 'model.attn_res=[]', 'model.image_size=32', 'data.patch=32',
                 'diffusion.T=50', 'sample.steps=5', 'model.norm_groups=8']
    torch.manual_seed(0)
    base = DDPMTask(load_config(SRConfig, None, base_over), CPU); base.name = 'ddpm'
    save_checkpoint(tmp_path / 'base', 1, base, None, {})
    cg = CGDPMTask(load_config(CGDPMConfig, None, [f'guide.ddpm={tmp_path}/base', 'guide.model.base_ch=8',
                                                   'guide.model.ch_mult=[1,2]', 'guide.model.attn_res=[]',
                                                   'guide.model.norm_groups=4', 'guide.chain_steps=5', 'data.patch=32',
                                                   'data.batch=2']), CPU)
    assert CGDPMTask.train_only == ('pool',) and 'pool' in cg.modules
    save_checkpoint(tmp_path / 'cg', 1, cg, None, {})
    with safe_open(str(tmp_path / 'cg' / 'ckpt' / 'step_00000001' / 'model.safetensors'), 'pt') as f:
        assert any(k.startswith('pool.') for k in f.keys())
    out = export_checkpoint(tmp_path / 'cg', tmp_path / 'exp')
    with safe_open(str(out / 'model.safetensors'), 'pt') as f:
        keys = list(f.keys())
    assert keys and not any(k.startswith('pool.') for k in keys)
    assert {k.split('.')[0] for k in keys} == {'unet', 'guide'}
    _, lr = _batch()
    back = load_task(out)
    torch.testing.assert_close(back.predict(lr, seed=1, steps=5), cg.predict(lr, seed=1, steps=5, modules=cg.modules),
                               rtol=0, atol=2e-3)  # fp16 export of the weights


def test_export_shares_a_module_a_sibling_asset_stores(tmp_path, regressors):
    "An SRDDGAN exported beside its regressor's export stores the regressor by reference; it loads and samples as the"
    "self-contained export does, and a missing or retrained regressor folder is refused by name."
    d, _ = regressors
    export_checkpoint(d / 'trained', tmp_path / 'assets' / 'reg')
    task = _task('srddgan', f'regressor={tmp_path}/assets/reg')
    save_checkpoint(tmp_path / 'gan', 1, task, None, {})
    shared = export_checkpoint(tmp_path / 'gan', tmp_path / 'assets' / 'gan')
    alone = export_checkpoint(tmp_path / 'gan', tmp_path / 'elsewhere' / 'gan')  # no sibling: stores everything
    whole = export_checkpoint(tmp_path / 'gan', tmp_path / 'assets' / 'gan_whole', share=False)  # export --no-share
    assert __import__('json').loads((whole / 'meta.json').read_text())['shared'] == {}
    assert (whole / 'model.safetensors').read_bytes() == (alone / 'model.safetensors').read_bytes()
    meta = __import__('json').loads((shared / 'meta.json').read_text())
    assert set(meta['shared']) == {'regressor'} and meta['shared']['regressor']['asset'] == 'reg'
    assert (shared / 'model.safetensors').stat().st_size < (alone / 'model.safetensors').stat().st_size
    _, lr = _batch()
    torch.testing.assert_close(load_task(shared).predict(lr, seed=2), load_task(alone).predict(lr, seed=2), rtol=0, atol=0)
    reg = load_task(tmp_path / 'assets' / 'reg')                    # the regressor is retrained: its folder changes
    with torch.no_grad():
        next(reg.modules['unet'].parameters()).add_(0.01)
    save_checkpoint(tmp_path / 'reg2', 2, reg, None, {})
    shutil.rmtree(tmp_path / 'assets' / 'reg'); export_checkpoint(tmp_path / 'reg2', tmp_path / 'assets' / 'reg')
    with pytest.raises(ValueError, match="changed since.*Retrain gan"):
        load_task(shared)
    shutil.rmtree(tmp_path / 'assets' / 'reg')
    with pytest.raises(FileNotFoundError, match="shares its 'regressor' weights with reg/"):
        load_task(shared)
