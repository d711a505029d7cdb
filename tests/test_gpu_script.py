"The GPU retraining script's plan runs end to end on the CPU with --smoke (what CI can check without a GPU)."
import json, os, subprocess, sys

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_train_assets_smoke(tmp_path):
    out = tmp_path / 'summary.json'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'gpu_train_assets.py'), '--smoke', '--runs', str(tmp_path / 'runs'),
                        '--json', str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads(out.read_text())
    sys.path.insert(0, str(ROOT / 'scripts'))
    from gpu_train_assets import PLAN
    assert set(s['presets']) == set(PLAN) and s['smoke'] is True
    for name, p in s['presets'].items():
        assert p['rc'] == 0 and p['steps'] == 2, (name, p)
        assert p['img_per_s'] and p['img_per_s'] > 0, (name, p)
        assert p['val'], (name, p)  # every run validated once at its end
    # later phases were built on the runs of earlier ones, not on the shipped assets
    cfg = (tmp_path / 'runs' / 'tiny_vae_ddpm_x4' / 'config.yaml').read_text()
    assert 'tiny_vae_f4' in cfg and 'assets/tiny_vae_f4' not in cfg
    assert 'assets/tiny_sr3_x4' not in (tmp_path / 'runs' / 'tiny_cgdpm_x4' / 'config.yaml').read_text()
    from omegaconf import OmegaConf
    for name in s['presets']:  # a chain on a frozen regressor got the new run of the regressor its preset names
        shipped = OmegaConf.select(OmegaConf.load(ROOT / 'configs' / f'{name}.yaml'), 'regressor', default='')
        if shipped:
            used = OmegaConf.load(tmp_path / 'runs' / name / 'config.yaml').regressor
            assert used == str(tmp_path / 'runs' / Path(shipped).name), (name, used)


@pytest.mark.parametrize('script, bad, says', [('gpu_train_assets.py', ['--only', 'tiny_nope'], 'unknown preset'),
                                               ('gpu_claims.py', ['--claims', 'nope'], 'Unknown claim')])
def test_gpu_scripts_refuse_without_gpu_or_with_unknown_names(script, bad, says, tmp_path):
    import torch
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / 'scripts' / script), *a, '--runs', str(tmp_path)],
                                    capture_output=True, text=True, timeout=120)
    r = run('--smoke', *bad)
    assert r.returncode == 2 and says in r.stderr
    if not torch.cuda.is_available():
        r = run()
        assert r.returncode == 2 and 'no CUDA GPU' in r.stderr
