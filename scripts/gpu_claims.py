"""The whole claims table (results/claims.md's protocol: 3 training seeds, 3 sampling seeds, 4 tiles per test image) on one CUDA GPU.

    python scripts/gpu_claims.py --minutes 8                 # one H100/H200: every arm at once-ish, <= 8 min in all
    python scripts/gpu_claims.py --smoke                     # the same table on the CPU in a few minutes (CI): plumbing only

Every training run (arm x seed) is its own process (`claims.run_claims` with many jobs); the GPU is shared by them, so
each gets a batch of 32 in bf16 and the per-arm budget that makes the table fit `--minutes`: the runs go in waves of
`--jobs`, and each wave's minutes are the total over the number of waves, less the evaluation and start-up the planner
estimates. Its run folders (`runs/claims_gpu`) and report (`results/claims_gpu/`) are kept apart from the CPU table's,
because the budget differs. `--smoke` trains every arm of every claim for 2 steps at batch 2, evaluates 2 sampler steps
on 32-px tiles with one seed, and checks that claims.md and claims.json come out: it decides nothing.
"""
from __future__ import annotations
import argparse, json, math, os, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPU = ['run.bf16=true', 'data.batch=32', 'run.device=cuda']  # many processes on one GPU: a moderate batch each
SMOKE = ['data.batch=2', 'data.val_images=2', 'run.device=cpu']


def arm_minutes_for(total: float, runs: int, jobs: int, overhead: float) -> float:
    "Training minutes per arm so that `runs` trainings in waves of `jobs` fit `total` minutes, each wave also paying `overhead`."
    waves = math.ceil(runs / jobs)
    return round(total / waves - overhead, 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--minutes', type=float, default=8.0, help='wall clock for the whole table')
    p.add_argument('--jobs', type=int, default=24, help='training processes at once on the GPU')
    p.add_argument('--smoke', action='store_true', help='2 steps of every arm on the CPU: checks the plan, decides nothing')
    p.add_argument('--runs', default=str(ROOT / 'runs' / 'claims_gpu'), help='run folders (finished ones are reused)')
    p.add_argument('--out', default=str(ROOT / 'results' / 'claims_gpu'), help='folder for claims.md, claims.json, gpu_claims.json')
    p.add_argument('--claims', default='', help='comma-separated claim ids (default: all)')
    a = p.parse_args(argv)
    if a.smoke: os.environ.setdefault('DIFFSR_OFFLINE', '1')  # no weights are fetched for a plumbing run
    from diffsr_kit import claims as C
    ids = [x for x in a.claims.split(',') if x] or None
    try: sel = C.select_claims(ids)
    except ValueError as e: p.error(str(e))
    import torch
    if not a.smoke and not torch.cuda.is_available(): p.error('no CUDA GPU here; use --smoke to check the table on the CPU')
    runs = C.check_registry()
    keys = {k for c in sel for k in C.claim_runs(c, runs)}
    seeds, sample_seeds, crops, size = (1, 1, 1, 32) if a.smoke else (3, 3, 4, 128)
    jobs = 2 if a.smoke else a.jobs
    if a.smoke: minutes, extra, steps_cap, eval_cap = 1.0, SMOKE, 2, 2
    else:  # the evaluation on a GPU is ~20x faster than the planner's CPU estimate; start-up dominates
        minutes = arm_minutes_for(a.minutes, len(keys) * seeds, jobs, overhead=0.5)
        if minutes < 0.25: p.error(f"{len(keys) * seeds} trainings in waves of {jobs} leave {minutes} min per arm; raise --minutes or --jobs")
        extra, steps_cap, eval_cap = GPU, None, None
    t0 = time.perf_counter()
    rep = C.run_claims(ids, minutes=minutes, out=a.out, runs_dir=a.runs, jobs=jobs, threads=1, steps_cap=steps_cap, size=size,
                       extra=extra, seeds=seeds, sample_seeds=sample_seeds, crops=crops, eval_steps_cap=eval_cap,
                       progress=not a.smoke)
    wall = time.perf_counter() - t0
    summary = dict(device='cpu (smoke)' if a.smoke else torch.cuda.get_device_name(0), smoke=a.smoke, arm_minutes=minutes,
                   jobs=jobs, trainings=len(keys) * seeds, total_s=round(wall, 1),
                   verdicts={c['id']: c['verdict'] for c in rep['claims']},
                   arms={n: {k: r.get(k) for k in ('status', 'steps', 'psnr', 'train_minutes', 'reason')} for n, r in rep['arms'].items()})
    out = Path(a.out) / 'gpu_claims.json'
    out.write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote {out}, claims.md and claims.json ({wall:.0f} s)")
    return 0 if all(r.get('status') != 'failed' for r in rep['arms'].values()) else 1


if __name__ == '__main__':
    sys.exit(main())
