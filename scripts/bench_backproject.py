"""Paired A/B of LR back-projection on every shipped model (BENCHMARKS.md, "LR back-projection").

One SR sample per model and seed with sample.backproject=0, then 0, 1 and 3 steps of `degrade.back_project` on that
same sample, so the arms differ only by the projection. Metrics as `diffsr bench quality` takes them (8-bit rounding,
4-px border, classic bicubic LR). Usage: python scripts/bench_backproject.py [--split test|val] [--size 128]
"""
import argparse, json, statistics as st
import torch
from diffsr_kit.bench import held_out_crops
from diffsr_kit.core import assets_dir, from_model, to_model
from diffsr_kit.degrade import back_project
from diffsr_kit.metrics import bicubic_degrade_fn, lr_psnr, psnr
from diffsr_kit.quality import protocol_lr, quantise8, select_methods
from diffsr_kit.train import load_task

METHODS = 'regression,sr3-ddim,sr4,vae-ddpm,vqvae-ddpm,srddgan,cgdpm,lddpm'  # sr3-ddpm left out: 1,000 steps, ~4 min per image

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--split', default='test'); p.add_argument('--size', type=int, default=128)
    p.add_argument('--seeds', type=int, default=3); p.add_argument('--json', default=None, help='write the per-seed numbers here')
    a = p.parse_args()
    hr = torch.stack([quantise8(v) for v in held_out_crops(a.split, a.size).values()])
    lr, D, out = protocol_lr(hr), bicubic_degrade_fn(4), {}
    for key, m in select_methods(METHODS).items():
        task = load_task(assets_dir() / m.folder, 'cpu')
        task.cfg.sample.backproject = 0  # the chain's own sample; the arms project it below
        res = {k: {'psnr': [], 'lr_psnr': []} for k in (0, 1, 3)}
        for s in range(1 if key == 'regression' else a.seeds):  # regression is deterministic
            kw = {k: v for k, v in dict(sampler=m.sampler, steps=m.steps).items() if v is not None}
            with torch.no_grad(): sr = from_model(task.predict(to_model(lr), seed=s, **kw).float()).clamp(0, 1)
            for k, r in res.items():
                y = quantise8(back_project(sr, lr, k))
                r['psnr'].append(psnr(y, hr, 4).mean().item()); r['lr_psnr'].append(lr_psnr(y, lr, D).mean().item())
        out[key] = res
        d = [x - y for x, y in zip(res[1]['psnr'], res[0]['psnr'])]
        sd = lambda v: st.stdev(v) if len(v) > 1 else 0.0
        print(f"| {key} | " + ' | '.join(f"{st.mean(r['psnr']):.2f} ± {sd(r['psnr']):.2f} / {st.mean(r['lr_psnr']):.2f}" for r in res.values())
              + f" | {st.mean(d):+.3f} ± {sd(d):.3f} |", flush=True)
    if a.json: json.dump(out, open(a.json, 'w'), indent=1)

if __name__ == '__main__': main()
