"""moejax/studies/: no import circle (imports inside functions count), files of about 400 lines at most, and the
entry points stay thin."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = os.path.join(ROOT, 'moejax', 'studies')


def _imports(path):
  deps = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module == 'moejax.studies':
      deps |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('moejax.studies.'):
      deps.add(node.module.split('.')[2])
    elif isinstance(node, ast.Import):
      deps |= {a.name.split('.')[2] for a in node.names if a.name.startswith('moejax.studies.')}
  return deps


def test_no_import_circle_and_small_files():
  graph = {f[:-3]: _imports(os.path.join(STUDIES, f)) for f in os.listdir(STUDIES) if f.endswith('.py')}
  state = {}

  def visit(m, path):
    assert state.get(m) != 'open', f'import circle: {" -> ".join(path)}'
    if state.get(m) == 'done':
      return
    state[m] = 'open'
    for d in graph.get(m, ()):
      visit(d, path + [d])
    state[m] = 'done'

  for m in graph:
    visit(m, [m])
  for f in graph:
    lines = sum(1 for _ in open(os.path.join(STUDIES, f + '.py')))
    assert lines <= 420, (f, lines)


def test_entry_points_are_thin():
  for name in ('claims', 'report', 'results', 'sweep', 'design'):
    lines = sum(1 for _ in open(os.path.join(ROOT, 'moejax', name + '.py')))
    assert lines <= 130, (name, lines)
