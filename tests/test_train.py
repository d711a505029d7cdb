"The trainer: exact resume, NaN stop, atomic checkpoints, config errors, and the train/sample/eval CLI."
import json, os, subprocess, sys
from pathlib import Path
import pytest
import torch
from diffsr_kit.config import load_config, ConfigError
from diffsr_kit.tasks import SRConfig, DDPMTask
from diffsr_kit.train import train, load_task, find_checkpoint, TrainingDiverged, save_checkpoint, TASKS
import diffsr_kit.train as train_mod
import diffsr_kit.checkpoint as checkpoint_mod

TINY = ['model.base_ch=8', 'model.ch_mult=[1,2]', 'model.attn_res=[]', 'model.image_size=16', 'model.n_res=1',
        'data.patch=16', 'data.batch=2', 'data.val_images=2', 'run.progress=false', 'run.log_every=1',
        'run.val_every=0', 'diffusion.T=20', 'sample.steps=3', 'optim.ema=0.9', 'optim.warmup=2', 'run.keep_ckpts=5']

def cfg_for(out, *extra, task='ddpm'):
    return load_config(SRConfig, None, TINY + [f'run.out={out}', f'task={task}', *extra])

def weights(run, kind='model'):
    from safetensors.torch import load_file
    return load_file(str(find_checkpoint(run) / f'{kind}.safetensors'))

class Stop(Exception): pass

@pytest.mark.parametrize('task', ['ddpm', 'regression'])
def test_resume_equals_uninterrupted(tmp_path, task):
    # 4 steps straight vs 2 steps, killed, then resumed to 4: same weights, EMA and optimiser moments.
    straight = train(cfg_for(tmp_path / 'a', 'run.steps=4', 'run.ckpt_every=2', task=task))
    def kill(step, logs):
        if step == 2: raise Stop
    with pytest.raises(Stop):
        train(cfg_for(tmp_path / 'b', 'run.steps=4', 'run.ckpt_every=2', task=task), callback=kill)
    assert find_checkpoint(tmp_path / 'b').name == 'step_00000002'
    resumed = train(cfg_for(tmp_path / 'b', 'run.steps=4', 'run.ckpt_every=2', task=task), resume=True)
    for kind in ('model', 'ema'):
        a, b = weights(straight, kind), weights(resumed, kind)
        assert a.keys() == b.keys()
        # CPU float32 with the same RNG stream: identical up to 1e-6 (in practice bit-equal)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    sa = torch.load(find_checkpoint(straight) / 'state.pt', weights_only=True)
    sb = torch.load(find_checkpoint(resumed) / 'state.pt', weights_only=True)
    assert sa['step'] == sb['step'] == 4
    ea, eb = sa['opts']['main']['state'], sb['opts']['main']['state']
    assert all(torch.allclose(ea[i]['exp_avg_sq'], eb[i]['exp_avg_sq'], atol=1e-9) for i in ea)

def test_nan_loss_stops_and_last_checkpoint_loads(tmp_path, monkeypatch):
    orig = DDPMTask.loss
    def flaky(self, phase, batch, step):
        loss, parts = orig(self, phase, batch, step)
        return (loss * float('nan') if step >= 2 else loss), parts
    monkeypatch.setattr(DDPMTask, 'loss', flaky)
    with pytest.raises(TrainingDiverged, match=r"became nan at step 3.*step_00000002"):
        train(cfg_for(tmp_path / 'r', 'run.steps=6', 'run.ckpt_every=2'))
    monkeypatch.setattr(DDPMTask, 'loss', orig)
    t = load_task(tmp_path / 'r')
    assert t.step == 2
    lr = torch.rand(1, 3, 4, 4) * 2 - 1
    assert torch.isfinite(t.predict(lr, seed=0)).all()

def test_interrupted_checkpoint_write_keeps_the_good_one(tmp_path, monkeypatch):
    run = train(cfg_for(tmp_path / 'r', 'run.steps=2', 'run.ckpt_every=2'))
    good = find_checkpoint(run); before = weights(run)
    task = load_task(run); task.name = 'ddpm'
    def boom(*a, **k): raise OSError('disk full')
    monkeypatch.setattr(checkpoint_mod, 'save_file', boom)  # the checkpoint module writes the files
    with pytest.raises(OSError, match='disk full'):
        save_checkpoint(run, 3, task, None, {})
    assert find_checkpoint(run) == good
    after = weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not [p for p in (run / 'ckpt').iterdir() if p.name.startswith('.tmp')]

