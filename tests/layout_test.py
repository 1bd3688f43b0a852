"""The package layout by concern (docs/design.md): no import circle, small files, one of each chore."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'moejax'
MAX_TOP_LEVEL_MODULES = 21
MAX_LINES = 450  # "about 400 lines per file"
SUBPACKAGES = ('config', 'model', 'train', 'inference', 'interop', 'studies', 'parallel', 'data', 'kernels', 'bench')


def _modules() -> dict[str, pathlib.Path]:
  mods = {}
  for path in PACKAGE.rglob('*.py'):
    name = '.'.join(path.relative_to(ROOT).with_suffix('').parts)
    mods[name[:-len('.__init__')] if name.endswith('.__init__') else name] = path
  return mods


def import_graph() -> dict[str, set[str]]:
  """module -> the moejax modules it imports, counting imports inside functions."""
  mods = _modules()
  graph = {}
  for name, path in mods.items():
    package = name if path.name == '__init__.py' else name.rsplit('.', 1)[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base = package.split('.')[:len(package.split('.')) - node.level + 1]
          module = '.'.join(base + ([node.module] if node.module else []))
        else:
          module = node.module or ''
        for alias in node.names:
          deps.add(f'{module}.{alias.name}' if f'{module}.{alias.name}' in mods else module)
    graph[name] = {d for d in deps if d in mods and d != name and not name.startswith(d + '.')}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import circle as a list of modules, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == 'open':
        return stack[stack.index(dep):] + [dep]
      if dep not in state and (found := visit(dep)):
        return found
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state and (found := visit(node)):
      return found
  return None


def test_find_cycle_finds_a_planted_circle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_layout_has_no_import_circle():
  assert find_cycle(import_graph()) is None


def test_top_level_holds_entry_points_and_a_few_shared_modules():
  top = sorted(p.stem for p in PACKAGE.glob('*.py') if p.stem != '__init__')
  assert len(top) <= MAX_TOP_LEVEL_MODULES, top
  for package in SUBPACKAGES:
    assert (PACKAGE / package / '__init__.py').exists(), package


@pytest.mark.parametrize('path', sorted(PACKAGE.rglob('*.py')), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_stay_small(path):
  assert len(path.read_text().splitlines()) <= MAX_LINES


def test_only_the_experiment_loader_edits_sys_path():
  editors = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob('*.py')
                   if re.search(r'sys\.path\.(insert|append)', p.read_text()))
  assert editors == ['moejax/config/loading.py']


def test_one_atomic_write_helper():
  # Files are renamed into place only by moejax/files.py; the other os.replace calls move whole
  # directories (checkpoint steps set aside, a finished export directory).
  allowed = {'moejax/files.py', 'moejax/train/checkpoint.py', 'moejax/interop/staging.py'}
  renamers = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob('*.py') if 'os.replace(' in p.read_text()}
  assert renamers <= allowed, renamers - allowed
  writers = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob('*.py') if 'tempfile.mkstemp' in p.read_text()}
  assert writers <= {'moejax/files.py'}, writers


def test_cli_modules_are_not_imported_as_libraries():
  graph = import_graph()
  entry_points = {name for name, path in _modules().items()
                  if "if __name__ == '__main__'" in path.read_text() and name.count('.') == 1}
  importers = {(name, dep) for name, deps in graph.items() for dep in deps & entry_points
               if not name.startswith('moejax.bench')}
  assert not importers, importers


ENTRY_POINTS = ('main', 'generate', 'export', 'import_hf', 'prepare', 'sweep', 'results', 'report', 'claims', 'design',
                'reproduce', 'accounting', 'routes', 'frontier')


@pytest.mark.parametrize('name', ENTRY_POINTS)
def test_entry_points_are_thin(name):
  # Flags, then one library call (T5X's train/eval/infer): the work lives in the packages.
  path = PACKAGE / f'{name}.py'
  assert "if __name__ == '__main__'" in path.read_text()
  assert len(path.read_text().splitlines()) <= 200, name
