"Every shipped checkpoint gives the SR output recorded before the consolidation (tests/golden_sr.py) for the same input and seed."
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from golden_sr import CALLS, GOLDEN, ROOT, lr_input, run, weights_hash

ATOL = 1e-3  # in model range [-1, 1]: a quarter of an 8-bit level; a changed chain or noise order moves pixels by ~0.1

@pytest.fixture(scope='module')
def golden():
    return dict(np.load(GOLDEN))

def test_input_unchanged(golden):
    np.testing.assert_array_equal(lr_input().numpy(), golden['lr'])

@pytest.mark.parametrize('name,label,kw', [(n, l, kw) for n, calls in CALLS.items() for l, kw in calls])
def test_same_output(golden, name, label, kw):
    folder = ROOT / 'assets' / name
    assert weights_hash(folder) == str(golden[f'{name}/sha256']), (
        f"assets/{name} has new weights; after checking its pictures, re-record: python tests/golden_sr.py --only {name}")
    got = run(folder, kw, lr_input())
    want = golden[f'{name}/{label}']
    assert got.shape == want.shape
    err = float(np.abs(got - want).max())
    assert err <= ATOL, f"{name} {label}: max |difference| {err:.2e} > {ATOL}"

@pytest.mark.parametrize('name', list(CALLS))
def test_shipped_config_ends_with_one_back_projection(golden, name):
    "The shipped configs end every predict with one LR back-projection step, applied to the chain's recorded output."
    import torch
    from diffsr_kit.degrade import back_project
    from diffsr_kit.train import load_task
    task = load_task(ROOT / 'assets' / name, 'cpu')
    assert task.cfg.sample.backproject == 1
    # the recorded call made as the shipped config predicts (with or without the geometric self-ensemble)
    label, kw = next((l, {k: v for k, v in kw.items() if k != 'self_ensemble'}) for l, kw in CALLS[name]
                     if kw.get('self_ensemble', False) == task.cfg.sample.self_ensemble)
    lr = lr_input()
    with torch.no_grad(): got = task.predict(lr, seed=0, **kw).float()
    want = back_project((torch.from_numpy(golden[f'{name}/{label}']) + 1) / 2, (lr + 1) / 2, 1) * 2 - 1
    err = float((got - want).abs().max())
    assert err <= ATOL, f"{name} {label}: max |difference| {err:.2e} > {ATOL}"
    assert float((got - torch.from_numpy(golden[f'{name}/{label}'])).abs().max()) > 10 * ATOL  # the step does change the output
