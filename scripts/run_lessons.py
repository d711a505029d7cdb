"""`make lessons`: execute the lessons in full mode with the shipped checkpoints and store their outputs.

Each lesson runs in its own process (so its peak memory can be measured) with execnb, the engine nbdev-test uses;
figures are stored as PNG at 72 dpi. The notebook's metadata records when and how it ran and a hash of its code
cells, so `tests/test_lesson_outputs.py` can tell stored outputs that belong to the current code from stale ones.

    python scripts/run_lessons.py                 # every lesson, one after the other
    python scripts/run_lessons.py 01 03 --jobs 2  # some lessons, two at a time
"""
from __future__ import annotations
import argparse, datetime, hashlib, json, os, resource, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LESSONS = ROOT / 'nbs' / 'lessons'
META_KEY = 'diffsr_kit'  # notebook metadata key of the execution record (kept by nbdev-clean: allowed_metadata_keys)

def code_hash(nb: dict) -> str:
    "SHA-256 of the notebook's code cells' sources, in order: what the stored outputs were produced from."
    h = hashlib.sha256()
    for c in nb['cells']:
        if c['cell_type'] == 'code': h.update(''.join(c['source']).encode()); h.update(b'\0')
    return h.hexdigest()

def run_one(path: Path) -> dict:
    "Execute one lesson in this process, store its outputs and the record; returns the record."
    from fastcore.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    for k in ('IN_TEST', 'DIFFSR_FAST'): os.environ.pop(k, None)   # full mode
    os.environ.setdefault('TQDM_DISABLE', '1'); os.environ['MPLBACKEND'] = 'module://matplotlib_inline.backend_inline'
    nb = read_nb(path)
    t0 = time.perf_counter()
    sh = CaptureShell(path=path.parent, mpl_format='png')
    sh.run("import matplotlib; matplotlib.rcParams['figure.dpi'] = 72\n"
           "import plotly.io as _pio; _pio.renderers.default = 'notebook_connected'")  # plotly.js from its CDN, not embedded
    sh.run_all(nb, exc_stop=True)
    for c in nb['cells']: c['outputs'] = [_shrink(o) for o in c.get('outputs', [])]
    peak = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024  # KiB on Linux
    rec = dict(executed=datetime.datetime.now().isoformat(timespec='minutes'), mode='full', seconds=round(time.perf_counter() - t0, 1),
               peak_rss_mb=round(peak), code_sha256=code_hash(json.loads(json.dumps(nb))),
               threads=os.environ.get('OMP_NUM_THREADS', ''))
    nb['metadata'][META_KEY] = rec
    write_nb(nb, path)
    return rec

JPEG_OVER = 60_000  # bytes: larger PNG outputs (photographs, image grids) are stored as JPEG, quality 85
PLOTLY_JSON_OVER = 100_000  # bytes: a plotly figure's JSON this large is dropped (its HTML output, drawn from the CDN, stays)

def _shrink(o: dict) -> dict:
    "Keep the stored lesson small: big PNGs become JPEG (85), big plotly JSON goes (the HTML rendering of it stays)."
    import base64, io
    from PIL import Image
    d = o.get('data')
    if not d: return o
    png = d.get('image/png')
    if png and len(png) > JPEG_OVER:
        im = Image.open(io.BytesIO(base64.b64decode(png))).convert('RGB')
        buf = io.BytesIO(); im.save(buf, format='JPEG', quality=85, optimize=True)
        d = {**{k: v for k, v in d.items() if k != 'image/png'}, 'image/jpeg': base64.b64encode(buf.getvalue()).decode()}
    if len(json.dumps(d.get('application/vnd.plotly.v1+json', ''))) > PLOTLY_JSON_OVER and 'text/html' in d:
        d = {k: v for k, v in d.items() if k != 'application/vnd.plotly.v1+json'}
    return {**o, 'data': d}

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('lessons', nargs='*', help='lesson numbers or file names (default: all)')
    p.add_argument('--jobs', type=int, default=1, help='lessons executed at once, one process each')
    p.add_argument('--one', help=argparse.SUPPRESS)   # internal: run this notebook in this process
    a = p.parse_args(argv)
    if a.one: print(json.dumps(run_one(Path(a.one)))); return 0
    paths = sorted(LESSONS.glob('*.ipynb'))
    if a.lessons: paths = [q for q in paths if any(q.name.startswith(s) or q.name == s for s in a.lessons)]
    running, todo, table = {}, list(paths), []
    while todo or running:
        while todo and len(running) < a.jobs:
            q = todo.pop(0)
            running[q] = (subprocess.Popen([sys.executable, __file__, '--one', str(q)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           text=True), time.perf_counter())
        for q, (proc, t0) in list(running.items()):
            if proc.poll() is None: continue
            out, err = proc.communicate()
            del running[q]
            if proc.returncode:
                print(f'{q.name}: FAILED\n{err[-3000:]}', file=sys.stderr); table.append((q.name, None, None)); continue
            rec = json.loads(out.strip().splitlines()[-1])
            table.append((q.name, rec['seconds'], rec['peak_rss_mb']))
            print(f"{q.name}: {rec['seconds']:.0f} s, peak {rec['peak_rss_mb']} MB", flush=True)
        time.sleep(0.5)
    print('\n| lesson | full mode (min) | peak RSS (MB) |\n|---|---|---|')
    for n, s, m in sorted(table): print(f"| {n} | {'failed' if s is None else f'{s / 60:.1f}'} | {m or ''} |")
    return 1 if any(s is None for _, s, _ in table) else 0

if __name__ == '__main__': sys.exit(main())
