"""The package's shape (docs/architecture.md): imports flow one way, each module imports alone,
nothing but the command lines imports the trainer, files stay small.

The import graph is read from the source with `ast`, so it holds whatever a test run imports.
"""
import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "dino_jax")
MAX_LINES = 400

# The bottom of the house: what the trainer and the evaluations are built from.
BOTTOM = ("dino_jax.models", "dino_jax.data", "dino_jax.config", "dino_jax.losses",
          "dino_jax.schedules", "dino_jax.optim", "dino_jax.state", "dino_jax.sharding",
          "dino_jax.checkpoint", "dino_jax.paths")
ABOVE_BOTTOM = ("dino_jax.train", "dino_jax.evaluate", "dino_jax.convert", "dino_jax.cli")


def _modules() -> dict[str, str]:
  """dotted module name -> file, for every module of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        out[dotted.removesuffix(".__init__")] = path
  return out


MODULES = _modules()


def _imports(path: str) -> list[tuple[str, bool]]:
  """(dino_jax module imported, at module level?) for each import in a file."""
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  top_level = {id(n) for n in tree.body}
  for node in tree.body:  # `if __name__ == "__main__":` and try/except blocks are module level
    if isinstance(node, (ast.If, ast.Try)):
      top_level.update(id(n) for n in ast.walk(node))
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from dino_jax.evaluate import report` imports the submodule when there is one.
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
               for a in node.names]
    else:
      continue
    found += [(n, id(node) in top_level) for n in names if n.split(".")[0] == "dino_jax"]
  return found


def _graph() -> dict[str, set[str]]:
  return {m: {n for n, _ in _imports(p) if n != m} for m, p in MODULES.items()}


def _is_cli(module: str) -> bool:
  return 'if __name__ == "__main__"' in open(MODULES[module], encoding="utf-8").read()


def test_the_import_graph_has_no_cycle():
  graph = _graph()
  state = {}  # module -> 1 while on the path, 2 when done

  def visit(m, path):
    if state.get(m) == 1:
      cycle = path[path.index(m):] + [m]
      pytest.fail("import cycle: " + " -> ".join(cycle))
    if state.get(m) == 2:
      return
    state[m] = 1
    for n in sorted(graph.get(m, ())):
      visit(n, path + [m])
    state[m] = 2

  for m in sorted(graph):
    visit(m, [])


def test_no_import_inside_a_function_dodges_the_graph():
  late = [(m, n) for m, p in MODULES.items() for n, top in _imports(p) if not top]
  assert not late, f"dino_jax imports inside functions: {late}"


def test_only_command_lines_import_the_trainer_and_the_bottom_imports_nothing_above_it():
  graph = _graph()
  clis = {m for m in MODULES if _is_cli(m)}
  assert "dino_jax.train" in clis and "dino_jax.eval_knn" in clis
  for m, targets in graph.items():
    for n in targets:
      if n in clis:
        assert m in clis, f"{m} imports the command line {n}"
      if m.startswith(BOTTOM):
        assert not n.startswith(ABOVE_BOTTOM) and n not in clis, f"{m} (bottom) imports {n}"
  # The models know nothing of training or data.
  for m, targets in graph.items():
    if m.startswith("dino_jax.models"):
      assert all(n.startswith("dino_jax.models") for n in targets), (m, targets)


def test_each_module_imports_alone():
  """Every module in a process of its own: an import that works only after another (a cycle
  held open by import order) fails here."""
  script = (
      "import importlib, sys, traceback\n"
      "bad = []\n"
      "for m in sys.argv[1:]:\n"
      "  for k in [k for k in sys.modules if k == 'dino_jax' or k.startswith('dino_jax.')]:\n"
      "    del sys.modules[k]\n"
      "  try:\n"
      "    importlib.import_module(m)\n"
      "  except Exception:\n"
      "    bad.append(m + ': ' + traceback.format_exc(limit=-2))\n"
      "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script, *sorted(MODULES)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


@pytest.mark.parametrize("folder", ["dino_jax", "configs", "tests", "benchmarks", "studies"])
def test_files_stay_under_400_lines(folder):
  long = []
  for root, _, files in os.walk(os.path.join(REPO, folder)):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        n = sum(1 for _ in open(path, encoding="utf-8"))
        if n > MAX_LINES:
          long.append(f"{os.path.relpath(path, REPO)}: {n} lines")
  assert not long, long


def test_every_command_line_is_an_installed_command():
  """Each module with a `__main__` block is a `dino-jax-<name>` console script (setup.py), which
  runs `python -m dino_jax.<name>` with the same arguments."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  from dino_jax import commands  # pylint: disable=g-import-not-at-top
  clis = {m.removeprefix("dino_jax.") for m in MODULES if _is_cli(m)}
  assert set(commands.COMMANDS) == clis
  scripts = {ep.name for ep in importlib.metadata.entry_points(group="console_scripts")
             if ep.value == "dino_jax.commands:main"}
  assert scripts == {"dino-jax-" + c.replace("_", "-") for c in clis}, "pip install -e . again?"
  proc = subprocess.run([shutil.which("dino-jax-eval-knn"), "--helpshort"], capture_output=True,
                        text=True, timeout=120)
  assert "--workdir" in proc.stdout + proc.stderr
