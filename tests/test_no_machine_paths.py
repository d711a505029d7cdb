"""No tracked file names the machine it was made on: no absolute path of this checkout, the home folder or the temp
folder in any tracked text file (code, notebooks and their outputs, results, meta.json, pages); and the demo's
'not available' notes show paths relative to the checkout."""
import os, subprocess, tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked_text_files():
    try: out = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError): pytest.skip('not a git checkout: no list of tracked files')
    for name in filter(None, out.decode().split('\0')):
        p = ROOT / name
        if not p.is_file(): continue
        data = p.read_bytes()
        if b'\0' in data[:8192]: continue  # binary (PNG, safetensors)
        yield name, data.decode('utf-8', errors='replace')


def machine_paths():
    "Absolute folders of this machine that must not appear: the checkout, its parent, home, temp."
    found = {str(ROOT), str(ROOT.parent), os.path.expanduser('~'), tempfile.gettempdir(), '/tmp', '/root', '/home/'}
    return sorted(p.rstrip('/') + '/' for p in found if len(p.rstrip('/')) > 1)


def test_no_tracked_file_names_this_machine():
    me = Path(__file__).resolve().relative_to(ROOT).as_posix()  # this file lists the folders it looks for
    bad = [(name, p) for name, text in tracked_text_files() if name != me for p in machine_paths() if p in text]
    assert not bad, bad[:10]


def test_demo_notes_for_missing_models_are_relative(tmp_path, monkeypatch):
    from diffsr_kit.demo import checkpoint_model, models_available, register_model, assets_dir
    reg = {}
    register_model('gone-x4', lambda: checkpoint_model(assets_dir() / 'no_such_model_x4'), reg)
    _, missing = models_available(reg)
    assert 'assets/no_such_model_x4' in missing['gone-x4'] and str(ROOT) not in missing['gone-x4'], missing
