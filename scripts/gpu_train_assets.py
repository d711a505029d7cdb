"""Retrain every shipped checkpoint at GPU scale: several presets side by side as separate processes.

    python scripts/gpu_train_assets.py --minutes 8 --json runs/gpu/summary.json   # one CUDA GPU, <= 8 min in all
    python scripts/gpu_train_assets.py --smoke                                      # the same plan on the CPU in < 2 min (CI)

The presets train in three phases, because later ones stand on earlier ones: the autoencoders and the regressor,
then every model that uses one of them (or nothing), then CG-DPM's guide on the new SR3. Each phase's processes run
at once (bf16, a larger batch, a share of the minutes), write their run folders where the CPU path writes them
(`runs/tiny_*`, or under `--runs`), and the next phase points its config keys (`autoencoder`, `regressor`,
`guide.ddpm`) at the new runs. The summary JSON has, per preset: steps, wall clock, images/s and the last validation
numbers. `--export` then writes the runs as asset folders (EMA weights, fp16) into `--assets` for comparison with the
shipped ones (`diffsr eval --ckpt ...`); nothing in `assets/` is replaced unless `--assets assets` is given.
"""
from __future__ import annotations
import argparse, csv, json, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# preset -> (phase, {config key: preset whose run it needs}); the phases run in order, presets in a phase side by side
PLAN: dict[str, tuple[int, dict[str, str]]] = {
    'tiny_vae_f4': (0, {}),
    'tiny_vqvae_f4': (0, {}),
    'tiny_regression_x4': (0, {}),
    'tiny_edsr_x4': (0, {}),
    'tiny_sr3_x4': (1, {}),
    'tiny_sr4_x4': (1, {}),
    'tiny_srddgan_x4': (1, {}),
    'tiny_lddpm_x4': (1, {}),
    'tiny_vae_ddpm_x4': (1, {'autoencoder': 'tiny_vae_f4'}),
    'tiny_vqvae_ddpm_x4': (1, {'autoencoder': 'tiny_vqvae_f4'}),
    'tiny_cgdpm_x4': (2, {'guide.ddpm': 'tiny_sr3_x4'}),
}
PHASE_SHARE = (0.3, 0.45, 0.25)  # fraction of --minutes per phase (phase 1 holds the most presets)

GPU = ['run.bf16=true', 'data.batch=64', 'run.steps=200000', 'optim.warmup=200', 'run.val_every=0', 'run.ckpt_every=2000',
       'run.progress=false']  # one H100/H200: 8x the CPU batch; the wall clock, not the step count, ends each run
SMOKE = ['run.steps=2', 'run.max_minutes=0', 'data.batch=2', 'data.val_images=2', 'sample.steps=2', 'run.log_every=1',
         'run.val_every=0', 'run.ckpt_every=0', 'run.progress=false', 'run.device=cpu', 'scale_batches=1']


def _regressor_run(preset: str, runs: Path) -> str | None:
    "The run folder that replaces the shipped regressor the preset's YAML names (assets/tiny_edsr_x4 -> runs/tiny_edsr_x4)."
    from diffsr_kit.config import read_yaml_chain
    named = [str(node['regressor']) for _, node in read_yaml_chain(ROOT / 'configs' / f'{preset}.yaml') if 'regressor' in node]
    if not named or not named[-1]: return None
    dep = Path(named[-1]).name
    if dep not in PLAN or PLAN[dep][0] >= PLAN[preset][0]:
        raise SystemExit(f"{preset}.yaml names regressor {named[-1]}, which no earlier phase of PLAN retrains; add it to PLAN.")
    return str(runs / dep)


def command(preset: str, runs: Path, minutes: float, smoke: bool) -> list[str]:
    "The `diffsr train` command line of one preset."
    phase, deps = PLAN[preset]
    ov = [f'run.out={runs / preset}', 'run.seed=0']
    ov += SMOKE if smoke else GPU + [f'run.max_minutes={minutes:.3f}']
    ae = preset.endswith('_f4')  # the autoencoder runs have scale_batches and no sampler
    ov = [o for o in ov if not (o.startswith('scale_batches') and not ae) and not (o.startswith('sample.') and ae)]
    ov += [f'{key}={runs / dep}' for key, dep in deps.items()]
    if (reg := _regressor_run(preset, runs)): ov.append(f'regressor={reg}')
    return [sys.executable, '-m', 'diffsr_kit.cli', 'train', '--overwrite', '--config', str(ROOT / 'configs' / f'{preset}.yaml'), *ov]


