"""diffsr_kit.bench: documented result keys, positive throughputs, timing helper and table layout."""
import pytest
import torch

from diffsr_kit.bench import bench_degrade, device_name, format_table, time_fn


def test_bench_degrade_keys_and_positive_numbers():
    res = bench_degrade(batch=4, size=32, device='cpu', repeats=1, warmup=0)
    assert set(res) == {'batched_img_per_s', 'per_image_img_per_s', 'device', 'batch', 'size'}
    assert res['batched_img_per_s'] > 0 and res['per_image_img_per_s'] > 0
    assert res['batch'] == 4 and res['size'] == 32
    assert isinstance(res['device'], str) and res['device']


def test_bench_degrade_classic_pipeline():
    res = bench_degrade(batch=2, size=16, pipeline='classic', device='cpu', repeats=1, warmup=0)
    assert res['batched_img_per_s'] > 0 and res['per_image_img_per_s'] > 0


def test_time_fn_counts_calls_and_orders_stats():
    calls = []
    r = time_fn(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and len(r['times']) == 4
    assert 0 <= r['min_s'] <= r['median_s']
    with pytest.raises(ValueError, match='repeats >= 1'):
        time_fn(lambda: None, repeats=0)


def test_device_name_cpu():
    n = torch.get_num_threads()
    assert device_name('cpu').endswith(f'({n} thread' + ('' if n == 1 else 's') + ')')


def test_format_table_layout():
    rows = [{'pipeline': 'classic', 'batched_img_per_s': 1500.25, 'batch': 64},
            {'pipeline': 'shuffled', 'batched_img_per_s': 80.0, 'batch': 64}]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ['pipeline', 'batched_img_per_s', 'batch']
    assert set(lines[1].replace(' ', '')) == {'-'}
    assert lines[2].split() == ['classic', '1500.2', '64'] or lines[2].split() == ['classic', '1500.3', '64']
    # numbers are right-aligned: every row ends at the same column
    assert len({len(line) for line in lines[2:]}) == 1


# ------------------------------------------------------------------ bench sample / bench train
import json, os, subprocess, sys
from pathlib import Path

from diffsr_kit.bench import bench_sample, bench_train, diffusers_loop, TRAIN_VARIANTS
from diffsr_kit.config import config_from_dict
from diffsr_kit.diffusion import Diffusion, DiffusionConfig
from diffsr_kit.samplers import ddim_sample, ddpm_sample
from diffsr_kit.tasks import DDPMTask, SRConfig

TINY = {'model': {'base_ch': 16, 'ch_mult': [1, 2], 'n_res': 1, 'attn_res': [], 'image_size': 32},
        'diffusion': {'T': 50}, 'data': {'patch': 32, 'batch': 2, 'val_images': 2}, 'sample': {'steps': 2}}

def _toy_eps(x, t):
    "A smooth stand-in for a trained network (depends on x and t)."
    return 0.3 * x + 0.01 * t.float().reshape(-1, 1, 1, 1)

@pytest.mark.parametrize('param', ['eps', 'v'])
def test_diffusers_reference_runs_the_same_ddim_chain(param):
    # the timed reference must do the same work: deterministic DDIM from the same x_T lands on the same x0
    d = Diffusion(DiffusionConfig(schedule='linear', T=200, param=param, clip_x0=False))
    ours = ddim_sample(_toy_eps, (2, 3, 8, 8), d, steps=20, seed=3, spacing='leading', progress=False)
    ref = diffusers_loop(_toy_eps, (2, 3, 8, 8), d, 'ddim', 20, seed=3)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)

def test_diffusers_reference_ddpm_final_step_is_the_posterior_mean():
    # DDPM draws noise in a different order, so compare the distribution's centre: with T=1 the step is deterministic
    d = Diffusion(DiffusionConfig(schedule='linear', T=1, clip_x0=False))
    ours = ddpm_sample(_toy_eps, (1, 3, 4, 4), d, seed=1, progress=False)
    ref = diffusers_loop(_toy_eps, (1, 3, 4, 4), d, 'ddpm', None, seed=1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)

def _tiny_task():
    t = DDPMTask(config_from_dict(SRConfig, TINY), torch.device('cpu'), pretrained=False)
    t.ema_modules = t.modules
    return t

def test_bench_sample_rows():
    rows = bench_sample({'tiny': _tiny_task()}, runs=[('ddpm', None), ('ddim', 5)], lr_size=8, repeats=1)
    assert [(r['model'], r['sampler'], r['steps']) for r in rows] == [('tiny', 'ddpm', 50), ('tiny', 'ddim', 5)]
    for r in rows:
        assert {'sec_per_img', 'img_per_s', 'device', 'chain_sec_per_img', 'diffusers_sec_per_img', 'ratio'} <= set(r)
        assert r['sec_per_img'] > 0 and abs(r['img_per_s'] * r['sec_per_img'] - 1) < 1e-9
        assert r['ratio'] == pytest.approx(r['chain_sec_per_img'] / r['diffusers_sec_per_img'])

