"""The package's import graph has no cycle, counting the imports inside functions.

Every module of autolora_jax is parsed with `ast` (nothing is imported); an edge A -> B is any `import` or
`from ... import` in A, at module level or in a function, that names the module B of the package (relative
imports resolved; `from autolora_jax import x` is an edge to autolora_jax.x when x is a module). A package
stands for its __init__.py; importing autolora_jax.a.b also imports the package autolora_jax.a.
"""

import ast
import os
from typing import Dict, List, Optional, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'autolora_jax'

# Cycles that another change removes (pairs of modules, either order).
KNOWN = set()  # pairs of modules allowed to import each other: none


def modules(root: str = ROOT) -> Dict[str, str]:
  """{dotted module name: file path} of every module of the package (a package by its __init__.py)."""
  out = {}
  for folder, dirs, files in os.walk(os.path.join(root, PACKAGE)):
    dirs[:] = sorted(d for d in dirs if d != '__pycache__')
    parts = os.path.relpath(folder, root).split(os.sep)
    for name in sorted(files):
      if not name.endswith('.py'):
        continue
      dotted = '.'.join(parts if name == '__init__.py' else parts + [name[:-3]])
      out[dotted] = os.path.join(folder, name)
  return out


def _absolute(module: str, is_package: bool, level: int, target: Optional[str]) -> str:
  """The absolute name of `from <level dots><target> import ...` in `module`."""
  if not level:
    return target or ''
  base = module.split('.')
  base = base if is_package else base[:-1]
  base = base[:len(base) - (level - 1)]
  return '.'.join(base + ([target] if target else []))


def _with_parents(name: str, known: Dict[str, str]) -> Set[str]:
  """`name` and the packages above it that are modules of the package (importing a.b imports a)."""
  parts = name.split('.')
  return {'.'.join(parts[:i]) for i in range(1, len(parts) + 1) if '.'.join(parts[:i]) in known}


def imports(module: str, path: str, known: Dict[str, str]) -> Set[str]:
  """The package's modules that `module` imports anywhere in its file."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  is_package = path.endswith('__init__.py')
  out: Set[str] = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        out |= _with_parents(alias.name, known)
    elif isinstance(node, ast.ImportFrom):
      base = _absolute(module, is_package, node.level, node.module)
      out |= _with_parents(base, known)
      for alias in node.names:
        full = f'{base}.{alias.name}'
        if full in known:
          out.add(full)
  out.discard(module)
  # A package's own parents are imported before it anyway; an edge up to them is no cycle of its making.
  return {m for m in out if not module.startswith(m + '.')}


def graph(root: str = ROOT) -> Dict[str, Set[str]]:
  known = modules(root)
  return {m: imports(m, p, known) for m, p in known.items()}


def find_cycle(edges: Dict[str, Set[str]], skip=frozenset()) -> Optional[List[str]]:
  """One cycle as [a, b, ..., a], or None; edges in `skip` ((a, b) pairs) are left out."""
  state: Dict[str, int] = {}  # 1: on the current path, 2: done
  path: List[str] = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(edges.get(node, ())):
      if (node, nxt) in skip:
        continue
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(edges):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_graph_sees_imports_in_functions_and_relative_ones(tmp_path):
  pkg = tmp_path / PACKAGE
  (pkg / 'sub').mkdir(parents=True)
  (pkg / '__init__.py').write_text('')
  (pkg / 'a.py').write_text('def f():\n  from autolora_jax import b\n')
  (pkg / 'b.py').write_text('from . import sub\nimport numpy\n')
  (pkg / 'sub' / '__init__.py').write_text('')
  (pkg / 'sub' / 'c.py').write_text('from ..a import f\nfrom .. import b as bb\n')
  (pkg / 'sub' / 'd.py').write_text('import autolora_jax.sub.c\n')
  edges = graph(str(tmp_path))
  assert edges[f'{PACKAGE}.a'] == {f'{PACKAGE}.b'}
  assert edges[f'{PACKAGE}.b'] == {f'{PACKAGE}.sub'}
  assert edges[f'{PACKAGE}.sub.c'] == {f'{PACKAGE}.a', f'{PACKAGE}.b'}
  assert edges[f'{PACKAGE}.sub.d'] == {f'{PACKAGE}.sub.c'}
  assert find_cycle(edges) is None
  (pkg / 'sub' / '__init__.py').write_text('def g():\n  from .c import f\n')
  assert find_cycle(graph(str(tmp_path))) == [f'{PACKAGE}.a', f'{PACKAGE}.b', f'{PACKAGE}.sub',
                                              f'{PACKAGE}.sub.c', f'{PACKAGE}.a']


def test_no_import_cycle():
  edges = graph()
  assert f'{PACKAGE}.compare' in edges and f'{PACKAGE}.cli' in edges  # the walk found the package
  skip = {(a, b) for pair in KNOWN for a in pair for b in pair if a != b}
  cycle = find_cycle(edges, skip)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)
