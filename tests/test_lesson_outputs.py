"""Lessons are committed with their outputs (`make lessons`), and the stored outputs belong to the current code.

A lesson executed by scripts/run_lessons.py carries a record (notebook metadata 'diffsr_kit') with the SHA-256 of its
code cells at execution time. A lesson whose code changed since then fails here until `make lessons` runs it again; a
lesson that was never executed is reported as an expected failure naming the command."""
import json, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'scripts'))
from run_lessons import LESSONS, META_KEY, code_hash

PATHS = sorted(LESSONS.glob('*.ipynb'))

@pytest.mark.parametrize('path', PATHS, ids=[p.stem for p in PATHS])
def test_stored_outputs_are_current_and_clean(path):
    nb = json.loads(path.read_text())
    rec = nb['metadata'].get(META_KEY)
    outs = [o for c in nb['cells'] if c['cell_type'] == 'code' for o in c.get('outputs', [])]
    if rec is None:
        assert not outs, f"{path.name} has outputs but no execution record: run `make lessons` (scripts/run_lessons.py)"
        pytest.xfail(f"{path.name} is not stored with its outputs yet: run `python scripts/run_lessons.py {path.name[:2]}`")
    assert rec['mode'] == 'full'
    assert rec['code_sha256'] == code_hash(nb), (f"{path.name} changed since its outputs were stored ({rec['executed']}): "
                                                f"run `python scripts/run_lessons.py {path.name[:2]}`")
    assert not [o for o in outs if o.get('output_type') == 'error'], f"{path.name} stored an error output"
    assert any(k in o.get('data', {}) for o in outs for k in ('image/png', 'image/jpeg')), f"{path.name} stored no picture"

def test_the_lessons_stay_small():
    total = sum(p.stat().st_size for p in PATHS)
    assert total < 15 * 2**20, f"the lessons take {total / 2**20:.1f} MiB with their outputs; keep them under 15 MiB"

def test_code_hash_sees_code_but_not_prose_or_outputs():
    nb = {'cells': [{'cell_type': 'code', 'source': ['x = 1\n'], 'outputs': []}, {'cell_type': 'markdown', 'source': ['# a']}]}
    h = code_hash(nb)
    nb['cells'][1]['source'] = ['# b']; nb['cells'][0]['outputs'] = [{'output_type': 'stream', 'text': ['1']}]
    assert code_hash(nb) == h
    nb['cells'][0]['source'] = ['x = 2\n']
    assert code_hash(nb) != h
