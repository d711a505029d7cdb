"""Nothing lost: a wall-clock budget resumes exactly, a used run folder is not overwritten silently, one training per
folder, --resume checks what it continues, non-finite weights are never written or loaded, stale temporary checkpoints
are removed, and the CLI answers bad run settings with one line and exit code 2 (each case failed before this file)."""
import os, subprocess, sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffsr_kit.train as train_mod
from diffsr_kit.cli import main
from diffsr_kit.config import load_config, ConfigError
from diffsr_kit.tasks import SRConfig
from diffsr_kit.train import (RunFolderBusy, TrainingDiverged, find_checkpoint, load_task, plan_steps, save_checkpoint,
                              train)

TINY = ['task=regression', 'model.base_ch=8', 'model.ch_mult=[1,2]', 'model.attn_res=[]', 'model.image_size=16',
        'model.n_res=1', 'data.patch=16', 'data.batch=2', 'data.val_images=2', 'run.progress=false', 'run.log_every=5',
        'run.val_every=0', 'optim.ema=0.9', 'optim.warmup=2', 'diffusion.residual=true', 'model.norm_groups=4']


def cfg_for(out, *extra):
    return load_config(SRConfig, None, TINY + [f'run.out={out}', *extra])


class Stop(Exception): pass


def fake_clock(monkeypatch, sec_per_call=0.5):
    "Replace the loop's clock with one that advances a fixed amount per reading: the budget's plan becomes reproducible."
    t = [0.0]
    def now():
        t[0] += sec_per_call
        return t[0]
    monkeypatch.setattr(train_mod, '_now', now)


def final_weights(run):
    return {kind: load_file(str(find_checkpoint(run) / f'{kind}.safetensors')) for kind in ('model', 'ema')}


def test_plan_steps_fills_the_budget_and_respects_run_steps():
    assert plan_steps(25, 10_000, 1.0, 11.0, 0.6) == 25 + 1000  # 10 min left at 0.6 s/step
    assert plan_steps(25, 300, 1.0, 11.0, 0.6) == 300           # capped by run.steps
    assert plan_steps(25, 10_000, 12.0, 11.0, 0.6) == 26        # over budget already: one more step, then stop


def test_resume_with_a_wall_clock_budget_is_exact(tmp_path, monkeypatch):
    "Before: the learning rate followed the wall clock, which a resume restarted (it jumped back to the peak)."
    budget = ['run.max_minutes=0.5', 'run.steps=100000', 'run.ckpt_every=20']
    fake_clock(monkeypatch)
    a = train(cfg_for(tmp_path / 'a', *budget))
    plan = torch.load(find_checkpoint(a) / 'state.pt', weights_only=True)['plan']
    assert 30 < plan < 100, plan  # the 0.5-min budget at ~0.5 s per step, planned once
    assert int(find_checkpoint(a).name.split('_')[1]) == plan
    def kill(step, logs):
        if step == 40: raise Stop
    fake_clock(monkeypatch)
    with pytest.raises(Stop):
        train(cfg_for(tmp_path / 'b', *budget), callback=kill)
    st = torch.load(find_checkpoint(tmp_path / 'b') / 'state.pt', weights_only=True)
    assert st['step'] == 40 and st['plan'] == plan and st['minutes'] > 0
    fake_clock(monkeypatch)
    b = train(cfg_for(tmp_path / 'b', *budget), resume=True)
    wa, wb = final_weights(a), final_weights(b)
    for kind in wa:
        assert wa[kind].keys() == wb[kind].keys()
        assert all(torch.equal(wa[kind][k], wb[kind][k]) for k in wa[kind]), kind
    lr_a = [r.split(',')[1] for r in (a / 'log.csv').read_text().splitlines()[1:]]
    lr_b = [r.split(',')[1] for r in (b / 'log.csv').read_text().splitlines()[1:]]
    assert lr_a == lr_b  # the same learning rates, row for row (the resumed run appends to its log)


def test_used_folder_needs_resume_or_overwrite(tmp_path):
    run = train(cfg_for(tmp_path / 'r', 'run.steps=2'))
    before = final_weights(run)['model']
    with pytest.raises(ConfigError, match='already holds a run.*--resume.*--overwrite'):
        train(cfg_for(tmp_path / 'r', 'run.steps=2', 'run.seed=5'))
    assert all(torch.equal(before[k], final_weights(run)['model'][k]) for k in before)  # untouched
    train(cfg_for(tmp_path / 'r', 'run.steps=3', 'run.seed=5'), overwrite=True)
    assert find_checkpoint(run).name == 'step_00000003'
    assert len((run / 'log.csv').read_text().splitlines()) == 2  # header + the new run's last row (log_every 5): old rows gone


