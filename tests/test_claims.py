"Claims table: registry configs, verdict logic, and one tiny end-to-end run checked against independent recomputations."
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from diffsr_kit import claims as C
from diffsr_kit.config import ConfigError

TINY = ['model.base_ch=8', 'model.image_size=32', 'data.patch=32', 'data.batch=2', 'data.val_images=2']


@pytest.mark.parametrize('name', list(C.ARMS))
def test_every_arm_builds_a_valid_config(name):
    "Each arm's overrides are known keys of the right type and its task builds (cross-field checks)."
    arm = C.ARMS[name]
    cfg = C.check_arm(arm, runs_dir='runs/claims')
    assert cfg.run.max_minutes == 3.0 and cfg.run.steps == C.STEPS_UNCAPPED and cfg.run.val_every == 0
    for o in arm.overrides:  # every override reached the config (read back through the dotted path)
        key, val = o.split('=', 1)
        node = cfg
        for part in key.split('.'): node = getattr(node, part)
        val = val[1:-1] if len(val) >= 2 and val[0] == val[-1] and val[0] in '\'"' else val  # YAML quotes: "regressor=''"
        want = {'true': True, 'false': False}.get(val, val)
        assert str(node) == str(want) or node == type(node)(want), (name, key, node, val)
    if arm.base:
        assert getattr(cfg.guide, arm.base_key.split('.')[1]) == str(C.run_dir('runs/claims', C.ARMS[arm.base].run_key))


def test_bad_override_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match='gan.nope'):
        C.check_arm(C.Arm('bad', 'configs/tiny_srddgan_x4.yaml', ('gan.nope=1',)))
    with pytest.raises(ConfigError, match='cond_ch'):  # cross-field: RRDB features on, but the generator expects the LR image alone
        C.check_arm(C.Arm('bad', 'configs/tiny_srddgan_x4.yaml', ('gan.use_rrdb=true',)))


def test_registry_is_consistent():
    runs = C.check_registry()
    for c in C.CLAIMS.values():
        assert c.expected() and set(c.arms) <= set(C.ARMS) and set(c.paper) <= set(c.arms), c.id
        for p in c.paper.values(): assert 'row' in p and c.metric in p, c.id  # the paper's number for the verdict metric
    shared = {k for k, g in runs.items() if len(g) > 1}
    assert 'sr3:linear+direct' in shared  # DDIM-50 and DDIM-10 of one trained SR3 model
    listed = ['SR4 Table 1', 'thesis Table 5.1', 'CG-DPM Table 5', 'SRDDGAN Table 5', 'SRDDGAN Table 6', 'SRDDGAN Table 7',
              'LDDPM Table 6', 'LDDPM Table 7']
    for src in listed: assert any(c.source.startswith(src) for c in C.CLAIMS.values()), src


def test_unmet_requirement_follows_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    arm = C.ARMS['srddgan:+content']
    assert 'vgg19-dcbb9e9d.pth' in C.unmet(arm) and str(tmp_path) in C.unmet(arm)
    (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True)
    (tmp_path / 'hub' / 'checkpoints' / 'vgg19-dcbb9e9d.pth').write_bytes(b'')
    assert C.unmet(arm) == ''
    assert C.unmet(C.ARMS['srddgan']) == ''


def _ok(**kw): return {'status': 'ok', **kw}


def _arm(values, metric='psnr'):
    "A measured arm from (training seeds, images, sampling seeds) values."
    v = np.asarray(values, dtype=float)
    return {'status': 'ok', metric: float(v.mean()), 'samples': {metric: v.tolist()}}


