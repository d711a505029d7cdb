"""Every lesson opens the same way: a kernelspec (no kernel dialog) and one Colab cell that clones the repository (code,
configs, shipped checkpoints) and installs it with its extras. The cell is run here with a stand-in IPython that records
what it would do on Colab; outside Colab it does nothing."""
import json, os, sys, types
from pathlib import Path

import pytest

LESSONS = sorted((Path(__file__).resolve().parents[1] / 'nbs' / 'lessons').glob('*.ipynb'))

def first_code_cell(p: Path) -> str:
    return ''.join(next(c for c in json.loads(p.read_text())['cells'] if c['cell_type'] == 'code')['source'])

class FakeIPython:
    def __init__(self): self.calls = []
    def system(self, cmd): self.calls.append(('!', cmd))
    def run_line_magic(self, name, line): self.calls.append(('%' + name, line))

def run_cell(src: str, monkeypatch, on_colab: bool, cloned: bool = False):
    ip, moves = FakeIPython(), []
    if on_colab: monkeypatch.setitem(sys.modules, 'google.colab', types.ModuleType('google.colab'))
    else: monkeypatch.delitem(sys.modules, 'google.colab', raising=False)
    real_isdir = os.path.isdir
    monkeypatch.setattr(os.path, 'isdir', lambda p: cloned if p == '/content/diffsr_kit' else real_isdir(p))
    monkeypatch.setattr(os, 'chdir', moves.append)
    monkeypatch.setattr(sys, 'path', list(sys.path))
    exec(compile(src, 'colab-cell', 'exec'), {'get_ipython': lambda: ip})
    return ip.calls, moves, sys.path

def test_every_lesson_has_a_kernelspec_and_the_same_colab_cell():
    assert len(LESSONS) == 14
    for p in LESSONS: assert json.loads(p.read_text())['metadata']['kernelspec']['name'] == 'python3', p.name
    cells = {p.name: first_code_cell(p) for p in LESSONS}
    assert len(set(cells.values())) == 1, sorted(cells)

def test_the_colab_cell_clones_installs_with_extras_and_imports_without_restart(monkeypatch):
    src = first_code_cell(LESSONS[0])
    calls, moves, path = run_cell(src, monkeypatch, on_colab=True)
    assert calls[0] == ('!', 'git clone -q --depth 1 https://github.com/diffsr-kit/diffsr_kit /content/diffsr_kit')
    assert calls[1] == ('%pip', 'install -q -e "/content/diffsr_kit[demo,medical]"') and len(calls) == 2
    assert path[0] == '/content/diffsr_kit' and moves == ['/content/diffsr_kit']
    calls, _, _ = run_cell(src, monkeypatch, on_colab=True, cloned=True)  # a second lesson in the same runtime: no second clone
    assert [c[0] for c in calls] == ['%pip']

def test_the_colab_cell_does_nothing_elsewhere(monkeypatch):
    calls, moves, _ = run_cell(first_code_cell(LESSONS[0]), monkeypatch, on_colab=False)
    assert calls == [] and moves == []

def test_binder_installs_the_extras_the_lessons_use():
    req = (Path(__file__).resolve().parents[1] / 'binder' / 'requirements.txt').read_text().split()
    assert '-e' in req and req[req.index('-e') + 1] == '.[demo,medical]'
