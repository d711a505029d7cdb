"Config loading: merge order, and errors that name the offending key."
from dataclasses import dataclass, field
import pytest
from diffsr_kit.config import load_config, save_config, ConfigError

@dataclass
class Inner:
    lr: float = 1e-4
    mult: tuple[int, ...] = (1, 2)

@dataclass
class Outer:
    steps: int = 3
    name: str = 'run'
    inner: Inner = field(default_factory=Inner)

def test_merge_order(tmp_path):
    y = tmp_path / 'c.yaml'
    y.write_text('steps: 7\ninner:\n  lr: 0.5\n')
    c = load_config(Outer, y, ['inner.lr=0.25', 'inner.mult=[4,8,16]'])
    assert (c.steps, c.inner.lr, c.inner.mult, c.name) == (7, 0.25, (4, 8, 16), 'run')

@pytest.mark.parametrize('override,key', [('inner.lrr=1', 'inner.lrr'), ('stepz=1', 'stepz'),
                                           ('steps=ten', 'steps'), ('inner.lr=fast', 'inner.lr')])
def test_bad_override_names_key(override, key):
    with pytest.raises(ConfigError, match=key.replace('.', r'\.')):
        load_config(Outer, None, [override])

def test_bad_yaml_key_names_key(tmp_path):
    y = tmp_path / 'c.yaml'
    y.write_text('inner:\n  momentum: 0.9\n')
    with pytest.raises(ConfigError, match=r'inner\.momentum'):
        load_config(Outer, y)

def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(FileNotFoundError, match='not found'):
        load_config(Outer, tmp_path / 'nope.yaml')
    with pytest.raises(ConfigError, match='key=value'):
        load_config(Outer, None, ['steps'])

def test_saved_config_reloads_identically(tmp_path):
    c = load_config(Outer, None, ['steps=11', 'inner.mult=[3]'])
    save_config(c, tmp_path / 'resolved.yaml')
    assert load_config(Outer, tmp_path / 'resolved.yaml') == c
