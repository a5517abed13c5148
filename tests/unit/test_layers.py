"""The shape of the code, checked: packages import one another downwards and only through their surfaces.

Read from the source with ``ast`` (nothing is imported): every ``import`` and ``from ... import`` of
node/ and protocol/, including those under ``if TYPE_CHECKING:`` and inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

from node._lazy import surface

ROOT = Path(__file__).resolve().parents[2]
# Bottom to top: a package may import the ones before it, never the ones after it.
LAYERS = ["ops", "net", "training", "swarm", "averaging", "runtime", "faces"]
# Beside one another, not above: neither of these imports the other.
SIBLINGS = [{"swarm", "averaging"}]
ALLOWED_BELOW = {  # which lower packages each package may use (all lower ones, unless narrowed here)
    "training": {"ops"},  # the model and its data need nothing of the network
    "averaging": {"ops", "net"},  # the engine averages vectors: it knows nothing of models or placement
}


def modules() -> Dict[str, Path]:
    found = {}
    for top in ("node", "protocol"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(path: Path) -> Iterator[Tuple[str, List[str], int]]:
    """(module imported from, names imported, line) of every import statement in ``path``."""
    for statement in ast.walk(ast.parse(path.read_text())):
        if isinstance(statement, ast.ImportFrom) and statement.module and statement.level == 0:
            yield statement.module, [a.name for a in statement.names], statement.lineno
        elif isinstance(statement, ast.Import):
            for alias in statement.names:
                yield alias.name, [], statement.lineno


def package_of(module: str) -> str:
    """'averaging' for node.averaging.run; 'errors' for node.errors; '' for node itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "node" else ""


def test_protocol_imports_nothing_from_node() -> None:
    for name, path in modules().items():
        if name.startswith("protocol"):
            for target, _, line in imports(path):
                assert not target.startswith("node"), f"{path}:{line} imports {target}"


def test_only_the_hivemind_adapter_imports_hivemind() -> None:
    for name, path in modules().items():
        for target, _, line in imports(path):
            if target.split(".")[0] == "hivemind":
                assert name == "node.net.hivemind", f"{path}:{line} imports {target}"


def test_packages_import_each_other_downwards_and_only_through_their_surface() -> None:
    problems = []
    for name, path in modules().items():
        here = package_of(name)
        if not name.startswith("node.") or here not in LAYERS:
            continue
        for target, names, line in imports(path):
            there = package_of(target)
            if there not in LAYERS or there == here:
                continue
            where = f"{path.relative_to(ROOT)}:{line}"
            if target != f"node.{there}":
                problems.append(f"{where} imports {target}: other packages import only node.{there}")
            if LAYERS.index(there) > LAYERS.index(here):
                problems.append(f"{where}: {here} imports {there}, a package above it")
            elif any({here, there} <= group for group in SIBLINGS):
                problems.append(f"{where}: {here} imports its sibling {there}")
            elif here in ALLOWED_BELOW and there not in ALLOWED_BELOW[here]:
                problems.append(f"{where}: {here} may use only {sorted(ALLOWED_BELOW[here])}, not {there}")
            exported = surface(str(ROOT / "node" / there / "__init__.py"))
            problems += [f"{where}: node.{there} does not export {n}" for n in names if n not in exported]
    assert not problems, "\n".join(problems)


def test_every_surface_name_exists_where_its_package_says() -> None:
    for package in LAYERS:
        init = ROOT / "node" / package / "__init__.py"
        for name, module in surface(str(init)).items():
            source = modules()[module]
            defined = {
                target.id if isinstance(target, ast.Name) else getattr(target, "name", "")
                for statement in ast.parse(source.read_text()).body
                for target in (
                    statement.targets if isinstance(statement, ast.Assign)
                    else [statement.target] if isinstance(statement, ast.AnnAssign)
                    else [statement] if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                    else []
                )
            }  # fmt: skip
            imported = {n for _, names, _ in imports(source) for n in names}
            assert name in defined | imported, f"{init} exports {name} from {module}, which has no such name"


def test_each_package_opens_with_a_map_of_its_modules() -> None:
    for package in LAYERS:
        directory = ROOT / "node" / package
        doc = ast.get_docstring(ast.parse((directory / "__init__.py").read_text())) or ""
        mapped = {line.split()[1] for line in doc.splitlines() if line.startswith("- ")}
        present = {p.stem for p in directory.glob("*.py") if p.stem != "__init__"}
        assert mapped == present, f"node/{package}/__init__.py maps {sorted(mapped)}, the package has {sorted(present)}"


def test_there_is_no_import_cycle_between_modules() -> None:
    """Counting every import, those made for type checking and inside functions too."""
    known = modules()
    graph: Dict[str, Set[str]] = {name: set() for name in known}
    for name, path in known.items():
        if _lazy_surface(name, path):
            continue  # it imports nothing at run time: its users depend on the modules it names
        for target, names, _ in imports(path):
            if target in known and _lazy_surface(target, known[target]):
                home = surface(str(known[target]))
                graph[name] |= {home[n] for n in names if n in home}
                continue
            for candidate in [target] + [f"{target}.{n}" for n in names]:
                if candidate in known and candidate != name:
                    graph[name].add(candidate)
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def _lazy_surface(name: str, path: Path) -> bool:
    """node and its packages: their __init__ imports its surface only for the type checker (node/_lazy.py)."""
    return path.name == "__init__.py" and name.startswith("node") and name.count(".") <= 1


def _find_cycle(graph: Dict[str, Set[str]]) -> List[str] | None:
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None
