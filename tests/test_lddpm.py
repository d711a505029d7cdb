"LDDPM task: ablation switches remove their terms and modules, D/G groups, the flow NLL against an autograd-Jacobian + torch.distributions reference, the fixed-batch fit, seeded sampling, checkpoints, the preset."
import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffsr_kit.config import load_config, ConfigError
from diffsr_kit.core import seed_everything
from diffsr_kit.lddpm import (LDDPMConfig, LDDPMTask, ABLATION_ROWS, check_lddpm_config, lddpm_ablation, lr_multiple,
                              shared_noise_fake)
from diffsr_kit.schedules import get_schedule
from diffsr_kit.train import load_task, save_checkpoint, train, TASKS, get_task

PRESET = Path(__file__).resolve().parents[1] / 'configs' / 'tiny_lddpm_x4.yaml'
# 8 -> 32 (x4); tau_theta without down-sampling, so F_X is 8x8 and the Glow's three squeezes reach 1x1
TINY = ['model.base_ch=16', 'model.ch_mult=[1,2]', 'model.n_res=1', 'model.attn_res=[]', 'model.image_size=32',
        'model.z_dim=8', 'model.ctx_ch=32', 'cond.ctx_ch=32', 'cond.enc_ch=4', 'cond.n_down=0', 'cond.n_blocks=1',
        'cond.z_ch=2', 'cond.cvae_hidden=8', 'cond.glow_hidden=8', 'disc.base_ch=8', 'disc.ch_mult=[1,2]', 'disc.t_dim=16',
        'data.patch=32', 'data.batch=4', 'lddpm.vgg=random', 'run.device=cpu']
CPU = torch.device('cpu')


def tiny_cfg(*extra):
    return check_lddpm_config(load_config(LDDPMConfig, None, TINY + list(extra)))