def test_verdict_from_paired_intervals():
    rng = np.random.default_rng(0)
    img = rng.normal(25, 2, size=(1, 8, 1))                     # images differ a lot; the pairing removes that
    arm = lambda shift, sd=0.1: _arm(img + shift + rng.normal(0, sd, size=(3, 8, 3)))
    c = C.Claim('t', 'src', 'A beats B beats D', order=('A', 'B', 'D'))
    v = C.verdict(c, {'A': arm(1.0), 'B': arm(0.5), 'D': arm(0.0)})
    assert v['verdict'] == 'held' and [p['outcome'] for p in v['pairs']] == ['held'] * 3
    p = v['pairs'][0]
    assert (p['seeds'], p['images'], p['images_won']) == (3, 8, 8) and p['low'] < 0.5 < p['high']
    assert C.verdict(c, {'A': arm(0.0), 'B': arm(0.5), 'D': arm(1.0)})['verdict'] == 'reversed'
    mixed = C.verdict(c, {'A': arm(1.0), 'B': arm(0.0), 'D': arm(0.5)})   # A>B, A>D hold; B>D reversed
    assert mixed['verdict'] == 'undecided' and [p['outcome'] for p in mixed['pairs']] == ['held', 'held', 'reversed']
    # lower-is-better: the smaller consistency wins
    lo = C.Claim('t', 's', '', order=('A', 'B'), metric='consistency')
    assert C.verdict(lo, {'A': _arm(img * 0 + 1e-3 + rng.normal(0, 1e-5, (1, 8, 1)), 'consistency'),
                          'B': _arm(img * 0 + 2e-3 + rng.normal(0, 1e-5, (1, 8, 1)), 'consistency')}, 'consistency')['verdict'] == 'held'


def test_the_same_model_on_both_sides_is_undecided():
    "One model, two sampling noises: the claim cannot be decided, whichever arm the claim favours (20 of 20 draws)."
    c = C.Claim('t', 's', '', order=('A', 'B'))
    img = np.random.default_rng(1).normal(25, 2, size=(1, 5, 1))
    outs = []
    for k in range(20):
        r = np.random.default_rng(100 + k)
        outs.append(C.verdict(c, {'A': _arm(img + r.normal(0, 0.3, (3, 5, 3))), 'B': _arm(img + r.normal(0, 0.3, (3, 5, 3)))})['verdict'])
    assert outs.count('undecided') >= 18, outs   # a 95% interval: about 1 in 20 may exclude 0 by chance


def test_an_undertrained_baseline_gives_no_verdict():
    c = C.Claim('t', 's', '', order=('A', 'B'))
    img = np.zeros((1, 5, 1))
    m = {'A': _arm(img + 21.0), 'B': _arm(img + 20.0)}        # A clearly ahead, but B is far below what it should reach
    v = C.verdict(c, m, bounds={'bicubic': 25.5, 'regression': 26.5})   # one sample's ideal bound: 23.5 dB
    assert v['verdict'] == 'undertrained' and 'baseline B 20.00 dB is 3.50 dB below the ideal bound 23.50' in v['why']
    assert C.verdict(c, m, bounds={'bicubic': 20.0, 'regression': 23.5})['verdict'] == 'held'   # bound 20.5: within 1 dB
    assert C.verdict(c, m)['verdict'] == 'held'                                                  # no bounds: not checked
    assert C.verdict(C.Claim('t', 's', '', order=('A', 'B'), kind='regressor'), m,
                     bounds={'bicubic': 25.5, 'regression': 26.5})['verdict'] == 'undertrained'   # a regressor: bicubic bound


def test_not_run_propagates():
    c = C.Claim('t', 's', '', order=('A', 'B'))
    v = C.verdict(c, {'A': _ok(psnr=30.0), 'B': {'status': 'not run', 'reason': 'needs VGG-19'}})
    assert v['verdict'] == 'not run: B: needs VGG-19' and v['pairs'] == []
    assert C.verdict(c, {'A': _ok(psnr=30.0)})['verdict'] == 'not run: B: no result'
    rep = C.build_report([c], {'A': _ok(psnr=30.0), 'B': {'status': 'not run', 'reason': 'needs VGG-19'}}, minutes=1)
    assert rep['claims'][0]['verdict'].startswith('not run') and 'not run' in C.claims_markdown(rep)