def test_bench_sample_times_a_few_step_gan_through_its_predict():
    from diffsr_kit.config import load_config
    from diffsr_kit.srddgan import SRDDGANConfig, SRDDGANTask
    cfg = load_config(SRDDGANConfig, None, ['model.base_ch=16', 'model.ch_mult=[1,2]', 'model.attn_res=[]', 'model.image_size=32',
                                            'model.z_dim=8', 'model.cond_ch=11', 'rrdb.nf=8', 'rrdb.nb=1', 'rrdb.gc=8',
                                            'disc.base_ch=16', 'disc.ch_mult=[1,2]', 'gan.beta=0', 'gan.eta=0', 'gan.pixel=1'])
    t = SRDDGANTask(cfg, torch.device('cpu'), pretrained=False); t.ema_modules = t.modules
    rows = bench_sample({'gan': t}, runs=[('ddpm', None), ('ddim', 50)], lr_size=8, repeats=1)
    assert len(rows) == 1 and rows[0]['steps'] == cfg.sample.steps and rows[0]['sec_per_img'] > 0 and 'ratio' not in rows[0]

def test_bench_train_row_and_bad_variant():
    cfg = config_from_dict(SRConfig, TINY)
    r = bench_train(cfg, steps=2, warmup=1, name='tiny')
    assert r['config'] == 'tiny' and r['batch'] == 2 and r['patch'] == 32 and r['img_per_s'] > 0
    assert r['img_per_s'] == pytest.approx(2 / r['sec_per_step']) and r['step_ms'] == pytest.approx(1e3 * r['sec_per_step'])
    assert r['mfu'] == pytest.approx(r['flops_per_img'] * r['img_per_s'] / r['peak_flops'])
    assert r['mfu'] > 0 and r['peak_mem_kind'] in ('rss_peak_since_reset', 'rss_peak_of_process') and r['peak_mem_mb'] > 0
    with pytest.raises(ValueError, match='Unknown variant'): bench_train(cfg, variant='fp8')
    assert set(TRAIN_VARIANTS) >= {'fp32', 'bf16+cl', 'bf16+cl+compile'}

def test_bench_train_flops_match_torch_flop_counter():
    # the FLOPs per image bench_train reports (traced on the meta device) against torch's own FlopCounterMode on one
    # real forward + backward of the same DDPM training loss on the CPU, with the math attention kernel both count alike
    from torch.nn.attention import sdpa_kernel, SDPBackend
    from torch.utils.flop_counter import FlopCounterMode
    cfg = config_from_dict(SRConfig, TINY)
    r = bench_train(cfg, steps=1, warmup=1)
    torch.manual_seed(0)
    task = DDPMTask(cfg, torch.device('cpu'), pretrained=False)
    hr = torch.rand(2, 3, 32, 32) * 2 - 1
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        loss, _ = task.loss('main', {'hr': hr, 'lr': torch.nn.functional.avg_pool2d(hr, 4)}, 1)
        loss.backward()
    assert r['flops_per_img'] == pytest.approx(fc.get_total_flops() / 2, rel=1e-9)

def test_flop_matched_reference_is_within_15_percent():
    from diffsr_kit.bench import match_reference
    from diffsr_kit.plan import build_on_meta, trace_train_step
    for cfg in (config_from_dict(SRConfig, TINY),
                config_from_dict(SRConfig, {**TINY, 'model': {**TINY['model'], 'base_ch': 32, 'attn_res': [16]}})):
        target = trace_train_step(build_on_meta(cfg)[0], cfg)['flops_per_img']
        rc, ratio = match_reference(cfg, target)
        check = trace_train_step(build_on_meta(rc)[0], rc)['flops_per_img'] / target
        assert abs(ratio - 1) <= 0.15 and ratio == pytest.approx(check)
        assert len(rc.ref.block_out_channels) == len(cfg.model.ch_mult) and rc.ref.layers_per_block == cfg.model.n_res

def _cli(*args, cwd=None):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TQDM_DISABLE': '1'}
    return subprocess.run([str(Path(sys.executable).with_name('diffsr')), *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)

def test_cli_bench_train_and_sample(tmp_path):
    import yaml
    y = tmp_path / 'tiny.yaml'
    y.write_text(yaml.safe_dump({'task': 'ddpm', **TINY, 'run': {'out': str(tmp_path / 'run'), 'steps': 2, 'progress': False}}))
    r = _cli('bench', 'train', '--config', str(y), '--steps', '2', '--warmup', '1', '--json')
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(r.stdout.strip().splitlines()[-1])   # one config and variant: one object
    assert {'config', 'device', 'img_per_s', 'step_ms', 'peak_mem_mb', 'flops_per_img', 'mfu', 'reference'} <= set(row)
    assert row['config'] == 'tiny' and row['img_per_s'] > 0 and row['mfu'] > 0 and row['flops_per_img'] > 0
    ref = row['reference']
    assert ref['model'] == 'diffusers.UNet2DModel' and abs(ref['flops_ratio'] - 1) <= 0.15 and ref['img_per_s'] > 0
    assert {'step_ms', 'peak_mem_mb', 'flops_per_img', 'mfu', 'block_out_channels'} <= set(ref)
    r = _cli('train', '--config', str(y))  # a real (2-step) run to time the samplers on
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli('bench', 'sample', '--ckpt', f'mine={tmp_path / "run"}', '--runs', 'ddim:3', '--lr-size', '8', '--repeats', '1', '--json')
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout.strip().splitlines()[-1])
    assert [(x['model'], x['sampler'], x['steps']) for x in rows] == [('mine', 'ddim', 3)] and rows[0]['ratio'] > 0
    r = _cli('bench', 'sample', '--ckpt', str(tmp_path / 'run'), '--runs', 'euler:3')
    assert r.returncode != 0 and 'ddpm or ddim' in r.stderr
