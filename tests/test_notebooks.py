"Run every notebook through nbdev-test in fast mode (IN_TEST is set by nbdev-test)."
import os, re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_nbdev_test_all_notebooks(capsys):
    nbdev_test = Path(sys.executable).with_name('nbdev-test')
    env = {**os.environ, 'MPLBACKEND': 'Agg', 'TQDM_DISABLE': '1', 'OMP_WAIT_POLICY': 'PASSIVE'}  # no spin-waiting threads when notebooks share cores
    r = subprocess.run([str(nbdev_test), '--timing', '--n-workers', '2'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=3000)
    times = dict(re.findall(r'^(\S+\.ipynb): (\d+) secs$', r.stdout, re.M))
    with capsys.disabled():
        print('\nnbdev-test seconds per notebook (2 workers on this machine):', times)
    assert r.returncode == 0, f'nbdev-test failed:\n{r.stdout[-4000:]}\n{r.stderr[-8000:]}'
    assert 'Success.' in r.stdout
    n_nbs = len(list((ROOT / 'nbs').rglob('[0-9]*.ipynb')))
    assert len(times) == n_nbs, f'expected timings for {n_nbs} notebooks, got {sorted(times)}'