def _training(arm):
    "The resolved training config of an arm's run, without what only names the run (folder, seed)."
    import dataclasses
    d = dataclasses.asdict(C.arm_config(arm, runs_dir='runs/claims'))
    d['run'] = {k: v for k, v in d['run'].items() if k not in ('out', 'seed')}
    return json.dumps(d, sort_keys=True, default=str)


def test_distinct_runs_train_distinct_models():
    "Two runs of the registry never resolve to the same training (a preset that changes under the registry would make them so)."
    runs = C.check_registry()
    seen = {}
    for k, arms in runs.items():
        t = _training(arms[0])
        assert t not in seen, f"runs {seen.get(t)!r} and {k!r} train the same model"
        seen[t] = k


@pytest.mark.parametrize('name', [n for n in C.ARMS if n.startswith(('sr3:', 'unet:'))])
def test_pixel_arms_run_the_chain_their_name_says(name):
    "SR3-family arms: no regressor (no paper uses one); '+residual' diffuses HR - Up(LR) (SR4 eq. 9), every other one HR itself."
    cfg = C.arm_config(C.ARMS[name])
    assert cfg.regressor == ''
    assert cfg.diffusion.residual == ('+residual' in name), (name, cfg.diffusion.residual)
    if 'cosine' in name: assert cfg.diffusion.schedule == 'cosine'
    elif name.startswith('sr3:'): assert cfg.diffusion.schedule == 'linear'


def test_minutes_runs_what_fits_and_lists_the_rest(tmp_path):
    "run_claims(total_minutes=...) trains the claims that fit and reports the others as skipped, with the time they need."
    runs, out = tmp_path / 'runs', tmp_path / 'results'
    one = C.run_cost_minutes([C.ARMS['sr3:linear+direct@ddim50'], C.ARMS['sr3:linear+direct@ddim10']], minutes=0.05, size=32,
                             crops=1, sample_seeds=1)
    rep = C.run_claims(['sr4_steps_respacing', 'thesis_latent'], minutes=0.05, total_minutes=one * 1.5, out=out, runs_dir=runs,
                       steps_cap=2, size=32, extra=TINY, progress=False, seeds=1, sample_seeds=1, crops=1)
    by = {c['id']: c for c in rep['claims']}
    assert by['sr4_steps_respacing']['verdict'] in ('held', 'reversed', 'undecided', 'undertrained')
    assert by['thesis_latent']['verdict'].startswith('not run: ') and 'skipped: needs ~' in by['thesis_latent']['verdict']
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ['sr3_linear_direct']  # nothing of the skipped claim trained
    md = (out / 'claims.md').read_text()
    assert 'chose the claims that fit' in md and rep['header']['skipped'].keys() == {'thesis_latent'}
    assert '**Differs in:** `eval` (sr3:linear+direct@ddim50: ddim 50, sr3:linear+direct@ddim10: ddim 10)' in md


