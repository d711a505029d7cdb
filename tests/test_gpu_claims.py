"The GPU claims script runs the whole table on the CPU with --smoke (what CI can check without a GPU)."
import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'scripts'))


def test_gpu_claims_smoke_runs_every_claim(tmp_path):
    from diffsr_kit import claims as C
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'DIFFSR_OFFLINE': '1'}
    r = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'gpu_claims.py'), '--smoke', '--runs', str(tmp_path / 'runs'),
                        '--out', str(tmp_path / 'out')], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((tmp_path / 'out' / 'gpu_claims.json').read_text())
    assert s['smoke'] is True and list(s['verdicts']) == list(C.CLAIMS)
    for name, a in s['arms'].items():
        if C.ARMS[name].needs: assert a['status'] == 'not run', (name, a)  # VGG-19 is not here (offline)
        else: assert a['status'] == 'ok' and a['steps'] == 2, (name, a)
    js = json.loads((tmp_path / 'out' / 'claims.json').read_text())
    assert [c['id'] for c in js['claims']] == list(C.CLAIMS) and js['header']['eval_steps_cap'] == 2
    ev = json.loads((tmp_path / 'runs' / 'sr3_T2000' / 'eval_sr3_T2000_full.json').read_text())
    assert ev['eval_steps'] == 2  # the 2000-step chain was capped for the smoke run


def test_arm_minutes_fill_the_waves():
    from gpu_claims import arm_minutes_for
    assert arm_minutes_for(8, 66, 24, 0.5) == round(8 / 3 - 0.5, 2)  # 66 trainings in 3 waves of 24
    assert arm_minutes_for(8, 24, 24, 0.5) == 7.5
