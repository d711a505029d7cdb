"CG-DPM guided network: eq. 10-12 targets against hand formulas, eq. 13-15 guided sampling, the task, its checkpoints and config."
import csv, json, os, shutil, subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from diffsr_kit.config import load_config, ConfigError
from diffsr_kit.diffusion import Diffusion, DiffusionConfig
from diffsr_kit.samplers import ddim_sample, ddpm_sample, ddim_step
from diffsr_kit.tasks import SRConfig
from diffsr_kit.train import train, load_task, find_checkpoint, save_checkpoint, make_dataset, get_batch
from diffsr_kit.cgdpm import (CGDPMConfig, CGDPMTask, GUIDE_LOSSES, guide_targets, guidance_fn, reverse_states, ChainPool,
                              chain_schedule)

ROOT = Path(__file__).parents[1]
DIFFSR = str(Path(sys.executable).parent / 'diffsr')
CPU = torch.device('cpu')
BASE = ['model.base_ch=8', 'model.ch_mult=[1,2]', 'model.attn_res=[]', 'model.image_size=16', 'model.n_res=1',
        'data.patch=16', 'data.batch=2', 'data.val_images=2', 'run.progress=false', 'run.log_every=1', 'run.val_every=0',
        'diffusion.T=20', 'diffusion.param=v', 'sample.steps=4', 'optim.ema=0.9', 'run.steps=2']
GUIDE = ['guide.model.base_ch=8', 'guide.model.ch_mult=[1,2]', 'guide.model.attn_res=[]', 'guide.model.image_size=16',
         'guide.model.n_res=1', 'guide.chain_steps=5', 'data.patch=16', 'data.batch=2', 'data.val_images=2',
         'run.progress=false', 'run.log_every=1', 'run.val_every=0', 'sample.steps=4', 'optim.ema=0.9']

@pytest.fixture(scope='module')
def base_run(tmp_path_factory):
    "A tiny conditional DDPM ('ddpm' task, v-prediction, T = 20) trained for 2 steps: the frozen base model."
    out = tmp_path_factory.mktemp('cgdpm') / 'base'
    return train(load_config(SRConfig, None, BASE + [f'run.out={out}']))

def cg_cfg(base, *extra):
    return load_config(CGDPMConfig, None, GUIDE + [f'guide.ddpm={base}', *extra])

def randomise_guide(task, seed=0):
    "The guide's output conv starts at zero (F_phi = 0); give it random weights so guidance has something to add."
    g = torch.Generator().manual_seed(seed)
    w = task.modules['guide'].out[-1].weight
    with torch.no_grad(): w.copy_(torch.randn(w.shape, generator=g) * 0.05)
    return task

