"""Turning a call into what travels to the job: the pickled call and the user's modules.

Used by the client (``run_async``), the magics (a cell's namespace) and
``verify_resume``, so what cannot be sent is found and named the same way.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import cloudpickle

from ..errors import BadRequestError
from ..runtime.cellrun import run_cell
from ..shipping import Shipment, imported_by_source, ship

K = TypeVar("K")


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


def first_unpicklable(named: Iterable[tuple[K, Any]]) -> tuple[K, Any, Exception] | None:
    """The first ``(key, value)`` whose value cloudpickle cannot pickle, with the error;
    ``None`` when every value pickles."""
    for key, value in named:
        try:
            cloudpickle.dumps(value)
        except Exception as e:
            return key, value, e
    return None


def find_unpicklable(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str:
    """Name the part of the call ``func(*args, **kwargs)`` that cannot be pickled: an
    argument, a global the function reads or a variable it captures, else the function."""
    found = first_unpicklable(_parts_of_call(func, args, kwargs))
    if found is None:
        return f"the function {getattr(func, '__qualname__', func)!r}"
    (what, where), value, _ = found
    return f"{what} ({type(value).__name__}){where}"


def _parts_of_call(
    func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Iterator[tuple[tuple[str, str], Any]]:
    """``((what, where), value)`` for each value the pickled call holds."""
    for i, arg in enumerate(args):
        yield (f"argument {i}", ""), arg
    for key, value in kwargs.items():
        yield (f"keyword argument {key!r}", ""), value
    code = getattr(func, "__code__", None)
    if code is None:
        return
    glb = getattr(func, "__globals__", {})
    for name in code.co_names:
        if name in glb:
            yield (f"global {name!r}", f" used by {func.__name__}"), glb[name]
    for name, cell in zip(code.co_freevars, func.__closure__ or (), strict=False):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell: the variable is not assigned yet
            continue
        yield (f"variable {name!r}", f" captured by {func.__name__}"), value
