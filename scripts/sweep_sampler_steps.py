"""DDIM step counts of shipped checkpoints on a held-out split, mean over sampling seeds: the evidence for each model's default steps.

    python scripts/sweep_sampler_steps.py --assets tiny_vae_ddpm_x4 tiny_sr3_x4 --steps 2 3 5 10 50 --split val --size 64

Prints one row per (asset, steps): PSNR, SSIM and LR-PSNR averaged over the images (each image's tiles averaged first) and
the sampling seeds, with the seed-to-seed sd of the PSNR mean; `--json F` also writes them.
"""
import argparse, json, sys
import numpy as np
from diffsr_kit.bench import evaluate_sr, format_table
from diffsr_kit.quality import load_checkpoint
from diffsr_kit.core import repo_root


def sweep(asset: str, steps: list[int], split: str, size: int, crops: int, seeds: int, sampler: str = 'ddim') -> list[dict]:
    "One row per step count: metrics averaged over images, then over sampling seeds 0..seeds-1."
    p = load_checkpoint(repo_root() / 'assets' / asset, 'cpu')
    rows = []
    for k in steps:
        by_seed = [evaluate_sr(lambda lr, seed, s=s: p.predict(lr, seed=s, sampler=sampler, steps=k), split=split, size=size,
                               crops_per_image=crops)['mean'] for s in range(seeds)]
        ps = [m['psnr'] for m in by_seed]
        rows.append(dict(asset=asset, sampler=sampler, steps=k, psnr=float(np.mean(ps)), psnr_sd=float(np.std(ps, ddof=1)) if seeds > 1 else 0.0,
                         ssim=float(np.mean([m['ssim'] for m in by_seed])), lr_psnr=float(np.mean([m['lr_psnr'] for m in by_seed]))))
        print(format_table(rows[-1]), file=sys.stderr)
    return rows


if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--assets', nargs='+', required=True, help='folders under assets/')
    ap.add_argument('--steps', nargs='+', type=int, default=[2, 3, 5, 10, 20, 50], help='DDIM step counts')
    ap.add_argument('--split', default='val', help="split of the bundled images ('val' to choose, 'test' to report)")
    ap.add_argument('--size', type=int, default=64, help='tile side (the val split holds 4 images of at least 48 px)')
    ap.add_argument('--crops', type=int, default=4, choices=(1, 4), help='tiles per image, averaged per image')
    ap.add_argument('--seeds', type=int, default=3, help='sampling seeds')
    ap.add_argument('--json', default=None, help='also write the rows here')
    a = ap.parse_args()
    base = evaluate_sr(None, split=a.split, size=a.size, crops_per_image=a.crops)
    rows = [dict(asset='bicubic', sampler='', steps=0, psnr=base['mean']['psnr'], psnr_sd=0.0, ssim=base['mean']['ssim'],
                 lr_psnr=base['mean']['lr_psnr'])]
    for asset in a.assets: rows += sweep(asset, a.steps, a.split, a.size, a.crops, a.seeds)
    print(f"split {a.split}, {len(base['names'])} images, {a.size}-px tiles x{a.crops} per image, {a.seeds} sampling seed(s)")
    print(format_table(rows))
    if a.json: open(a.json, 'w').write(json.dumps(rows, indent=1))
