"Every generated module imports cleanly in a fresh Python process (no notebook globals leak in)."
import pkgutil, subprocess, sys
import pytest
import diffsr_kit

MODULES = sorted(m.name for m in pkgutil.walk_packages(diffsr_kit.__path__, 'diffsr_kit.'))

def test_modules_found():
    assert 'diffsr_kit.core' in MODULES

@pytest.mark.parametrize('mod', MODULES)
def test_fresh_import(mod):
    r = subprocess.run([sys.executable, '-c', f'import {mod}'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f'{mod} failed to import in a fresh process:\n{r.stderr[-3000:]}'
