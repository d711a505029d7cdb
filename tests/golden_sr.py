"""Record (or check) the SR outputs of every shipped checkpoint for one fixed input and seed.

`python tests/golden_sr.py` writes tests/data/golden_sr.npz; `tests/test_golden_sr.py` compares the current code
against it. Each entry is tied to the SHA-256 of the checkpoint's weights, so a retrained checkpoint is re-recorded
on purpose (`python tests/golden_sr.py --only tiny_vqvae_ddpm_x4`), never silently.
"""
from __future__ import annotations
import argparse, hashlib, json
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / 'tests' / 'data' / 'golden_sr.npz'
# checkpoint folder -> the predict calls recorded: (label, kwargs); chain models at both samplers, few steps
CALLS = {
    'tiny_regression_x4': [('default', {})],
    'tiny_edsr_x4': [('default', {}), ('ensemble8', dict(self_ensemble=True))],  # self_ensemble: the config key, not a predict argument
    'tiny_sr3_x4': [('ddim10', dict(sampler='ddim', steps=10)), ('ddpm10', dict(sampler='ddpm', steps=10))],
    'tiny_sr4_x4': [('ddim10', dict(sampler='ddim', steps=10)), ('ddpm10', dict(sampler='ddpm', steps=10))],
    'tiny_vae_ddpm_x4': [('ddim10', dict(sampler='ddim', steps=10)), ('ddpm10', dict(sampler='ddpm', steps=10))],
    'tiny_vqvae_ddpm_x4': [('ddim10', dict(sampler='ddim', steps=10)), ('ddpm10', dict(sampler='ddpm', steps=10))],
    'tiny_srddgan_x4': [('steps4', dict(steps=4)), ('steps2', dict(steps=2))],
    'tiny_cgdpm_x4': [('ddim10', dict(sampler='ddim', steps=10)), ('ddpm10', dict(sampler='ddpm', steps=10)),
                      ('ddim10_s0', dict(sampler='ddim', steps=10, guidance_scale=0.0))],
    'tiny_lddpm_x4': [('steps4', dict(steps=4)), ('steps2', dict(steps=2))],
}

def lr_input() -> torch.Tensor:
    "A fixed 16x16 LR crop in [-1, 1]: the first test image, bicubic x4 down (the quality protocol's degradation)."
    from diffsr_kit.quality import quality_images, protocol_lr
    hr = next(iter(quality_images(size=64).values()))[None]  # (1, 3, 64, 64) in [0, 1]
    return protocol_lr(hr) * 2 - 1

def weights_hash(folder: Path) -> str:
    "SHA-256 of the weights the checkpoint loads (modules shared with sibling folders included), not of its file."
    from diffsr_kit.checkpoint import module_digest, read_weights, resolve_shared
    meta = json.loads((folder / 'meta.json').read_text())
    flat = resolve_shared(read_weights(folder / 'model.safetensors'), meta.get('shared') or {}, folder)
    h = hashlib.sha256()
    for m in sorted({k.split('.', 1)[0] for k in flat}): h.update(f'{m}:{module_digest(flat, m)};'.encode())
    return h.hexdigest()

def run(folder: Path, kw: dict, lr: torch.Tensor) -> np.ndarray:
    "The chain's own SR output of one call (sample.backproject=0; sample.self_ensemble as kw says, else off), float32 (1, 3, 64, 64) in [-1, 1]."
    from diffsr_kit.train import load_task
    task = load_task(folder, 'cpu')
    task.cfg.sample.backproject = 0  # the goldens guard the networks and chains; test_golden_sr checks the projection on top
    kw = dict(kw)
    task.cfg.sample.self_ensemble = kw.pop('self_ensemble', False)
    with torch.no_grad(): return task.predict(lr, seed=0, **kw).float().numpy()

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--only', nargs='*', default=None, help='checkpoint folders to (re-)record; default: all')
    p.add_argument('--hashes-only', action='store_true', help='re-record only the weights hashes (after a change of how they are computed)')
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    old = dict(np.load(GOLDEN)) if GOLDEN.exists() else {}
    lr = lr_input()
    out = {k: v for k, v in old.items()}
    for name, calls in CALLS.items():
        if a.only and name not in a.only: continue
        folder = ROOT / 'assets' / name
        out[f'{name}/sha256'] = np.array(weights_hash(folder))
        if a.hashes_only: continue
        for label, kw in calls:
            out[f'{name}/{label}'] = run(folder, kw, lr)
            print(name, label, float(np.abs(out[f'{name}/{label}']).mean()))
    out['lr'] = lr.numpy()
    np.savez_compressed(GOLDEN, **out)
    print('wrote', GOLDEN, GOLDEN.stat().st_size, 'bytes')

if __name__ == '__main__': main()