def summarise(run: Path, wall: float, rc: int) -> dict:
    "Steps, wall clock, images/s and the last validation row of a finished run."
    logs = list(csv.DictReader(open(run / 'log.csv'))) if (run / 'log.csv').exists() else []
    val = list(csv.DictReader(open(run / 'val.csv'))) if (run / 'val.csv').exists() else []
    batch = None
    if (run / 'config.yaml').exists():
        from omegaconf import OmegaConf
        batch = OmegaConf.select(OmegaConf.load(run / 'config.yaml'), 'data.batch')
    steps = int(logs[-1]['step']) if logs else 0
    secs = float(logs[-1]['seconds']) if logs else None
    return dict(rc=rc, steps=steps, wall_s=round(wall, 1), train_s=secs, batch=batch,
                img_per_s=round(steps * batch / secs, 2) if secs and batch else None,
                val={k: float(v) for k, v in val[-1].items()} if val else {})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--minutes', type=float, default=8.0, help='wall clock for all phases together')
    p.add_argument('--smoke', action='store_true', help='two steps of each preset on the CPU: checks the plan, trains nothing useful')
    p.add_argument('--runs', default=str(ROOT / 'runs'), help='where the run folders go (default: runs/, as the CPU presets)')
    p.add_argument('--json', default=None, help='summary JSON (default: <runs>/gpu_train_assets.json)')
    p.add_argument('--only', default='', help='comma-separated presets (their dependencies must exist under --runs)')
    p.add_argument('--export', action='store_true', help='also write each run as an asset folder under --assets')
    p.add_argument('--assets', default=str(ROOT / 'runs' / 'gpu_assets'), help='where --export writes (assets/ replaces the shipped ones)')
    a = p.parse_args(argv)
    os.chdir(ROOT)  # every path below is relative to the repository, so no machine path lands in a config or meta.json
    runs = Path(a.runs).resolve(); runs.mkdir(parents=True, exist_ok=True)
    if runs.is_relative_to(ROOT): runs = runs.relative_to(ROOT)  # relative paths in configs and meta.json (the processes run in ROOT)
    todo = [k for k in PLAN if not a.only or k in a.only.split(',')]
    unknown = set(filter(None, a.only.split(','))) - set(PLAN)
    if unknown: p.error(f"unknown preset(s) {sorted(unknown)}; choose from {list(PLAN)}")
    if not a.smoke:
        import torch
        if not torch.cuda.is_available(): p.error('no CUDA GPU here; use --smoke to check the plan on the CPU')
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'TQDM_DISABLE': '1', 'MPLBACKEND': 'Agg'}
    if a.smoke: env['OMP_NUM_THREADS'] = '1'
    out, t_all = {}, time.perf_counter()
    for phase, share in enumerate(PHASE_SHARE):
        names = [k for k in todo if PLAN[k][0] == phase]
        if not names: continue
        procs = {}
        for k in names:
            log = open(ROOT / runs / f'{k}.gpu_train.log', 'w')
            procs[k] = (subprocess.Popen(command(k, runs, a.minutes * share, a.smoke), cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT), time.perf_counter(), log)
        for k, (pr, t0, log) in procs.items():
            rc = pr.wait(); log.close()
            out[k] = summarise(ROOT / runs / k, time.perf_counter() - t0, rc)
            print(f"phase {phase} {k}: rc={rc} steps={out[k]['steps']} img/s={out[k]['img_per_s']} val={out[k]['val']}", flush=True)
            if rc != 0: print((ROOT / runs / f'{k}.gpu_train.log').read_text()[-3000:], file=sys.stderr)
    if a.export:
        from diffsr_kit.train import export_checkpoint
        for k, r in out.items():
            if r['rc'] == 0:
                export_checkpoint(runs / k, Path(a.assets) / k, command=f"scripts/gpu_train_assets.py --minutes {a.minutes} "
                                  f"({r['steps']} steps, {r['wall_s']} s, {r['img_per_s']} img/s)")
    dev = 'cpu (smoke)'
    if not a.smoke:
        import torch
        dev = torch.cuda.get_device_name(0)
    summary = dict(device=dev, minutes=a.minutes, smoke=a.smoke, total_s=round(time.perf_counter() - t_all, 1),
                   presets=out)
    path = Path(a.json) if a.json else ROOT / runs / 'gpu_train_assets.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1))
    print(f"wrote {path} ({summary['total_s']} s)")
    return 0 if all(r['rc'] == 0 for r in out.values()) else 1


if __name__ == '__main__':
    sys.exit(main())
