"""configs/paper/*.yaml: every paper preset validates and builds its networks on the meta device (no memory, no data, no
pretrained weights); its header cites its source, states its data layout, and carries the dry-run's own numbers."""
import json, os, re, subprocess, sys
from pathlib import Path

import pytest
import torch

from diffsr_kit.train import load_run_config
from diffsr_kit.plan import build_on_meta, estimate_run

PRESETS = sorted(Path('configs/paper').glob('*.yaml'))

def header(path: Path) -> str:
    "The comment lines at the top of a preset."
    lines = path.read_text().splitlines()
    return '\n'.join(l for l in lines[:next(i for i, l in enumerate(lines) if not l.startswith('#'))])

def rss_mb() -> float:
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS:')) / 1024


def test_every_paper_in_the_issue_has_a_preset():
    names = {p.stem for p in PRESETS}
    want = {'sr3_ffhq_celebahq_16_128', 'sr4_ffhq_celebahq_16_128', 'lddpm_difl2k_64_256', 'lddpm_celeba_16_128',
            'srddgan_celebahq_16_128', 'srddgan_div2k_32_128', 'srddgan_cifar10_16_32', 'cgdpm_guide_ffhq_celebahq_16_128',
            *(f'thesis_{k}_ddpm_{d}' for k in ('vae', 'vqvae') for d in ('celeba_32_128', 'kather_32_128', 'kather_16_128', 'mri_32_128'))}
    assert want <= names, sorted(want - names)


@pytest.mark.parametrize('path', PRESETS, ids=lambda p: p.stem)
def test_preset_builds_on_meta_and_header_is_honest(path):
    cfg = load_run_config(str(path), [])
    task, _ = build_on_meta(cfg)
    ts = [t for m in task.modules.values() for t in [*m.parameters(), *m.buffers()]]
    assert ts and all(t.device.type == 'meta' for t in ts)      # nothing allocated
    e = estimate_run(cfg)
    print(f"{path.stem}: {e['params'] / 1e6:.2f}M parameters, {e['memory_mb']['total'] / 1024:.1f} GB per GPU (activations estimated)")
    assert e['trace_error'] is None and e['memory_mb']['activations'] > 0 and e['flops_per_img'] > 0
    h = header(path)
    assert re.search(r'(Table \d|sec\. \d|eq\. \d)', h), 'cites no table / section'
    assert 'Data layout' in h and cfg.data.train in h and cfg.data.val in h, 'data layout not stated'
    assert cfg.data.train.startswith('/data/') and cfg.run.out.startswith('runs/paper/')
    # the dry-run numbers in the header are the ones estimate_run gives now (no stale comment)
    m = re.search(r'([\d.]+)M params \(([\d.]+)M trained\); per GPU ([\d.]+) GB', h)
    assert m, 'no dry-run line'
    assert float(m[1]) == pytest.approx(e['params'] / 1e6, abs=0.006) and float(m[2]) == pytest.approx(e['trained'] / 1e6, abs=0.006)
    assert float(m[3]) == pytest.approx(e['memory_mb']['total'] / 1024, abs=0.051)
    assert 'ESTIMATED' in h and 'GFLOP/img' in h
    g = re.search(r'Global batch (\d+) = (.*)', h)
    assert g and int(g[1]) == cfg.data.batch * cfg.optim.accum, 'global batch line disagrees with data.batch x optim.accum'
    gpus = re.search(r' on ([\d, or]+) GPUs', g[2])
    for w in map(int, re.findall(r'\d+', gpus[1])) if gpus else [1]:   # every GPU count the header promises is valid
        assert cfg.optim.accum % w == 0, w


def test_dry_run_allocates_nothing():
    small = load_run_config('configs/tiny_sr3_x4.yaml', [])
    estimate_run(small)                                          # imports and caches warm
    cfg = load_run_config('configs/paper/sr3_ffhq_celebahq_16_128.yaml', [])
    before = rss_mb()
    e = estimate_run(cfg)
    grown = rss_mb() - before
    real = (e['memory_mb']['weights'] + e['memory_mb']['activations'])   # what a real build + step would need (MB)
    assert real > 10_000 and grown < 200, (grown, real)


def test_latent_dry_run_reads_json_never_weights(monkeypatch):
    import safetensors.torch
    def boom(*a, **k): raise AssertionError('a dry run loaded weights')
    monkeypatch.setattr(safetensors.torch, 'load_file', boom)
    monkeypatch.setattr(torch, 'load', boom)
    p = 'configs/paper/thesis_vae_ddpm_celeba_32_128.yaml'
    cfg = load_run_config(p, [])                                 # its autoencoder run does not exist here: the `ae` block
    task, note = build_on_meta(cfg)
    assert 'preset' in note and task.modules['ae'].cfg.base_ch == cfg.ae.base_ch
    shipped = load_run_config(p, ['autoencoder=assets/tiny_vae_f4'])  # an existing folder: its JSON gives the shape
    task, note = build_on_meta(shipped)
    assert 'JSON' in note and task.modules['ae'].cfg.base_ch == 32 and task.modules['ae'].cfg.z_ch == 16
    assert all(t.device.type == 'meta' for t in task.modules['ae'].parameters())


def test_cli_dry_run_prints_parameters_and_memory():
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    diffsr = str(Path(sys.executable).with_name('diffsr'))
    r = subprocess.run([diffsr, 'train', '--config', 'configs/paper/srddgan_cifar10_16_32.yaml', '--dry-run', '--gpus', '4'],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'task: srddgan' in r.stdout and 'M parameters' in r.stdout and 'memory per GPU' in r.stdout
    assert 'global 128 = 4 GPU(s) x 1 micro-step(s) x 32 images' in r.stdout
    r = subprocess.run([diffsr, 'train', '--config', 'configs/paper/srddgan_cifar10_16_32.yaml', '--dry-run', '--gpus', '3'],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and 'not divisible by the number of processes (3)' in r.stderr
