"The package's import graph has no cycles, counting imports inside functions (DESIGN.md: dependencies point one way)."
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / 'diffsr_kit'

def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)

def imports_of(path: Path, known: set) -> set:
    "Every diffsr_kit module `path` imports, anywhere in the file (functions and methods included)."
    me = module_name(path)
    pkg = me if path.name == '__init__.py' else me.rpartition('.')[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import): names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split('.')[:len(pkg.split('.')) - node.level + 1]
                mod = '.'.join(base + ([node.module] if node.module else []))
            else: mod = node.module or ''
            names = [mod] + [f'{mod}.{a.name}' for a in node.names]  # `from . import dist` names a module
        else: continue
        for n in names:
            while n and n not in known: n = n.rpartition('.')[0]
            if n and n != 'diffsr_kit' and n != me: out.add(n)
    return out

def import_graph() -> dict:
    files = [p for p in PKG.rglob('*.py') if p.name != '_modidx.py']
    known = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, known) for p in files}

def cycles(graph: dict) -> list[list[str]]:
    "Strongly connected components with more than one module (Tarjan)."
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    def visit(v):
        index[v] = low[v] = counter[0]; counter[0] += 1; stack.append(v); on.add(v)
        for w in graph.get(v, ()):
            if w not in index: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    for v in sorted(graph):
        if v not in index: visit(v)
    return out

def test_finder_sees_a_cycle():
    "The cycle finder itself: a two-module loop and a three-module loop are found, a chain is not."
    assert cycles({'a': {'b'}, 'b': {'a'}, 'c': {'a'}}) == [['a', 'b']]
    assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == [['a', 'b', 'c']]
    assert cycles({'a': {'b'}, 'b': {'c'}, 'c': set()}) == []

def test_graph_sees_function_imports():
    "Imports inside functions count: the CLI reaches train only through them."
    g = import_graph()
    assert 'diffsr_kit.train' in g['diffsr_kit.cli'] and 'diffsr_kit.core' in g['diffsr_kit.data']

def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles in diffsr_kit: " + '; '.join(' <-> '.join(c) for c in found)