def lr_batch(n=2, seed=0):
    return torch.rand(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1

# ---------------------------------------------------------------- eq. 10-12: targets against hand formulas

def _np_abar(d):
    return np.cumprod(1 - d.schedule.betas.double().numpy())  # abar_t = prod (1 - beta_s), computed here in float64

@pytest.mark.parametrize('param', ['eps', 'v'])
def test_guide_targets_match_eq_11_12(param):
    d = Diffusion(DiffusionConfig(schedule='linear', T=200, param=param))
    g = torch.Generator().manual_seed(0)
    s0 = torch.rand(5, 3, 6, 6, generator=g) * 2 - 1
    xt = torch.randn(5, 3, 6, 6, generator=g)
    out = torch.randn(5, 3, 6, 6, generator=g)
    t = torch.tensor([0, 3, 50, 120, 199])
    ab = torch.from_numpy(_np_abar(d))[t].reshape(-1, 1, 1, 1)
    x, o, s = xt.double(), out.double(), s0.double()
    if param == 'eps': eps = o
    else: eps = (1 - ab).sqrt() * x + ab.sqrt() * o  # v-prediction: eps = sqrt(1-abar) x_t + sqrt(abar) v
    x0h = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
    score = -(x - ab.sqrt() * s) / (1 - ab) + eps / (1 - ab).sqrt()  # eq. 12 minus eq. 11
    want = {'score': score, 'x0': s - x0h, 'scaled': ab.sqrt() * (s - x0h)}
    for k, w in want.items():
        got = guide_targets(d, out, xt, t, s0, k)['target'].double()
        # float32 arithmetic vs float64 formula: relative 1e-4 of the largest value (the score form reaches ~1e4 at t = 0)
        assert (got - w).abs().max() <= 1e-4 * w.abs().max(), k
        as_score = GUIDE_LOSSES[k].to_score(got, ab.sqrt().float(), (1 - ab).sqrt().float()).double()
        assert (as_score - score).abs().max() <= 1e-4 * score.abs().max(), k

def test_unknown_guide_loss_names_the_key():
    d = Diffusion(DiffusionConfig(T=10))
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(KeyError, match='guide.loss'):
        guide_targets(d, x, x, torch.tensor([1]), x, 'nope')

# ---------------------------------------------------------------- eq. 13-15 with an oracle guide

@pytest.mark.parametrize('loss', ['scaled', 'x0', 'score'])
def test_oracle_guided_ddim_lands_on_s0(loss):
    # An oracle that knows s0 outputs the exact eq. 10 minimiser for one (x_t, t); with s = 1, eq. 14 turns DDIM's x0
    # estimate into s0, so the last DDIM step returns s0 whatever the base network is. Unguided DDIM does not.
    d = Diffusion(DiffusionConfig(schedule='linear', T=100, param='eps'))
    abar = torch.from_numpy(_np_abar(d)).float()
    base = lambda x, t: 0.3 * x + 0.1 * torch.tanh(x)
    g = torch.Generator().manual_seed(1)
    s0 = torch.rand(2, 3, 8, 8, generator=g) * 1.6 - 0.8
    def oracle(x, t, lr=None):
        ab = abar[t].reshape(-1, 1, 1, 1)
        x0h = (x - (1 - ab).sqrt() * base(x, t)) / ab.sqrt()
        return {'x0': s0 - x0h, 'scaled': ab.sqrt() * (s0 - x0h),
                'score': -(x - ab.sqrt() * s0) / (1 - ab) + base(x, t) / (1 - ab).sqrt()}[loss]
    lr = torch.zeros(2, 3, 2, 2)
    kw = dict(seed=0, steps=10, progress=False)
    guided = ddim_sample(base, s0.shape, d, guidance=guidance_fn(oracle, d, lr, loss), **kw)
    plain = ddim_sample(base, s0.shape, d, **kw)
    # float32; the score form carries values ~1e3 through the step, so allow 1e-3
    assert (guided - s0).abs().max() < (1e-3 if loss == 'score' else 1e-4)
    assert (plain - s0).abs().max() > 0.1
    # eq. 13 (ancestral): the oracle shift Sigma F is smaller than the exact correction, but it must bring samples closer
    pg = ddpm_sample(base, s0.shape, d, guidance=guidance_fn(oracle, d, lr, loss), **kw)
    pp = ddpm_sample(base, s0.shape, d, **kw)
    assert ((pg - s0) ** 2).mean() < 0.5 * ((pp - s0) ** 2).mean()

# ---------------------------------------------------------------- x_t from the reverse chain

def test_reverse_states_equal_hand_run_chains():
    d = Diffusion(DiffusionConfig(schedule='linear', T=60))
    toy = lambda x, t, lr: 0.4 * x + 0.02 * t.float().reshape(-1, 1, 1, 1) + lr.mean((1, 2, 3), keepdim=True)
    g = torch.Generator().manual_seed(2)
    x_T, lr = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 2, 2, generator=g)
    stop = torch.tensor([5, 0, 3, 5])
    xt, t, out = reverse_states(toy, d, x_T, lr, stop, steps=6, sampler='ddim')
    s = d.schedule.respace(6)
    for n in range(4):  # one sample at a time, a plain loop of DDIM steps (deterministic at eta = 0)
        x = x_T[n:n + 1]
        for i in range(5, int(stop[n]), -1):
            x = ddim_step(s, toy(x, s.timesteps[i:i + 1], lr[n:n + 1]), x, i, param='eps', clip_x0=True).prev
        assert torch.allclose(xt[n:n + 1], x, atol=1e-6)
        assert torch.allclose(out[n:n + 1], toy(x, s.timesteps[int(stop[n])].reshape(1), lr[n:n + 1]), atol=1e-6)
    assert t.tolist() == s.timesteps[stop].tolist()
    with pytest.raises(ValueError, match='stop'):
        reverse_states(toy, d, x_T, lr, torch.tensor([6, 0, 0, 0]), steps=6)

