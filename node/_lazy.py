"""Package surfaces that import their modules on first use.

Each package of `node/` names its public surface in its ``__init__``, under ``if TYPE_CHECKING:``, as
``from node.<package>.<module> import Name as Name`` lines, followed by

    else:
        __getattr__, __all__ = lazy_exports(__name__, __file__)

The type checker reads the imports as they are (and refuses a name the surface does not have); at run
time ``lazy_exports`` reads the same lines and imports a module when one of its names is first used.
Importing a package therefore stays cheap: `node --help` and a config error answer before torch or
hivemind are imported, and the surface is written down once.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple


def surface(init_file: str) -> Dict[str, str]:
    """{name: module} of the names a package's ``__init__`` imports under ``if TYPE_CHECKING:``."""
    tree = ast.parse(Path(init_file).read_text())
    found: Dict[str, str] = {}
    for block in tree.body:
        if isinstance(block, ast.If) and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING":
            for statement in block.body:
                if isinstance(statement, ast.ImportFrom) and statement.module:
                    for alias in statement.names:
                        found[alias.asname or alias.name] = statement.module
    return found


def lazy_exports(package: str, init_file: str) -> Tuple[Callable[[str], Any], List[str]]:
    """``(__getattr__, __all__)`` for ``package``, whose ``__init__`` is ``init_file``."""
    home = surface(init_file)

    def __getattr__(name: str) -> Any:  # noqa: N807 (the module-level hook of PEP 562)
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(home[name]), name)

    return __getattr__, sorted(home)
