"""Turning a call into what travels to the job: the pickled call and the user's modules.

Used by the client (``run_async``), the magics (a cell's namespace) and
``verify_resume``, so what cannot be sent is found and named the same way.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Callable, Iterable
from typing import Any

import cloudpickle

from ..errors import BadRequestError
from ..runtime.cellrun import run_cell
from ..shipping import Shipment, imported_by_source, ship


def installed_module(module_name: str) -> bool:
    """Whether a module comes from site-packages or the standard library.

    Anything else (a script's own module, a test file, a notebook's helper
    file) may not be importable in the job process, so it is pickled by value.
    """
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if module is None or path is None or module_name == "__main__":
        return True  # builtins and __main__ need nothing (cloudpickle handles __main__)
    path = os.path.realpath(path)
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    return any(path.startswith(os.path.realpath(root) + os.sep) for root in roots)


def pickle_call(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """cloudpickle (func, args, kwargs); on failure, name the object that would not go."""
    return ship_call(func, args, kwargs).payload


def ship_call(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    force: Iterable[str] = (),
) -> Shipment:
    """The pickled call and the user's own modules that travel with it (see shipping)."""
    module_name = getattr(func, "__module__", None)
    if module_name and not installed_module(module_name):
        cloudpickle.register_pickle_by_value(sys.modules[module_name])
    # A %%cumulus cell travels as its source: what it imports shows only there.
    imports = imported_by_source(args[0]) if func is run_cell and args else set()
    try:
        return ship(func, args, kwargs, imports=imports, force=force)
    except ValueError as e:  # too much source to ship
        raise BadRequestError(f"cannot send the job: {e}") from e
    except Exception as e:
        culprit = find_unpicklable(func, args, kwargs)
        raise BadRequestError(
            f"cannot send the job: {culprit} cannot be pickled ({e}); create it inside the "
            "function instead of passing or capturing it"
        ) from e


def find_unpicklable(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str:
    def fails(obj: Any) -> bool:
        try:
            cloudpickle.dumps(obj)
        except Exception:
            return True
        return False

    for i, arg in enumerate(args):
        if fails(arg):
            return f"argument {i} ({type(arg).__name__})"
    for key, value in kwargs.items():
        if fails(value):
            return f"keyword argument {key!r} ({type(value).__name__})"
    code = getattr(func, "__code__", None)
    if code is not None:
        glb = getattr(func, "__globals__", {})
        for name in code.co_names:
            if name in glb and fails(glb[name]):
                return f"global {name!r} ({type(glb[name]).__name__}) used by {func.__name__}"
        for name, cell in zip(code.co_freevars, func.__closure__ or (), strict=False):
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if fails(value):
                return f"variable {name!r} ({type(value).__name__}) captured by {func.__name__}"
    return f"the function {getattr(func, '__qualname__', func)!r}"
