"""Runs a notebook cell's source inside a job (what ``%%cumulus`` ships).

This module is installed, so cloudpickle ships :func:`run_cell` by reference;
only the cell's source and the values of the names it reads travel.
"""

from __future__ import annotations

import ast
import builtins
import linecache
from typing import Any


def run_cell(source: str, filename: str, namespace: dict[str, Any]) -> Any:
    """Execute ``source`` like a notebook cell and return its last expression's value."""
    # Tracebacks show the cell's own lines.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tree = ast.parse(source, filename)
    last = None
    final = tree.body[-1] if tree.body else None
    if isinstance(final, ast.Expr):
        tree.body.pop()
        last = ast.Expression(final.value)
    ns: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    ns.update(namespace)
    exec(compile(tree, filename, "exec"), ns)
    if last is None:
        return None
    return eval(compile(last, filename, "eval"), ns)