def test_same_seed_same_sample_and_validation_logged(tmp_path):
    run = train(cfg_for(tmp_path / 'r', 'run.steps=2'))
    t = load_task(run)
    lr = torch.rand(2, 3, 4, 4) * 2 - 1
    assert torch.equal(t.predict(lr, seed=3), t.predict(lr, seed=3))
    assert not torch.equal(t.predict(lr, seed=3), t.predict(lr, seed=4))
    val = (run / 'val.csv').read_text().splitlines()
    assert val[0].split(',')[:4] == ['step', 'psnr', 'ssim', 'lr_psnr'] and len(val) == 2
    assert (run / 'samples' / 'step_00000002.png').exists() and (run / 'config.yaml').exists()

@pytest.mark.parametrize('cond', ['concat', 'multiscale', 'middle'])
def test_each_conditioning_mode_loss_falls_on_fixed_batch(cond):
    torch.manual_seed(0)
    cfg = load_config(SRConfig, None, TINY + [f'model.cond={cond}', 'diffusion.T=100'])
    task = DDPMTask(cfg, torch.device('cpu'))
    hr = torch.rand(4, 3, 16, 16) * 2 - 1
    batch = {'hr': hr, 'lr': torch.nn.functional.avg_pool2d(hr, 4)}
    opt = torch.optim.Adam(task.modules['unet'].parameters(), 2e-3)
    t = torch.full((4,), 60); eps = torch.randn_like(hr)
    u = task.modules['unet']
    def loss():  # the diffusion loss at a fixed t and noise, so only the weights change
        return task.diffusion.training_losses(lambda x, tt, **c: u(x, tt, **c), hr, t=t, eps=eps, lr=batch['lr'])['loss']
    first = loss().item()
    for _ in range(40):
        l = loss(); opt.zero_grad(); l.backward(); opt.step()
    assert loss().item() < 0.5 * first

DIFFSR = str(Path(sys.executable).with_name('diffsr'))
def cli(*args, ok=True):
    r = subprocess.run([DIFFSR, *map(str, args)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, 'TQDM_DISABLE': '1'})
    if ok: assert r.returncode == 0, r.stderr[-4000:]
    return r

@pytest.mark.parametrize('bad,key', [('optim.lrr=1', 'optim.lrr'), ('run.steps=many', 'run.steps'), ('model.chmult=[1]', 'model.chmult')])
def test_bad_config_key_is_named(bad, key):
    r = cli('train', '--config', 'configs/tiny_sr3_x4.yaml', bad, '--dry-run', ok=False)
    assert r.returncode == 2 and key in r.stderr, r.stderr

def test_every_preset_validates():
    for p in sorted(Path('configs').glob('*.yaml')):
        r = cli('train', '--config', p, '--dry-run')
        assert 'task:' in r.stdout, p

def test_cli_train_sample_eval(tmp_path):
    out = tmp_path / 'run'
    cli('train', '--config', 'configs/tiny_sr3_x4.yaml', *TINY, 'run.steps=2', 'run.max_minutes=0', f'run.out={out}')
    from skimage import data
    from PIL import Image
    lr = tmp_path / 'lr.png'; Image.fromarray(data.astronaut()[100:112, 200:220]).save(lr)
    sr = tmp_path / 'sr.png'
    info = json.loads(cli('sample', '--ckpt', out, '--input', lr, '--steps', 2, '--out', sr).stdout)
    assert Image.open(sr).size == (80, 48) and info['sr_size'] == [48, 80]
    res = json.loads(cli('eval', '--ckpt', out, '--size', 64, '--steps', 2, '--json').stdout)
    methods = [r['method'] for r in res['rows']]
    assert methods[0] == 'bicubic' and len(methods) == 2
    assert all(0 < r['psnr'] < 100 and -1 <= r['ssim'] <= 1 for r in res['rows'])
    assert res['convention']['crop_border'] == 4
    r = cli('sample', '--ckpt', tmp_path / 'nowhere', '--input', lr, '--out', sr, ok=False)
    assert r.returncode == 2 and 'No checkpoint' in r.stderr

def test_export_round_trip(tmp_path):
    run = train(cfg_for(tmp_path / 'r', 'run.steps=2'))
    r = json.loads(cli('export', '--ckpt', run, '--out', tmp_path / 'asset', '--command', 'diffsr train ...').stdout)
    from safetensors.torch import load_file
    w = load_file(str(tmp_path / 'asset' / 'model.safetensors'))
    meta = json.loads((tmp_path / 'asset' / 'meta.json').read_text())
    assert meta['weights'] == 'ema' and meta['command'] == 'diffsr train ...' and r['mb'] < 4
    assert any(t.dtype == torch.float16 for t in w.values())
    full, small = load_task(run), load_task(tmp_path / 'asset')
    lr = torch.rand(1, 3, 4, 4) * 2 - 1
    # fp16 storage rounds weights by <= 1e-3 relative; the sampled images stay within a few 1e-3
    assert (full.predict(lr, seed=0) - small.predict(lr, seed=0)).abs().max() < 2e-2