def test_chain_pool_walks_down_and_restarts():
    d = Diffusion(DiffusionConfig(schedule='linear', T=40))
    toy = lambda x, t, lr: 0.5 * x
    pool = ChainPool((3, 1, 4, 4), (3, 1, 2, 2))
    K = 4
    s = chain_schedule(d, K, 'cpu')
    torch.manual_seed(0)
    seen = []
    for k in range(9):
        s0 = torch.full((3, 1, 4, 4), float(k + 1)); lr = torch.full((3, 1, 2, 2), float(k + 1))
        xt, t, ps0, plr, out = pool.draw(toy, d, s0, lr, steps=K, sampler='ddim')
        idx = [s.timesteps.tolist().index(int(v)) for v in t]
        seen.append((idx, ps0[:, 0, 0, 0].tolist()))
        assert torch.equal(out, 0.5 * xt)  # the base output handed back is the one at the state
    for k in range(1, 9):
        for n in range(3):
            prev_idx, now_idx = seen[k - 1][0][n], seen[k][0][n]
            assert now_idx == (prev_idx - 1 if prev_idx > 0 else K - 1)
            if prev_idx == 0: assert seen[k][1][n] == float(k)  # restarted on the pair of the batch that finished it
            else: assert seen[k][1][n] == seen[k - 1][1][n]   # same pair along a chain
    with pytest.raises(ValueError, match='data.batch'):
        pool.draw(toy, d, torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 2, 2), steps=K)

# ---------------------------------------------------------------- the task

@pytest.mark.parametrize('sampler', ['ddpm', 'ddim'])
def test_scale_zero_equals_unguided_and_scale_one_differs(base_run, sampler):
    task = randomise_guide(CGDPMTask(cg_cfg(base_run), CPU))
    ref = load_task(base_run)  # the base DDPM on its own, through its own task
    lr = lr_batch()
    kw = dict(seed=7, sampler=sampler, steps=None if sampler == 'ddpm' else 4)
    plain = ref.predict(lr, **kw)
    assert torch.equal(task.predict(lr, guidance_scale=0.0, **kw), plain)
    guided = task.predict(lr, guidance_scale=1.0, **kw)
    assert (guided - plain).abs().mean() > 1e-3
    assert torch.equal(guided, task.predict(lr, **kw))  # guide.guidance_scale (default 1.0) is used when none is given

@pytest.mark.parametrize('xt_from', ['reverse', 'forward'])
def test_guide_loss_falls_on_a_fixed_batch(base_run, xt_from):
    task = CGDPMTask(cg_cfg(base_run, f'guide.xt_from={xt_from}'), CPU)
    batch = get_batch(make_dataset(task.cfg.data, 'train', 0), 0, 4, CPU)
    opt = torch.optim.Adam(task.param_groups()['main'], lr=2e-3)
    losses = []
    for step in range(40):
        torch.manual_seed(123)  # the same x_t, t and noise every step: only the guide changes
        loss, parts = task.loss('main', batch, step)
        if step == 0:  # a zero-initialised guide outputs 0, so its loss is the logged loss0 = mean target^2
            assert abs(loss.item() - parts['loss0'].item()) <= 1e-6 * parts['loss0'].item()
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::8]
    assert all(p.grad is None for p in task.modules['unet'].parameters())  # the base stays frozen

def test_checkpoint_is_self_contained_and_round_trips(base_run, tmp_path):
    base = tmp_path / 'base'; shutil.copytree(base_run, base)
    task = randomise_guide(CGDPMTask(cg_cfg(base, 'guide.xt_from=reverse'), CPU), seed=3)
    lr = lr_batch(seed=4)
    want = {smp: task.predict(lr, seed=2, sampler=smp, steps=4, guidance_scale=1.5) for smp in ('ddpm', 'ddim')}
    save_checkpoint(tmp_path / 'run', 1, task, None, {})
    ref_unet = load_task(base).modules['unet'].state_dict()
    shutil.rmtree(base)  # the checkpoint alone must rebuild the whole model
    back = load_task(tmp_path / 'run', weights='model')
    assert back.name == 'cgdpm' and sorted(back.modules) == ['guide', 'unet']
    for k, v in back.modules['unet'].state_dict().items(): assert torch.equal(v, ref_unet[k]), k
    for k, v in back.modules['guide'].state_dict().items(): assert torch.equal(v, task.modules['guide'].state_dict()[k]), k
    for smp, w in want.items():
        assert torch.equal(back.predict(lr, seed=2, sampler=smp, steps=4, guidance_scale=1.5), w), smp
    meta = json.loads((find_checkpoint(tmp_path / 'run') / 'meta.json').read_text())
    assert meta['config']['model']['base_ch'] == 8 and meta['config']['guide']['model']['cond'] == 'multiscale'