def test_run_claims_end_to_end(tmp_path, monkeypatch):
    "One real claim (sr4_steps: one SR3 training, two evaluations) in a worker process, plus not-run arms; numbers recomputed."
    monkeypatch.setitem(C.REQUIREMENTS, 'vgg19', lambda: 'weights missing (test)')
    vgg = C.Arm('x:vgg', 'configs/tiny_sr3_x4.yaml', ('diffusion.schedule=cosine',), 'ddim', 10, needs=('vgg19',))
    dep = C.Arm('x:dep', 'configs/tiny_cgdpm_x4.yaml', (), 'ddim', 10, base='x:vgg', base_key='guide.ddpm')
    monkeypatch.setattr(C, 'ARMS', {**C.ARMS, vgg.name: vgg, dep.name: dep})
    monkeypatch.setattr(C, 'CLAIMS', {**C.CLAIMS,
                                      'x_vgg': C.Claim('x_vgg', 'test', 'needs VGG', order=('x:vgg', 'sr3:linear+direct@ddim10')),
                                      'x_dep': C.Claim('x_dep', 'test', 'base not run', order=('x:dep', 'sr3:linear+direct@ddim10'))})
    runs, out = tmp_path / 'runs', tmp_path / 'results'
    rep = C.run_claims(['sr4_steps_respacing', 'x_vgg', 'x_dep'], minutes=5.0, out=out, runs_dir=runs, steps_cap=3, size=32,
                       extra=TINY, progress=False, seeds=2, sample_seeds=2, crops=1)
    js = json.loads((out / 'claims.json').read_text())
    md = (out / 'claims.md').read_text()
    assert [c['id'] for c in js['claims']] == ['sr4_steps_respacing', 'x_vgg', 'x_dep']
    assert [c['verdict'] for c in rep['claims']] == [c['verdict'] for c in js['claims']]  # returned == written
    assert js['header']['minutes'] == 5.0 and js['header']['steps_cap'] == 3 and js['header']['threads'] == 1
    by = {c['id']: c for c in js['claims']}
    assert by['x_vgg']['verdict'] == 'not run: x:vgg: weights missing (test)'
    assert by['x_dep']['verdict'].startswith('not run: x:dep: its base run x:vgg did not finish')
    for cid in ('sr4_steps_respacing', 'x_vgg', 'x_dep'): assert f'**{cid}**' in md
    # the verdict follows the measured numbers: the paired interval recomputed here from the json by a plain bootstrap loop
    a50, a10 = js['arms']['sr3:linear+direct@ddim50'], js['arms']['sr3:linear+direct@ddim10']
    W, L = np.asarray(a50['samples']['psnr']), np.asarray(a10['samples']['psnr'])
    assert W.shape == L.shape == (2, 5, 2) and a50['seeds'] == 2 and a50['sample_seeds'] == 2
    d = (W - L).mean(2)
    rng, boots = np.random.default_rng(7), []
    for _ in range(4000):
        si, ii = rng.integers(0, 2, 2), rng.integers(0, 5, 5)
        boots.append(d[si][:, ii].mean())
    lo, hi = np.quantile(boots, [0.025, 0.975])
    pair = by['sr4_steps_respacing']['primary']['pairs'][0]
    assert abs(pair['gain'] - d.mean()) < 1e-9 and abs(pair['low'] - lo) < 0.05 * (hi - lo) + 1e-6 and abs(pair['high'] - hi) < 0.05 * (hi - lo) + 1e-6
    want = 'held' if lo > 0 else 'reversed' if hi < 0 else 'undecided'
    if by['sr4_steps_respacing']['verdict'] != 'undertrained': assert by['sr4_steps_respacing']['verdict'] == want
    assert a50['steps'] == a10['steps'] == 3 and (a50['eval_steps'], a10['eval_steps']) == (50, 10)
    assert js['header']['bounds']['regression'] is not None and js['header']['seeds'] == 2
    # PSNR / SSIM recomputed with scikit-image from the saved SR images and the held-out HR crops (crop 4 px)
    from diffsr_kit.bench import held_out_crops
    crops = held_out_crops('test', 32)
    rd = C.run_dir(runs.resolve(), 'sr3:linear+direct')
    for name in ('sr3:linear+direct@ddim50', 'sr3:linear+direct@ddim10'):
        rec = json.loads((rd / f'eval_{C.slug(name)}.json').read_text())   # training seed 0; the SR file holds sampling seed 0
        rec = {'names': rec['names'], **{m: float(np.mean(v[0])) for m, v in rec['per_image_seeds'].items()}}
        sr = load_file(str(rd / f'sr_{C.slug(name)}.safetensors'))['sr'].double().numpy()
        assert sr.shape == (5, 3, 32, 32) and rec['names'] == list(crops)
        ps, ss = [], []
        for i, n in enumerate(rec['names']):
            x = sr[i].transpose(1, 2, 0)[4:-4, 4:-4]
            y = crops[n].double().numpy().transpose(1, 2, 0)[4:-4, 4:-4]
            ps.append(peak_signal_noise_ratio(y, x, data_range=1.0))
            ss.append(structural_similarity(y, x, data_range=1.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                            use_sample_covariance=False))
        assert abs(np.mean(ps) - rec['psnr']) < 1e-6  # same float32 images, both float64 maths
        assert abs(np.mean(ss) - rec['ssim']) < 1e-4  # kit SSIM == skimage's with these settings (metrics tests: 1e-4)
    # and the checkpoint in the run folder reproduces the recorded numbers when evaluated again
    from diffsr_kit.train import load_task
    from diffsr_kit.bench import evaluate_sr
    task = load_task(rd)
    again = evaluate_sr(lambda lr, seed: task.predict(lr, seed=seed, sampler='ddim', steps=10), size=32)
    r10 = json.loads((rd / f'eval_{C.slug("sr3:linear+direct@ddim10")}.json').read_text())
    for m in ('psnr', 'ssim', 'lr_psnr'): assert abs(again['mean'][m] - np.mean(r10['per_image_seeds'][m][0])) < 1e-6, m
    # a second call reuses the finished run: no retraining
    stamp = json.loads((rd / C.TRAIN_DONE).read_text())['finished']
    rep2 = C.run_claims(['sr4_steps_respacing'], minutes=5.0, out=out, runs_dir=runs, steps_cap=3, size=32, extra=TINY, progress=False,
                        seeds=2, sample_seeds=2, crops=1)
    assert json.loads((rd / C.TRAIN_DONE).read_text())['finished'] == stamp
    assert rep2['arms']['sr3:linear+direct@ddim10']['psnr'] == a10['psnr']


