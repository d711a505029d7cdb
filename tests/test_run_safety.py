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
    if name != 'base_other.yaml': assert name in err[0], err  # the message names the file


def test_a_base_outside_the_kit_is_not_printed(tmp_path, capsys):
    "A .yaml `base:` anywhere on disk: its unknown keys are named, its values never printed (stdout or stderr)."
    (tmp_path / 'other.yaml').write_text('password: hunter2\n')
    (tmp_path / 'c.yaml').write_text(f'base: {tmp_path}/other.yaml\n')
    assert main(['train', '--config', str(tmp_path / 'c.yaml'), '--dry-run']) == 2
    out = capsys.readouterr()
    assert 'hunter2' not in out.out + out.err and len(out.err.strip().splitlines()) == 1, out


def test_unknown_device_and_damaged_checkpoint_are_one_line(tmp_path, capsys):
    assert main(['train', '--config', 'configs/tiny_regression_x4.yaml', '--dry-run', 'run.device=tpu']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'run.device' in err[0] and 'Traceback' not in err[0], err
    run = train(cfg_for(tmp_path / 'r', 'run.steps=1'))
    f = find_checkpoint(run) / 'ema.safetensors'
    f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])  # a write cut short
    with pytest.raises(ValueError, match='not a readable safetensors file'):
        load_task(run)
    assert main(['eval', '--ckpt', str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'ema.safetensors' in err[0], err
    f.write_bytes(b'\x40\x00\x00\x00\x00\x00\x00\x00' + b'{not json at all' * 4)  # a corrupt header, not a short file
    with pytest.raises(ValueError, match='ema.safetensors'):
        load_task(run)
    assert main(['eval', '--ckpt', str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'ema.safetensors' in err[0] and 'Traceback' not in err[0], err


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


def test_exploded_but_finite_weights_are_not_a_good_checkpoint(tmp_path, capsys):
    "Before: weights of 1e30 at the step before the NaN were kept as the 'last good' checkpoint and sampled to a black PNG."
    from diffsr_kit.checkpoint import nonfinite_tensors, WEIGHT_LIMIT
    from torch import nn
    m = {'net': nn.Linear(2, 2)}
    assert nonfinite_tensors(m) == []
    with torch.no_grad(): m['net'].weight[0, 0] = 1e30
    assert nonfinite_tensors(m) == ['net.weight'] and 1e30 > WEIGHT_LIMIT
    # the same through the checkpoint writer and `sample`: 1e30 is finite, and still never a good checkpoint
    run = train(cfg_for(tmp_path / 'r', 'run.steps=2', 'run.ckpt_every=1'))
    t = load_task(run)
    with torch.no_grad(): next(t.modules['unet'].parameters()).view(-1)[0] = 1e30
    with pytest.raises(TrainingDiverged, match='Last good checkpoint: step_00000002'):
        save_checkpoint(run, 3, t, None, {})
    ck = find_checkpoint(run)
    assert ck.name == 'step_00000002'
    flat = load_file(str(ck / 'ema.safetensors'))
    k = next(k for k in flat if flat[k].is_floating_point())
    flat[k] = flat[k].clone(); flat[k].view(-1)[0] = 1e30
    save_file(flat, str(ck / 'ema.safetensors'))
    lr = _png(tmp_path / 'lr.png', 8, 8)
    assert main(['sample', '--ckpt', str(run), '--input', str(lr), '--out', str(tmp_path / 'sr.png')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'exploded' in err[0], err
    assert not (tmp_path / 'sr.png').exists()


def test_a_real_second_training_is_refused_while_the_first_runs(tmp_path, capsys):
    "The lock is taken by a running training (not written by the test): a second one in its folder stops with its PID."
    import time
    run = tmp_path / 'r'
    args = ['train', '--config', 'configs/tiny_regression_x4.yaml', *TINY, 'run.steps=100000', f'run.out={run}']
    first = subprocess.Popen([sys.executable, '-m', 'diffsr_kit.cli', *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try:
        t0 = time.time()
        while not (run / '.lock').exists() and time.time() - t0 < 120 and first.poll() is None: time.sleep(0.2)
        assert (run / '.lock').read_text().split()[0] == str(first.pid)
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f'PID {first.pid}' in err[0], err
    finally:
        first.kill(); first.wait()


@pytest.mark.parametrize('error', [
    TrainingDiverged('The loss became non-finite at step 7. Last good checkpoint: step_00000005. Lower optim.lr.'),
    PermissionError(13, 'Permission denied', 'runs/readonly/ckpt'),
])
def test_training_errors_reach_the_user_as_one_line(error, monkeypatch, tmp_path, capsys):
    "A run that diverges, or a run folder that cannot be written, ends with one line and exit code 2 (--debug keeps the traceback)."
    def boom(*a, **k): raise error
    monkeypatch.setattr(train_mod, 'train', boom)
    args = ['train', '--config', 'configs/tiny_regression_x4.yaml', f'run.out={tmp_path}/r']
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'Traceback' not in err[0] and (str(error.args[0]) in err[0] or 'Permission denied' in err[0]), err
    with pytest.raises(type(error)): main(['--debug', *args])


@pytest.mark.parametrize('cmd', ['degrade', 'sample --input', 'sample --hr'])
def test_a_decompression_bomb_is_refused_from_its_header(cmd, tmp_path, small_ckpt, monkeypatch, capsys):
    "An 8000x8000 PNG of a few kB (64 M pixels, 768 MB as floats): refused before any pixel is decoded."
    import diffsr_kit.data as data_mod
    from PIL import Image
    bomb = tmp_path / 'bomb.png'
    Image.new('L', (8000, 8000)).save(bomb, optimize=True)
    assert bomb.stat().st_size < 200_000
    def never(*a, **k): raise AssertionError('the image was decoded')
    monkeypatch.setattr(data_mod, 'read_image', never)
    args = {'degrade': ['degrade', str(bomb)], 'sample --input': ['sample', '--ckpt', str(small_ckpt), '--input', str(bomb)],
            'sample --hr': ['sample', '--ckpt', str(small_ckpt), '--hr', str(bomb)]}[cmd]
    assert main([*args, '--out', str(tmp_path / 'o.png')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '64.0 M pixels' in err[0] and '--max-pixels' in err[0], err
    assert not (tmp_path / 'o.png').exists()


def test_demo_on_a_port_in_use_is_one_line(capsys):
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); s.listen(1)
        port = s.getsockname()[1]
        assert main(['demo', '--port', str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f'Port {port} on 127.0.0.1 is not free' in err[0], err