def test_train_with_pool_logs_and_resumes_exactly(base_run, tmp_path):
    class Stop(Exception): pass
    a = train(cg_cfg(base_run, 'run.steps=4', 'run.ckpt_every=2', f'run.out={tmp_path / "a"}'))
    def kill(step, logs):
        if step == 2: raise Stop
    with pytest.raises(Stop):
        train(cg_cfg(base_run, 'run.steps=4', 'run.ckpt_every=2', f'run.out={tmp_path / "b"}'), callback=kill)
    b = train(cg_cfg(base_run, 'run.steps=4', 'run.ckpt_every=2', f'run.out={tmp_path / "b"}'), resume=True)
    from safetensors.torch import load_file
    for kind in ('model', 'ema'):
        wa, wb = (load_file(str(find_checkpoint(r) / f'{kind}.safetensors')) for r in (a, b))
        assert wa.keys() == wb.keys() and any(k.startswith('pool.') for k in wa)
        # CPU float32, same RNG stream and the pool's chains restored from the checkpoint: identical up to 1e-6
        assert max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa) <= 1e-6
    rows = list(csv.DictReader(open(a / 'log.csv')))
    assert len(rows) == 4 and all(float(r['loss']) > 0 and float(r['loss0']) > 0 for r in rows)
    val = list(csv.DictReader(open(a / 'val.csv')))[-1]
    assert {'psnr', 'base_psnr', 'ssim', 'base_ssim'} <= set(val)

def test_task_errors_name_the_fix(base_run, tmp_path):
    with pytest.raises(ConfigError, match='guide.ddpm'):
        CGDPMTask(load_config(CGDPMConfig, None, GUIDE), CPU)
    with pytest.raises(FileNotFoundError, match='guide.ddpm'):
        CGDPMTask(cg_cfg(tmp_path / 'nowhere'), CPU)
    with pytest.raises(ConfigError, match='data.scale=4'):
        CGDPMTask(cg_cfg(base_run, 'data.scale=2'), CPU)
    with pytest.raises(KeyError, match='guide.xt_from'):
        CGDPMTask(cg_cfg(base_run, 'guide.xt_from=sideways'), CPU)
    with pytest.raises(ConfigError, match='guide.model.z_dim'):
        CGDPMTask(cg_cfg(base_run, 'guide.model.z_dim=4'), CPU)
    reg = train(load_config(SRConfig, None, BASE + ['task=regression', f'run.out={tmp_path / "reg"}']))
    with pytest.raises(ConfigError, match="'regression'"):
        CGDPMTask(cg_cfg(reg), CPU)

# ---------------------------------------------------------------- config and CLI

def test_preset_loads_and_bad_keys_are_named():
    cfg = load_config(CGDPMConfig, ROOT / 'configs/tiny_cgdpm_x4.yaml')
    g = cfg.guide
    assert (cfg.task, g.ddpm, g.model.cond, list(g.model.ch_mult)) == ('cgdpm', 'assets/tiny_sr3_x4', 'multiscale', [1, 2, 2])
    assert 8 <= g.model.base_ch <= 32 and (cfg.data.scale, cfg.data.patch) == (4, 64) and g.loss in GUIDE_LOSSES
    for bad, key in (('guide.lose=x0', 'guide.lose'), ('guide.model.chmult=[1]', 'guide.model.chmult'),
                     ('guide.chain_steps=many', 'guide.chain_steps')):
        with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
            load_config(CGDPMConfig, ROOT / 'configs/tiny_cgdpm_x4.yaml', [bad])

def cli(*args, ok=True):
    r = subprocess.run([DIFFSR, *map(str, args)], capture_output=True, text=True, timeout=900, cwd=ROOT,
                       env={**os.environ, 'TQDM_DISABLE': '1'})
    if ok: assert r.returncode == 0, r.stderr[-4000:]
    return r

def test_cli_train_sample_eval_on_the_preset(base_run, tmp_path):
    r = cli('train', '--config', 'configs/tiny_cgdpm_x4.yaml', 'guide.lose=x0', '--dry-run', ok=False)
    assert r.returncode == 2 and 'guide.lose' in r.stderr, r.stderr
    out = tmp_path / 'run'
    small = [o for o in GUIDE if not o.startswith('guide.model.')] + ['guide.model.ch_mult=[1,2]', 'guide.model.image_size=16']
    cli('train', '--config', 'configs/tiny_cgdpm_x4.yaml', *small, f'guide.ddpm={base_run}', 'run.steps=2',
        'run.max_minutes=0', f'run.out={out}')
    from PIL import Image
    lr = tmp_path / 'lr.png'; Image.fromarray((np.random.default_rng(0).random((8, 12, 3)) * 255).astype(np.uint8)).save(lr)
    info = json.loads(cli('sample', '--ckpt', out, '--input', lr, '--steps', 2, '--out', tmp_path / 'sr.png').stdout)
    assert info['sr_size'] == [32, 48] and Image.open(tmp_path / 'sr.png').size == (48, 32)
    res = json.loads(cli('eval', '--ckpt', out, '--size', 32, '--steps', 2, '--json').stdout)
    assert [r['method'].split()[0] for r in res['rows']] == ['bicubic', 'cgdpm']
    assert all(0 < r['psnr'] < 100 for r in res['rows'])