def test_cli_list_checks_configs(capsys):
    from diffsr_kit.cli import main
    assert main(['bench', 'claims', '--list', '--claims', 'sr4_cosine', '--json']) == 0
    out = json.loads(capsys.readouterr().out)
    assert [c['claim'] for c in out['claims']] == ['sr4_cosine']
    assert {r['arm'] for r in out['arms']} == set(C.CLAIMS['sr4_cosine'].arms)
    assert main(['bench', 'claims', '--list', '--claims', 'sr4_cosine', '--set', 'diffusion.nope=1']) == 2
    assert 'diffusion.nope' in capsys.readouterr().err
    assert main(['bench', 'claims', '--list', '--claims', 'sr5']) == 2  # unknown claim id


def test_unequal_steps_are_flagged():
    "Equal minutes on a busy machine can buy very different step counts: the report says so when they differ by > 25%."
    c = C.Claim('t', 's', '', order=('A', 'B'))
    ok = lambda steps: {'status': 'ok', 'psnr': 25.0, 'steps_per_seed': steps}
    same = C.steps_check(c, {'A': ok([100, 110, 90]), 'B': ok([105, 95, 100])})
    assert same['warning'] == '' and abs(same['ratio'] - 1.0) < 1e-9
    bad = C.steps_check(c, {'A': ok([200, 210, 190]), 'B': ok([100, 100, 100])})
    assert abs(bad['ratio'] - 2.0) < 1e-9 and 'unequal training' in bad['warning'] and 'A 200' in bad['warning']
    assert C.steps_check(c, {'A': ok([100]), 'B': {'status': 'not run'}})['warning'] == ''  # one measured arm: nothing to compare


def test_a_run_another_process_trains_is_waited_for_not_deleted(tmp_path):
    "Two claim runners on one runs folder: the second waits while the first holds the run's lock (a live PID), then goes on."
    import subprocess, sys, threading, time
    rd = tmp_path / 'run'; rd.mkdir()
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(3)'])
    (rd / '.lock').write_text(f'{holder.pid}\n')
    threading.Thread(target=lambda: (holder.wait(), (rd / '.lock').unlink()), daemon=True).start()
    t0 = time.time()
    C._wait_while_training(rd, poll=0.2)
    assert time.time() - t0 > 2 and not (rd / '.lock').exists()
    (rd / '.lock').write_text('999999999\n')  # a PID that is gone: no wait
    t0 = time.time(); C._wait_while_training(rd, poll=0.2)
    assert time.time() - t0 < 1