def fixed_batch(n=4, size=32, scale=4):
    "Four real crops (astronaut quadrants, area-downsampled) and their bicubic LR images, in [-1, 1]."
    from skimage import data
    from diffsr_kit.degrade import resize
    im = torch.from_numpy(data.astronaut()).permute(2, 0, 1).float() / 255
    quads = [im[:, i:i + 256, j:j + 256] for i in (0, 256) for j in (0, 256)][:n]
    hr = torch.stack([F.adaptive_avg_pool2d(q, size) for q in quads]) * 2 - 1
    return {'hr': hr, 'lr': resize(hr, (size // scale,) * 2, 'bicubic')}


def names(task):
    "Every parameter of the task as '<module>.<name>'."
    return {f'{k}.{n}' for k, m in task.modules.items() for n, _ in m.named_parameters()}


def g_terms(task, batch, seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with torch.no_grad(): return {k[2:] for k in task.loss('g', batch, 0)[1] if k != 'g_loss'}


def randomize_zero_layers(task, std=0.05, seed=0):
    "Give the zero-initialised layers (output convs, attention projections, Glow couplings/prior) random values."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in task.modules.values():
            for p in m.parameters():
                if p.abs().max() == 0: p.copy_(torch.randn(p.shape, generator=g) * std)


# ------------------------------------------------------------------ ablation switches (Tables 6-8)
def test_attention_switch_removes_conditioner_and_cross_attention():
    v2, v1 = (LDDPMTask(lddpm_ablation(r, None, TINY), CPU) for r in ('T6:V2', 'T6:V1'))
    assert 'conditioner' in v2.modules and 'conditioner' not in v1.modules
    assert v2.modules['generator'].mid_xattn is not None and v1.modules['generator'].mid_xattn is None
    n2, n1 = names(v2), names(v1)
    assert n1 < n2
    removed = {f'conditioner.{n}' for n, _ in v2.modules['conditioner'].named_parameters()} | \
              {f'generator.mid_xattn.{n}' for n, _ in v2.modules['generator'].mid_xattn.named_parameters()}
    assert n2 - n1 == removed
    b = fixed_batch()
    assert g_terms(v2, b) == g_terms(v1, b) == {'ddpm', 'adv', 'content', 'pixel', 'style'}  # no KL / flow in either row


def test_cvae_switch_removes_kl_and_cvae_params():
    v3, v2 = (LDDPMTask(lddpm_ablation(r, None, TINY), CPU) for r in ('T6:V3', 'T6:V2'))
    assert v3.modules['conditioner'].cvae is not None and v2.modules['conditioner'].cvae is None
    assert names(v3) - names(v2) == {f'conditioner.cvae.{n}' for n, _ in v3.modules['conditioner'].cvae.named_parameters()}
    assert names(v2) < names(v3)
    b = fixed_batch()
    assert g_terms(v3, b) - g_terms(v2, b) == {'kl'} and g_terms(v2, b) < g_terms(v3, b)


def test_glow_switch_removes_flow_term_and_glow_params():
    full, v3 = LDDPMTask(tiny_cfg(), CPU), LDDPMTask(tiny_cfg('cond.glow=false'), CPU)
    assert names(full) - names(v3) == {f'conditioner.glow.{n}' for n, _ in full.modules['conditioner'].glow.named_parameters()}
    assert names(v3) < names(full)
    b = fixed_batch()
    assert g_terms(full, b) - g_terms(v3, b) == {'flow'}
    with pytest.raises(ConfigError, match='cond.glow=false'):  # Glow without the CVAE is refused, naming the fix
        tiny_cfg('cond.cvae=false')


def test_gan_switch_removes_discriminator_phase_and_adv_term():
    full, nogan = LDDPMTask(tiny_cfg(), CPU), LDDPMTask(tiny_cfg('lddpm.use_gan=false'), CPU)
    assert list(full.param_groups()) == ['d', 'g'] and list(nogan.param_groups()) == ['g']
    assert 'discriminator' not in nogan.modules
    assert names(full) - names(nogan) == {f'discriminator.{n}' for n, _ in full.modules['discriminator'].named_parameters()}
    b = fixed_batch()
    assert g_terms(full, b) - g_terms(nogan, b) == {'adv'}
    with pytest.raises(ValueError, match="no phase 'd'"):
        nogan.loss('d', b, 0)


@pytest.mark.parametrize('switch, removed', [('lddpm.use_content=false', {'content', 'pixel'}),
                                             ('lddpm.use_style=false', {'style'})])
def test_content_and_style_switches_remove_their_terms(switch, removed):
    full, off = LDDPMTask(tiny_cfg(), CPU), LDDPMTask(tiny_cfg(switch), CPU)
    b = fixed_batch()
    assert g_terms(full, b) - g_terms(off, b) == removed and g_terms(off, b) < g_terms(full, b)
    assert names(full) == names(off)  # losses only: the trainable parameters are the same
    both = LDDPMTask(tiny_cfg('lddpm.use_content=false', 'lddpm.use_style=false'), CPU)
    assert both.perceptual is None  # no VGG-19 is built when neither perceptual term is on


def test_zero_weight_drops_a_term_and_total_is_the_weighted_sum():
    seed_everything(0)
    task = LDDPMTask(tiny_cfg('lddpm.w_kl=0', 'lddpm.w_adv=0.5', 'lddpm.w_flow=0.3'), CPU)
    with torch.no_grad(): _, p = task.loss('g', fixed_batch(), 0)
    assert 'g_kl' not in p
    w = {'ddpm': 1.0, 'flow': 0.3, 'adv': 0.5, 'content': 1.0, 'pixel': 1.0, 'style': 1.0}  # written out, not read from the task
    assert set(p) == {f'g_{k}' for k in w} | {'g_loss'}
    # a float32 sum of six terms; the pixel term reaches ~150 (1/sqrt(abar_T) at T = 4), where one float32 ulp is
    # 1.5e-5, so the tolerance is relative: 1e-6 of the total (about 10 ulps)
    total = float(p['g_loss'])
    assert abs(total - sum(w[k] * float(p[f'g_{k}']) for k in w)) <= 1e-6 * max(1.0, abs(total))


def test_ablation_rows_follow_the_tables():
    b = fixed_batch()
    got = {r: g_terms(LDDPMTask(lddpm_ablation(r, None, TINY), CPU), b) for r in ABLATION_ROWS}
    assert got['T7:LDDPM'] == {'ddpm', 'kl'}                            # V3, nothing else
    assert got['T7:+Glow'] == {'ddpm', 'kl', 'flow'}
    assert got['T7:+Glow+GAN'] == {'ddpm', 'kl', 'flow', 'adv'}
    assert got['T8:+CL'] == {'ddpm', 'kl', 'flow', 'adv', 'content', 'pixel'}
    assert got['T8:+CL+SL'] == {'ddpm', 'kl', 'flow', 'adv', 'content', 'pixel', 'style'}
    with pytest.raises(ConfigError, match='T6:V1'):
        lddpm_ablation('V9')


# ------------------------------------------------------------------ D / G phases
def test_param_groups_disjoint_and_phases_touch_only_their_params():
    seed_everything(0)
    task = LDDPMTask(tiny_cfg(), CPU)
    groups = task.param_groups()
    assert list(groups) == ['d', 'g']
    d_ids, g_ids = {id(p) for p in groups['d']}, {id(p) for p in groups['g']}
    assert not d_ids & g_ids
    assert d_ids == {id(p) for p in task.modules['discriminator'].parameters()}
    assert g_ids == {id(p) for k in ('generator', 'conditioner') for p in task.modules[k].parameters()}
    b = fixed_batch()
    for phase, own, other in (('d', d_ids, g_ids), ('g', g_ids, d_ids)):
        for m in task.modules.values(): m.zero_grad(set_to_none=True)
        loss, _ = task.loss(phase, b, 0)
        loss.backward()
        params = [p for m in task.modules.values() for p in m.parameters()]
        assert all(p.grad is None for p in params if id(p) in other), phase
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params if id(p) in own), phase
    with pytest.raises(ValueError, match="phases 'd' and 'g'"):
        task.loss('main', b, 0)


# ------------------------------------------------------------------ eq. 12: the flow term, independently
def test_flow_term_equals_jacobian_and_torch_distributions():
    seed_everything(0)
    task = LDDPMTask(tiny_cfg('lddpm.use_content=false', 'lddpm.use_style=false'), CPU)
    b = fixed_batch()
    task.loss('g', b, 0)  # first pass: ActNorm's data-dependent initialisation
    randomize_zero_layers(task, std=0.1)  # non-trivial couplings and a non-standard Gaussian base
    torch.manual_seed(7)
    with torch.no_grad(): parts = task.loss('g', b, 0)[1]
    torch.manual_seed(7)  # the conditioner is the loss's first random draw: the same Z, hence the same F_g
    with torch.no_grad(): enc = task.modules['conditioner'].encode(b['lr'], b['hr'])
    glow = copy.deepcopy(task.modules['conditioner'].glow).double()
    Fg, FX = enc['F_g'].double(), enc['F_X'].double()
    C, H, W = Fg.shape[1:]
    D = C * H * W
    nll = []
    for n in range(Fg.shape[0]):
        f = lambda x: glow(x.view(1, C, H, W), FX[n:n + 1])[0].flatten()
        J = torch.autograd.functional.jacobian(f, Fg[n].flatten())  # (D, D) d u / d F_g
        logdet = torch.linalg.slogdet(J).logabsdet
        with torch.no_grad():
            u = f(Fg[n].flatten()).view(1, C, H, W)
            mean, logvar = glow.prior(FX[n:n + 1]).chunk(2, dim=1)  # eq. 12's mu_theta, sigma_theta from F_X
            lp = torch.distributions.Normal(mean, torch.exp(0.5 * logvar)).log_prob(u).sum()
        nll.append(-(lp + logdet) / (D * math.log(2)))
    ref = torch.stack(nll).mean().item()
    assert abs(ref) > 0.1  # a non-trivial value
    # float32 flow vs float64 Jacobian: 1e-3 relative
    assert abs(float(parts['g_flow']) - ref) < 1e-3 * abs(ref), (float(parts['g_flow']), ref)


def test_shared_noise_fake_is_the_posterior_draw_with_the_same_noise():
    b = np.array([0.3, 0.5, 0.7, 0.9])
    from diffsr_kit.schedules import Schedule
    s = Schedule.from_betas(b)
    ab = np.cumprod(1 - b)
    abp = np.concatenate([[1.0], ab[:-1]])
    g = torch.Generator().manual_seed(0)
    x0, x0p, xt, e = (torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.arange(4)
    # q(x_{t-1} | x_t, x0) in float64, written out (DDPM eq. 7): mean c1 x0 + c2 x_t, variance (1-abp)/(1-ab) beta
    c1, c2 = np.sqrt(abp) * b / (1 - ab), np.sqrt(1 - b) * (1 - abp) / (1 - ab)
    sd = np.sqrt((1 - abp) / (1 - ab) * b)
    v = lambda a: torch.from_numpy(a).view(4, 1, 1, 1)
    real = v(c1) * x0 + v(c2) * xt + v(sd) * e
    fake = v(c1) * x0p + v(c2) * xt + v(sd) * e
    got = shared_noise_fake(s, real.float(), x0.float(), x0p.float(), t)
    assert torch.allclose(got.double(), fake, atol=1e-5)  # float32 coefficients
    assert torch.allclose(got[0].double(), x0p[0], atol=1e-5)  # t = 1: the generated x0' itself


# ------------------------------------------------------------------ training on one fixed batch
def test_g_loss_falls_on_a_fixed_batch():
    seed_everything(0)
    task = LDDPMTask(tiny_cfg('lddpm.w_content=0', 'lddpm.use_style=false'), CPU)  # eq. 16's L1 term, no VGG
    b = fixed_batch()
    def fixed():  # same t, noise, z and CVAE draw each time: only the weights differ
        with torch.random.fork_rng():
            torch.manual_seed(123)
            with torch.no_grad(): return {k: float(v) for k, v in task.loss('g', b, 0)[1].items()}
    first = fixed()
    opts = {k: torch.optim.AdamW(v, 3e-3, betas=(0.5, 0.9)) for k, v in task.param_groups().items()}
    for step in range(40):
        for ph, opt in opts.items():
            loss, _ = task.loss(ph, b, step)
            opt.zero_grad(); loss.backward(); opt.step()
    last = fixed()
    # observed (eps-prediction, the default): g_ddpm 1.00 -> 0.14, g_pixel 37.4 -> 11.4 (eq. 16's Y_hat divides by
    # sqrt(abar_t), so an untrained eps-net gives huge |Y - Y_hat| at large t), g_loss 39.7 -> 16.0; g_adv rises as D learns
    assert last['g_ddpm'] < 0.7 * first['g_ddpm'], (first, last)
    assert last['g_pixel'] < 0.7 * first['g_pixel'], (first, last)
    assert last['g_loss'] < first['g_loss'], (first, last)


# ------------------------------------------------------------------ sampling
def test_predict_is_seeded_and_z_and_seed_change_the_sample():
    seed_everything(0)
    task = LDDPMTask(tiny_cfg(), CPU)
    b = fixed_batch()
    task.loss('g', b, 0)
    randomize_zero_layers(task)
    for m in task.modules.values(): m.eval()
    lr = b['lr'][:2]
    a1, a2 = task.predict(lr, seed=0), task.predict(lr, seed=0)
    assert torch.equal(a1, a2)
    z1, z2 = (torch.randn(2, 8, generator=torch.Generator().manual_seed(k)) for k in (1, 2))
    s1, s1b, s2 = task.predict(lr, seed=0, z=z1), task.predict(lr, seed=0, z=z1), task.predict(lr, seed=0, z=z2)
    assert torch.equal(s1, s1b)
    assert (s1 - s2).abs().max() > 1e-3  # only z differs
    assert (task.predict(lr, seed=1) - a1).abs().max() > 1e-3
    sr, traj = task.predict(lr, seed=0, return_trajectory=True)
    assert torch.equal(sr, a1) and traj['t'].tolist() == [3, 2, 1, 0] and traj['xt'].shape == (5, 2, 3, 32, 32)
    assert task.predict(lr, seed=0, steps=2, return_trajectory=True)[1]['t'].tolist() == [3, 1]
    odd = task.predict(b['lr'][:2, :, :5, :7], seed=0)  # padded to lr_multiple = 8 inside, cropped back
    assert lr_multiple(task.cfg) == 8 and odd.shape == (2, 3, 20, 28)
    with pytest.raises(ValueError, match='model.z_dim=8'):
        task.predict(lr, z=torch.zeros(2, 3))


# ------------------------------------------------------------------ checkpoints and the preset
def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    from diffsr_kit.metrics import weights_file
    seed_everything(0)
    cfg = tiny_cfg('lddpm.vgg=pretrained', 'lddpm.w_style=0')  # a VGG-19 config: loading must not need the weights
    task = LDDPMTask(cfg, CPU, pretrained=False)
    b = fixed_batch()
    task.modules['conditioner'](b['lr'], b['hr'])  # initialises ActNorm (no VGG needed); its flag is a checkpoint buffer
    randomize_zero_layers(task)
    for m in task.modules.values(): m.eval()
    save_checkpoint(tmp_path, 5, task, None, {})
    back = load_task(tmp_path, device='cpu', weights='model')
    assert isinstance(back, LDDPMTask) and back.step == 5 and back._perceptual is None
    assert set(back.modules) == {'generator', 'conditioner', 'discriminator'}
    for k in task.modules:
        sa, sb = task.modules[k].state_dict(), back.modules[k].state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa), k
    for seed in (0, 3):
        assert torch.equal(task.predict(b['lr'], seed=seed, modules=task.modules), back.predict(b['lr'], seed=seed))
    if not weights_file('vgg19').exists():  # without the ImageNet weights a training build fails early, naming the file
        with pytest.raises(FileNotFoundError, match='vgg19'):
            LDDPMTask(cfg, CPU, pretrained=True)


def test_train_two_steps_end_to_end(tmp_path):
    cfg = load_config(LDDPMConfig, None, TINY + [f'run.out={tmp_path}', 'run.steps=2', 'run.progress=false',
                                                 'data.val_images=2', 'lddpm.use_style=false', 'lddpm.w_content=0'])
    run = train(cfg)
    log = (run / 'log.csv').read_text().splitlines()
    cols = log[0].split(',')
    assert {'d_loss', 'g_ddpm', 'g_kl', 'g_flow', 'g_adv', 'g_pixel', 'g_loss'} <= set(cols)
    assert 'g_content' not in cols and 'g_style' not in cols
    task = load_task(run, device='cpu')
    assert task.predict(fixed_batch()['lr'][:1], seed=0).shape == (1, 3, 32, 32)


def test_preset_loads_fits_in_4mb_and_bad_keys_fail(tmp_path):
    assert get_task('lddpm') is LDDPMTask and TASKS['lddpm'] is LDDPMTask
    cfg = check_lddpm_config(load_config(LDDPMConfig, PRESET))
    assert (cfg.data.patch, cfg.data.scale, cfg.run.max_minutes, cfg.lddpm.T) == (64, 4, 60, 4)
    assert cfg.lddpm.residual and cfg.regressor == ''  # the residual to Up(LR)
    assert cfg.lddpm.w_content == 0 and cfg.lddpm.w_style == 0  # no VGG-19 in the tiny preset (see its header)
    task = LDDPMTask(cfg, CPU)  # pretrained=True: must not need any downloaded weights
    assert task.perceptual is None
    # the exported EMA weights (every module, buffers included) stored in fp16: <= 4 MiB
    nbytes = sum(t.numel() * (2 if t.is_floating_point() else t.element_size())
                 for m in task.modules.values() for t in m.state_dict().values())
    assert nbytes <= 4 * 2 ** 20, nbytes / 2 ** 20
    with pytest.raises(ConfigError, match='lddpm.w_sytle'):
        load_config(LDDPMConfig, PRESET, ['lddpm.w_sytle=1'])
    bad = tmp_path / 'bad.yaml'
    bad.write_text(f'base: {PRESET}\ncond:\n  glow_levles: 2\n')
    with pytest.raises(ConfigError, match='cond.glow_levles'):
        load_config(LDDPMConfig, bad)
    with pytest.raises(ConfigError, match='model.ctx_ch=0'):
        check_lddpm_config(load_config(LDDPMConfig, PRESET, ['cond.attention=false', 'cond.cvae=false', 'cond.glow=false']))