def test_second_training_in_the_same_folder_is_refused(tmp_path):
    run = tmp_path / 'r'; run.mkdir()
    sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        (run / '.lock').write_text(f'{sleeper.pid}\n')
        with pytest.raises(RunFolderBusy, match=f'PID {sleeper.pid}'):
            train(cfg_for(run, 'run.steps=1'))
    finally:
        sleeper.kill(); sleeper.wait()
    train(cfg_for(run, 'run.steps=1'))  # the lock of a process that is gone is taken over ...
    assert not (run / '.lock').exists()  # ... and released at the end


def test_resume_checks_task_and_architecture(tmp_path):
    run = train(cfg_for(tmp_path / 'r', 'run.steps=2'))
    with pytest.raises(ConfigError, match=r"model.base_ch: 8 -> 16"):
        train(cfg_for(run, 'run.steps=4', 'model.base_ch=16'), resume=True)
    with pytest.raises(ConfigError, match="holds a 'regression' run"):
        train(load_config(SRConfig, None, [t for t in TINY if t != 'task=regression'] + [f'run.out={run}', 'run.steps=4']),
              resume=True)
    train(cfg_for(run, 'run.steps=4', 'optim.lr=1e-4'), resume=True)  # optimiser settings may change
    assert find_checkpoint(run).name == 'step_00000004'


def test_stale_temporary_checkpoint_is_removed(tmp_path):
    stale = tmp_path / 'r' / 'ckpt' / '.tmp_step_00000007_999999'
    stale.mkdir(parents=True); (stale / 'model.safetensors').write_bytes(b'x' * 1000)
    train(cfg_for(tmp_path / 'r', 'run.steps=1'))
    assert not stale.exists()