def test_lr_schedule_against_formula():
    import math
    from diffsr_kit.train import lr_at, OptimConfig
    o = OptimConfig(lr=1e-3, min_lr=1e-5, warmup=10)
    cos = lambda f: 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * f))
    assert math.isclose(lr_at(4, o, 110), 1e-3 * 5 / 10)                  # linear warm-up
    assert math.isclose(lr_at(60, o, 110), cos(0.5))                       # half-way through the decay
    assert math.isclose(lr_at(60, o, 110, time_frac=0.75), cos(0.75))      # a wall-clock budget 75% used leads
    assert math.isclose(lr_at(60, o, 110, time_frac=0.25), cos(0.5))       # ... only when it is further along
    assert math.isclose(lr_at(200, o, 110, time_frac=2.0), 1e-5)

def test_ema_warmup_follows_data_initialised_weights(tmp_path):
    # a data-initialised model (VQ codebook + PCA shortcut from the first batch): the EMA must not keep
    # the random initial weights (the bug this guards against left EMA reconstructions ~25 dB below the model's)
    from diffsr_kit.tasks import AERunConfig, recon_metrics
    from diffsr_kit.train import EMA
    e = EMA({'a': torch.nn.Linear(1, 1)}, 0.999)
    ds = []
    for n in range(5): ds.append(e.current_decay); e.update({'a': torch.nn.Linear(1, 1)})
    assert ds == [min(0.999, (1 + n) / (10 + n)) for n in range(5)]
    cfg = load_config(AERunConfig, None, ['model.kind=vqvae', 'model.base_ch=8', 'model.ch_mult=[1,2,2]', 'model.norm_groups=4',
                                          'model.z_ch=8', 'model.groups=4', 'model.shortcut=true', 'data.patch=32', 'data.batch=4',
                                          'data.val_images=4', 'run.steps=20', 'run.progress=false', 'optim.ema=0.999',
                                          'scale_batches=1', f'run.out={tmp_path}/ae'])
    run = train(cfg)
    model, ema = load_task(run, weights='model'), load_task(run, weights='ema')
    hr = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        pm = recon_metrics(model.modules['ae'], hr)['psnr']; pe = recon_metrics(ema.modules['ae'], hr)['psnr']
    assert pe > pm - 3.0, (pm, pe)


# ---------------------------------------------------------------- Binder presets: < 2 GB of RAM
BINDER = sorted(p.name for p in (Path(__file__).parents[1] / 'configs').glob('*_binder.yaml'))

def test_every_sr_preset_has_a_binder_variant():
    assert {'tiny_sr3_x4_binder.yaml', 'tiny_sr4_x4_binder.yaml', 'tiny_regression_x4_binder.yaml', 'tiny_edsr_x4_binder.yaml',
            'tiny_vae_ddpm_x4_binder.yaml', 'tiny_vqvae_ddpm_x4_binder.yaml'} <= set(BINDER)

@pytest.mark.parametrize('name', BINDER)
def test_binder_preset_peak_memory_under_2gb(name, tmp_path):
    # the real CLI in a fresh interpreter (a few steps, then the end-of-run validation and checkpoint);
    # the peak resident memory of that process is what Binder's 2 GB limit applies to
    import subprocess, sys
    root = Path(__file__).parents[1]
    # VmHWM is this process's own peak (ru_maxrss would also carry the parent's peak across fork + exec on Linux)
    code = ("import re, sys; from diffsr_kit.cli import main; rc = main(sys.argv[1:]); "
            "print('MAXRSS_KB', re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)); sys.exit(rc)")
    r = subprocess.run([sys.executable, '-c', code, 'train', '--config', str(root / 'configs' / name), 'run.steps=3',
                        f'run.out={tmp_path / "run"}', 'run.progress=false'],
                       capture_output=True, text=True, cwd=root, timeout=600,
                       env={**os.environ, 'OMP_NUM_THREADS': '1', 'TQDM_DISABLE': '1'})
    assert r.returncode == 0, r.stderr[-3000:]
    kb = int(r.stdout.split('MAXRSS_KB')[-1].split()[0])
    assert kb < 2 * 1024 ** 2, f'{name}: peak RSS {kb / 1024:.0f} MB is over Binder\'s 2 GB'
    assert (tmp_path / 'run' / 'ckpt' / 'latest').exists()


def test_a_notebook_class_never_replaces_a_module_task():
    # nbdev-test runs many notebooks in one process: a task class defined in a notebook (module '__main__') must not
    # shadow the package's class, whose config dataclass OmegaConf can resolve
    from diffsr_kit.train import register_task, get_task
    real = get_task('ddpm')
    fake = type('NotebookDDPM', (real,), {'__module__': '__main__'})
    register_task('ddpm')(fake)
    assert get_task('ddpm') is real
    register_task('notebook_only_task')(fake)  # a name only a notebook defines is still registered
    assert get_task('notebook_only_task') is fake
    TASKS.pop('notebook_only_task')
