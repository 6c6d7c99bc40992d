r"""Lists import cycles among a code base's own modules (standard library only).

  python tools/import_cycles.py                     # tvr_jax, data_prep, configs of this repo
  python tools/import_cycles.py --root DIR PKG ...  # other top-level packages under DIR

Every import statement counts, wherever it stands (module level, inside functions or classes,
under `if` / `try`), because a function-level import that closes a cycle still ties the two modules
together and breaks as soon as someone moves it to the top; only imports under
`if TYPE_CHECKING:` are left out (they never run). Resolved forms: `import a.b`, `from a import b`
(an edge to the submodule `a.b` when it is one, else to `a`), relative imports (`from . import x`,
`from ..m import y`) and `importlib.import_module("a.b")` / `__import__("a.b")` with a literal
name. An import names its target module only: the parent packages' `__init__` that Python runs on
the way are not edges, so a package re-exporting its submodules is not reported as a cycle.

Prints each elementary cycle as `a -> b -> a`, followed by the import line of each step, and exits
with status 1; prints "no import cycles" and exits 0 when there is none; exits 2 on unreadable
input (the message names the file).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import itertools
import os
import sys
from collections.abc import Iterator, Sequence

DEFAULT_PACKAGES = ("tvr_jax", "data_prep", "configs")
# Cycles listed per strongly connected component before the rest are summarised in one line.
MAX_CYCLES_PER_COMPONENT = 100


@dataclasses.dataclass(frozen=True)
class Edge:
  """One import: `source` imports `target` at `path:line` (`where`: "module" or "function")."""
  source: str
  target: str
  path: str
  line: int
  where: str


def discover_modules(root: str, packages: Sequence[str]) -> dict[str, str]:
  """Maps each dotted module name under `root/<package>/` to its file path.

  `pkg/__init__.py` is module `pkg`; `pkg/__main__.py` is `pkg.__main__`. Folders without
  `__init__.py` count as (namespace) packages too. `__pycache__` and hidden folders are skipped.

  Raises:
    FileNotFoundError: a package folder does not exist (the message names it).
  """
  modules = {}
  for package in packages:
    top = os.path.join(root, package)
    if not os.path.isdir(top):
      raise FileNotFoundError(f"package folder {top} does not exist")
    for dirpath, dirnames, filenames in os.walk(top):
      dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
      rel = os.path.relpath(dirpath, root)
      prefix = ".".join(rel.split(os.sep))
      for name in sorted(filenames):
        if not name.endswith(".py"):
          continue
        stem = name[:-3]
        module = prefix if stem == "__init__" else f"{prefix}.{stem}"
        modules[module] = os.path.join(dirpath, name)
  return modules


def _is_type_checking(test: ast.expr) -> bool:
  return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or
          (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _walk_imports(tree: ast.AST) -> Iterator[tuple[ast.AST, bool]]:
  """Yields (import node or import call, inside a function) for every import that can run."""
  stack = [(tree, False)]
  while stack:
    node, in_function = stack.pop()
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node, in_function
      continue
    if isinstance(node, ast.Call) and _literal_import_name(node) is not None:
      yield node, in_function
    if isinstance(node, ast.If) and _is_type_checking(node.test):
      children = node.orelse           # the `if TYPE_CHECKING:` body never runs
    else:
      children = list(ast.iter_child_nodes(node))
    inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    stack.extend((child, inner) for child in reversed(children))


def _literal_import_name(call: ast.Call) -> str | None:
  """"a.b" for `importlib.import_module("a.b")` / `import_module("a.b")` / `__import__("a.b")`."""
  func = call.func
  name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
  if name not in ("import_module", "__import__") or not call.args:
    return None
  arg = call.args[0]
  if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
    return arg.value
  return None


def _longest_known(name: str, modules: dict[str, str]) -> str | None:
  """The longest prefix of dotted `name` that is one of `modules` (None: not ours)."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    candidate = ".".join(parts[:n])
    if candidate in modules:
      return candidate
  return None


def _resolve_base(module: str, path: str, level: int, name: str | None) -> str | None:
  """The absolute module that `from <level dots><name> import ...` in `module` starts from."""
  package_parts = module.split(".")
  if os.path.basename(path) != "__init__.py":
    package_parts = package_parts[:-1]  # a plain module's package is its parent
  if level - 1 >= len(package_parts):
    return None                         # beyond the top-level package: Python raises ImportError
  base = package_parts[:len(package_parts) - (level - 1)]
  if name:
    base = base + name.split(".")
  return ".".join(base) if base else None