def test_nonfinite_weights_never_written_nor_loaded(tmp_path, capsys):
    run = train(cfg_for(tmp_path / 'r', 'run.steps=2', 'run.ckpt_every=1'))
    t = load_task(run)
    with torch.no_grad(): next(t.modules['unet'].parameters()).fill_(float('inf'))
    with pytest.raises(TrainingDiverged, match=r'non-finite.*at step 3.*Last good checkpoint: step_00000002'):
        save_checkpoint(run, 3, t, None, {})
    assert find_checkpoint(run).name == 'step_00000002' and not (run / 'ckpt' / 'step_00000003').exists()
    ck = find_checkpoint(run)
    flat = load_file(str(ck / 'ema.safetensors'))
    k = next(k for k in flat if flat[k].is_floating_point())
    flat[k] = flat[k].clone().fill_(float('nan'))
    save_file(flat, str(ck / 'ema.safetensors'))
    with pytest.raises(ValueError, match='non-finite or exploded weights'):
        load_task(run)
    lr = tmp_path / 'lr.png'
    from PIL import Image
    Image.new('RGB', (8, 8), (120, 60, 30)).save(lr)
    assert main(['sample', '--ckpt', str(run), '--input', str(lr), '--out', str(tmp_path / 'sr.png')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'non-finite or exploded weights' in err[0], err
    assert not (tmp_path / 'sr.png').exists()


@pytest.mark.parametrize('override, key', [
    ('run.steps=-1', 'run.steps'), ('run.log_every=0', 'run.log_every'), ('data.batch=1000000000', 'data.batch'),
    ('data.patch=0', 'data.patch'), ('data.scale=3', 'data.patch'), ('optim.lr=-1', 'optim.lr'),
    ('run.keep_ckpts=0', 'run.keep_ckpts'), ('run.compile=fastest', 'run.compile'),
])
def test_dry_run_and_train_refuse_bad_run_settings(override, key, tmp_path, capsys):
    "Before: --dry-run 'validated' these and a real run trained nothing (steps=-1) or divided by zero (log_every=0)."
    for extra in (['--dry-run'], []):
        code = main(['train', '--config', 'configs/tiny_regression_x4.yaml', *extra, f'run.out={tmp_path}/r', override])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and key in err[0] and 'Traceback' not in err[0], (extra, err)
    assert not (tmp_path / 'r' / 'ckpt').exists()


def test_resume_and_overwrite_together_is_an_error(tmp_path, capsys):
    assert main(['train', '--config', 'configs/tiny_regression_x4.yaml', '--resume', '--overwrite', f'run.out={tmp_path}/r']) == 2
    assert 'pass one of them' in capsys.readouterr().err


@pytest.fixture
def bad_configs(tmp_path):
    "YAML files that used to end in a raw traceback (or, for `base:`, print another file's content)."
    files = {'broken.yaml': 'task: ddpm\nmodel: [1, 2\n', 'list.yaml': '- a\n- b\n',
             'tag.yaml': 'task: !!python/object:os.system ls\n', 'base_other.yaml': f'base: {tmp_path}/secret.txt\n'}
    (tmp_path / 'secret.txt').write_text('password: hunter2\n')
    for k, v in files.items(): (tmp_path / k).write_text(v)
    return tmp_path


@pytest.mark.parametrize('name, says', [
    ('broken.yaml', 'is not valid YAML at line 3'), ('list.yaml', 'must be a mapping of sections'),
    ('tag.yaml', 'no tags such as !!python'), ('base_other.yaml', 'is not a .yaml/.yml file'),
])
def test_bad_yaml_is_one_line_naming_the_file(bad_configs, name, says, capsys):
    assert main(['train', '--config', str(bad_configs / name), '--dry-run']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and 'hunter2' not in err[0], err


def test_unknown_device_and_damaged_checkpoint_are_one_line(tmp_path, capsys):
    assert main(['train', '--config', 'configs/tiny_regression_x4.yaml', '--dry-run', 'run.device=tpu']) == 2
    assert 'run.device' in capsys.readouterr().err
    run = train(cfg_for(tmp_path / 'r', 'run.steps=1'))
    f = find_checkpoint(run) / 'ema.safetensors'
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])  # a write cut short
    with pytest.raises(ValueError, match='not a readable safetensors file'):
        load_task(run)
    assert main(['eval', '--ckpt', str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'ema.safetensors' in err[0], err


@pytest.fixture(scope='module')
def small_ckpt(tmp_path_factory):
    return train(cfg_for(tmp_path_factory.mktemp('ck') / 'r', 'run.steps=1'))


def _png(path, w, h):
    from PIL import Image
    Image.new('RGB', (w, h), (120, 60, 30)).save(path)
    return path


@pytest.mark.parametrize('case, args, says', [
    ('degrade --scale 0', lambda d, ck: ['degrade', str(_png(d / 'a.png', 16, 16)), '--scale', '0', '--out', str(d / 'o.png')],
     '--scale 0'),
    ('degrade --out a folder', lambda d, ck: ['degrade', str(_png(d / 'a.png', 16, 16)), '--out', str(d)], 'is a folder'),
    ('sample --out a folder', lambda d, ck: ['sample', '--ckpt', str(ck), '--input', str(_png(d / 'a.png', 8, 8)), '--out', str(d)],
     'is a folder'),
    ('sample --hr --scale 3 on an x4 model', lambda d, ck: ['sample', '--ckpt', str(ck), '--hr', str(_png(d / 'a.png', 24, 24)),
                                                            '--scale', '3', '--out', str(d / 'o.png')], 'upscales by 4'),
    ('an image over the size limit', lambda d, ck: ['degrade', str(_png(d / 'big.png', 9000, 16)), '--out', str(d / 'o.png')],
     'up to 8192 pixels a side'),
    ('not an image', lambda d, ck: ['degrade', str(d / 'x.png'), '--out', str(d / 'o.png')], 'not an image file'),
])
def test_cli_bad_input_is_one_line_and_exit_2(case, args, says, tmp_path, small_ckpt, capsys):
    (tmp_path / 'x.png').write_bytes(b'this is text, not a PNG')
    assert main(args(tmp_path, small_ckpt)) == 2, case
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], (case, err)
    assert not (tmp_path / 'o.png').exists()


def test_a_run_that_cannot_fit_this_machine_is_refused_before_it_starts(tmp_path, capsys):
    "Before: data.batch=1e9 passed --dry-run and a real run grew by 200 MB/s. Now the plan is checked against this machine."
    from diffsr_kit.plan import machine_memory_mb
    have = machine_memory_mb('cpu')
    assert have is not None and have > 1000
    args = ['--config', 'configs/tiny_sr3_x4.yaml', 'data.batch=60000', 'run.device=cpu', f'run.out={tmp_path / "big"}']
    for extra in (['--dry-run'], []):
        assert main(['train', *args, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and 'data.batch=60000' in err[0] and 'lower data.batch' in err[0], err
    assert not (tmp_path / 'big').exists()   # nothing was started


def test_exploded_but_finite_weights_are_not_a_good_checkpoint(tmp_path):
    "Before: weights of 1e30 at the step before the NaN were kept as the 'last good' checkpoint and sampled to a black PNG."
    from diffsr_kit.checkpoint import nonfinite_tensors, WEIGHT_LIMIT
    from torch import nn
    m = {'net': nn.Linear(2, 2)}
    assert nonfinite_tensors(m) == []
    with torch.no_grad(): m['net'].weight[0, 0] = 1e30
    assert nonfinite_tensors(m) == ['net.weight'] and 1e30 > WEIGHT_LIMIT


def test_demo_on_a_port_in_use_is_one_line(capsys):
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); s.listen(1)
        port = s.getsockname()[1]
        assert main(['demo', '--port', str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'Port {port} on 127.0.0.1 is not free' in err[0], err