def module_imports(module: str, path: str, modules: dict[str, str]) -> list[Edge]:
  """The edges from `module` (file `path`) to other modules of `modules`.

  Raises:
    SyntaxError: the file does not parse (the message names it).
  """
  with open(path, encoding="utf-8") as f:
    source = f.read()
  try:
    tree = ast.parse(source, filename=path)
  except SyntaxError as e:
    raise SyntaxError(f"{path}:{e.lineno}: cannot parse ({e.msg})") from e
  edges = []

  def add(target: str | None, node: ast.AST, in_function: bool) -> None:
    if target is not None and target != module:
      edges.append(Edge(module, target, path, node.lineno, "function" if in_function else "module"))

  for node, in_function in _walk_imports(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        add(_longest_known(alias.name, modules), node, in_function)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = _resolve_base(module, path, node.level, node.module)
      else:
        base = node.module
      if base is None:
        continue
      for alias in node.names:
        submodule = f"{base}.{alias.name}"
        if alias.name != "*" and submodule in modules:
          add(submodule, node, in_function)
        else:
          add(_longest_known(base, modules), node, in_function)
    else:
      add(_longest_known(_literal_import_name(node), modules), node, in_function)
  return edges


def import_graph(root: str, packages: Sequence[str]) -> dict[str, list[Edge]]:
  """Maps each module to its import edges (first edge per target, in file order)."""
  modules = discover_modules(root, packages)
  graph = {}
  for module, path in modules.items():
    seen = {}
    for edge in module_imports(module, path, modules):
      seen.setdefault(edge.target, edge)
    graph[module] = list(seen.values())
  return graph


def _strongly_connected(graph: dict[str, list[Edge]]) -> list[list[str]]:
  """Tarjan's components with more than one module (iterative: no recursion limit)."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []
  counter = 0
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(e.target for e in graph[start])))]
    index[start] = low[start] = counter
    counter += 1
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = counter
          counter += 1
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(e.target for e in graph[child]))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[node])
      if low[node] == index[node]:
        component = []
        while True:
          member = stack.pop()
          on_stack.discard(member)
          component.append(member)
          if member == node:
            break
        if len(component) > 1:
          components.append(sorted(component))
  return sorted(components)


def _component_cycles(graph: dict[str, list[Edge]], component: list[str],
                      limit: int) -> tuple[list[list[str]], bool]:
  """Elementary cycles inside one component, each starting at its smallest module.

  Returns (cycles, truncated): at most `limit` cycles, shortest first.
  """
  members = set(component)
  succ = {m: sorted(e.target for e in graph[m] if e.target in members) for m in component}
  cycles = []
  truncated = False
  for start in component:
    # Only modules >= start, so each cycle is found once, from its smallest module.
    path, stack = [start], [iter(succ[start])]
    on_path = {start}
    while stack:
      nxt = next(stack[-1], None)
      if nxt is None:
        stack.pop()
        on_path.discard(path.pop())
        continue
      if nxt == start:
        if len(cycles) >= limit:
          truncated = True
          break
        cycles.append(path + [start])
      elif nxt > start and nxt not in on_path:
        path.append(nxt)
        on_path.add(nxt)
        stack.append(iter(succ[nxt]))
    if truncated:
      break
  cycles.sort(key=lambda c: (len(c), c))
  return cycles, truncated


def find_cycles(root: str, packages: Sequence[str] = DEFAULT_PACKAGES,
                limit: int = MAX_CYCLES_PER_COMPONENT) -> list[list[str]]:
  """Every elementary import cycle, each as [a, b, ..., a] (capped at `limit` per component)."""
  graph = import_graph(root, packages)
  cycles = []
  for component in _strongly_connected(graph):
    cycles += _component_cycles(graph, component, limit)[0]
  return cycles


def main(argv: Sequence[str] | None = None) -> int:
  """Prints the cycles; returns 1 when there is any, 0 when none, 2 on bad input."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("packages", nargs="*", default=list(DEFAULT_PACKAGES),
                      help=f"top-level package folders under --root (default: {DEFAULT_PACKAGES})")
  parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      help="folder holding the packages (default: this repository)")
  args = parser.parse_args(argv)
  try:
    graph = import_graph(args.root, args.packages)
  except (OSError, SyntaxError, UnicodeDecodeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  total = 0
  for component in _strongly_connected(graph):
    cycles, truncated = _component_cycles(graph, component, MAX_CYCLES_PER_COMPONENT)
    for cycle in cycles:
      total += 1
      print(" -> ".join(cycle))
      for a, b in itertools.pairwise(cycle):
        edge = next(e for e in graph[a] if e.target == b)
        where = " (function-level)" if edge.where == "function" else ""
        print(f"    {os.path.relpath(edge.path, args.root)}:{edge.line}: {a} imports {b}{where}")
    if truncated:
      print(f"... more cycles among {len(component)} modules: {', '.join(component)}")
  if total == 0:
    print("no import cycles")
    return 0
  print(f"{total} import cycle(s)")
  return 1


if __name__ == "__main__":
  sys.exit(main())
