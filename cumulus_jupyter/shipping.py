"""What travels with a job: the pickled call and the user's own modules it needs.

A job runs in its own directory, on the server's Python environment, maybe
on another node. What the submitter's process imported from site-packages or
the standard library is there too; the user's own code (``model.py`` beside
the notebook, a local package, a script's helpers) is not. So a submission
carries, beside the cloudpickled ``(func, args, kwargs)``:

- the **source files of the local modules** the call references (found while
  pickling it: every module a pickled object, function or class belongs to,
  and every module its code imports), and, recursively, the local modules
  those files import. A local package travels whole. The job puts them first
  on ``sys.path`` before it unpickles anything, so it imports what the
  kernel imported;
- **where every referenced module came from** on the submitter's side, so a
  module the job still cannot import is named with its origin and what to do.

"Local" means: not in the standard library or site-packages, not part of an
installed distribution (editable installs included), not cumulus itself.
``ship=`` names modules to send even so (an editable install the server's
environment lacks).

This module runs in the kernel (or script) and must not import torch.
"""

from __future__ import annotations

import ast
import base64
import dis
import functools
import importlib.metadata
import importlib.util
import io
import os
import re
import sys
import sysconfig
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cloudpickle

from .fileio import atomic_write_bytes, atomic_write_json, make_private_dir, read_json
from .jobdir import JobDir

#: More than this much source is not shipped: install it on the server instead.
MAX_SHIPPED_BYTES = 32 * 1024 * 1024
#: Never shipped: the job process has them by definition.
_OWN = {"cumulus_jupyter", "cumulus", "runtime", "__main__", "builtins"}


@dataclass
class Shipment:
    """A pickled call and the files and origins that travel with it."""

    payload: bytes
    #: relative path (``model.py``, ``pkg/sub.py``) -> file content
    files: dict[str, bytes] = field(default_factory=dict)
    #: top-level module name -> where the submitter imported it from
    origins: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        """The submit request's ``modules`` field (files base64-encoded)."""
        return {
            "files": {k: base64.b64encode(v).decode("ascii") for k, v in self.files.items()},
            "origins": dict(self.origins),
        }


class _RecordingPickler(cloudpickle.Pickler):
    """cloudpickle's pickler, noting the module of everything it pickles."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=cloudpickle.DEFAULT_PROTOCOL)
        self.modules: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.ModuleType):
            self.modules.add(obj.__name__)
        elif isinstance(obj, types.CodeType):
            self.modules.update(imported_by_code(obj))
        elif isinstance(obj, type | types.FunctionType | types.BuiltinFunctionType):
            module = getattr(obj, "__module__", None)
            if isinstance(module, str):
                self.modules.add(module)
        else:
            self.modules.add(type(obj).__module__)
        return super().reducer_override(obj)


def imported_by_code(code: types.CodeType) -> set[str]:
    """Absolute module names that ``import`` statements in ``code`` (and nested code) name."""
    names: set[str] = set()
    for ins in dis.get_instructions(code):
        if ins.opname == "IMPORT_NAME" and isinstance(ins.argval, str):
            names.add(ins.argval)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= imported_by_code(const)
    return names


def imported_by_source(source: str) -> set[str]:
    """Absolute module names that ``import`` statements in Python ``source`` name."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@functools.cache
def _environment_roots() -> tuple[str, ...]:
    """The standard library and site-packages: what the server's environment has too."""
    paths = sysconfig.get_paths()
    return tuple(
        sorted({os.path.realpath(paths[k]) for k in ("purelib", "platlib", "stdlib", "platstdlib")})
    )


@functools.cache
def _editable_dirs() -> frozenset[str]:
    """Directories that .pth files in site-packages put on sys.path (editable installs).

    A top-level module directly inside one of them is installed; one deeper
    (``tests/helper.py`` under an editable project's root) is not importable
    by that name, so it is the user's own.
    """
    paths = sysconfig.get_paths()
    dirs = set()
    for site in {paths["purelib"], paths["platlib"]}:
        for pth in Path(site).glob("*.pth"):
            try:
                lines = pth.read_text().splitlines()
            except OSError:
                continue
            for line in lines:
                line = line.strip()
                if line and not line.startswith(("#", "import")) and os.path.isdir(line):
                    dirs.add(os.path.realpath(line))
    return frozenset(dirs)


@functools.cache
def _distribution_packages() -> frozenset[str]:
    return frozenset(importlib.metadata.packages_distributions())


def origin_of(top: str) -> Path | None:
    """Where top-level module ``top`` comes from: its file, or its package's directory."""
    module = sys.modules.get(top)
    path: str | None = None
    if module is not None and module.__name__.split(".")[0] != top:
        return None  # an alias of another module (as ``runtime`` is of ours)
    if module is not None:
        if getattr(module, "__path__", None):  # a package
            locations = list(module.__path__)
            path = locations[0] if len(locations) == 1 else None
        else:
            path = getattr(module, "__file__", None)
    else:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        if spec.submodule_search_locations:
            locations = list(spec.submodule_search_locations)
            path = locations[0] if len(locations) == 1 else None
        elif spec.has_location:
            path = spec.origin
    return Path(path) if path else None


def is_local(top: str) -> bool:
    """Whether ``top`` is the user's own code, which the job cannot import by itself."""
    if top in _OWN or top in sys.builtin_module_names or top in _distribution_packages():
        return False
    origin = origin_of(top)
    if origin is None:
        return False
    real = os.path.realpath(origin)
    if any(real.startswith(root + os.sep) for root in _environment_roots()):
        return False
    return os.path.dirname(real) not in _editable_dirs()


def _in_stdlib(path: Path) -> bool:
    # In a venv, platstdlib is the venv's lib/pythonX.Y, which holds site-packages.
    paths = sysconfig.get_paths()
    real = os.path.realpath(path)

    def under(*keys: str) -> bool:
        return any(real.startswith(os.path.realpath(paths[k]) + os.sep) for k in keys)

    return under("stdlib", "platstdlib") and not under("purelib", "platlib")


def _files_of(top: str, origin: Path) -> dict[str, Path]:
    """The source files that make up module or package ``top``, by relative path."""
    if origin.is_dir():
        out = {}
        for path in sorted(origin.rglob("*.py")):
            rel = path.relative_to(origin)
            if any(part.startswith((".", "__pycache__")) for part in rel.parts):
                continue
            out[str(Path(top) / rel)] = path
        return out
    if origin.suffix == ".py":
        return {f"{top}.py": origin}
    return {}  # a compiled extension or a .pyc-only module: not shippable as source


def ship(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    imports: Iterable[str] = (),
    force: Iterable[str] = (),
) -> Shipment:
    """Pickle the call and collect the local modules that must travel with it.

    ``imports`` names modules the call will import that its pickle does not
    show (``%%cumulus`` passes what the cell's source imports); they travel
    when local. ``force`` names modules to ship even when installed (an
    editable install the server's environment lacks). Raises
    :class:`ValueError` naming the file when the modules are too large.
    """
    buffer = io.BytesIO()
    pickler = _RecordingPickler(buffer)
    pickler.dump((func, args, kwargs))
    forced = {name.split(".")[0] for name in force} - _OWN
    referenced = pickler.modules | set(imports) | forced

    shipment = Shipment(buffer.getvalue())
    todo = sorted({name.split(".")[0] for name in referenced if name})
    seen: set[str] = set()
    size = 0
    while todo:
        top = todo.pop()
        if top in seen:
            continue
        seen.add(top)
        origin = origin_of(top)
        stdlib = origin is not None and _in_stdlib(origin)
        if origin is not None and top not in _OWN and not stdlib:
            shipment.origins[top] = str(origin)
        if origin is None or not (top in forced or is_local(top)):
            continue
        for rel, path in _files_of(top, origin).items():
            try:
                data = path.read_bytes()
            except OSError:  # moved or deleted since it was imported: the job will say so
                continue
            size += len(data)
            if size > MAX_SHIPPED_BYTES:
                raise ValueError(
                    f"the modules to ship with the job pass {MAX_SHIPPED_BYTES >> 20} MiB "
                    f"(at {path}): install them into the server's environment instead"
                )
            shipment.files[rel] = data
            imports = imported_by_source(data.decode("utf-8", "replace"))
            todo.extend(sorted({n.split(".")[0] for n in imports} - seen))
    return shipment


def missing_module_message(name: str, origins: dict[str, str]) -> str:
    """What to tell a user whose job could not import ``name``."""
    top = name.split(".")[0]
    where = origins.get(top)
    if where:
        return (
            f"the job could not import {name!r}, which the submitter imported from {where}: "
            "install it into the job server's Python environment, or send it with the job "
            f"(run_async(..., ship=[{top!r}]) or %%cumulus --ship {top})"
        )
    return (
        f"the job could not import {name!r}, which the submitting process had not imported: "
        "install it into the job server's Python environment, or, if it is your own code, "
        f"import it before submitting or send it with the job (ship=[{top!r}])"
    )


# -- the job directory's side (server, worker, verify_resume) -------------------

_PATH_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,200}$")


def parse_modules(value: Any, limit: int) -> tuple[dict[str, bytes], dict[str, str]]:
    """Check a submit request's ``modules`` field; return (files, origins).

    Raises :class:`ValueError` with what is wrong. File paths are relative,
    made of plain names, and end in ``.py``; nothing may point outside the
    job's ``modules/`` directory. ``limit`` bounds the decoded size.
    """
    if value is None:
        return {}, {}
    if not isinstance(value, dict) or set(value) - {"files", "origins"}:
        raise ValueError('modules must be an object {"files": {...}, "origins": {...}}')
    files_in, origins_in = value.get("files") or {}, value.get("origins") or {}
    if not isinstance(files_in, dict) or not isinstance(origins_in, dict):
        raise ValueError("modules.files and modules.origins must be objects")
    files: dict[str, bytes] = {}
    total = 0
    for rel, encoded in files_in.items():
        parts = rel.split("/") if isinstance(rel, str) else []
        if (
            not parts
            or not rel.endswith(".py")
            or not all(_PATH_PART.match(p) and p not in (".", "..") for p in parts)
        ):
            raise ValueError(f"modules.files: {rel!r} is not a relative path of a .py file")
        if not isinstance(encoded, str):
            raise ValueError(f"modules.files[{rel!r}] must be base64 text")
        try:
            data = base64.b64decode(encoded, validate=True)
        except ValueError:
            raise ValueError(f"modules.files[{rel!r}] is not valid base64") from None
        total += len(data)
        if total > limit:
            raise OverflowError(f"the shipped modules pass the limit of {limit} bytes")
        files[rel] = data
    origins = {}
    for name, where in origins_in.items():
        if not (isinstance(name, str) and isinstance(where, str) and len(name) + len(where) < 4096):
            raise ValueError("modules.origins must map module names to paths")
        origins[name] = where
    return files, origins


def write_modules(job_dir: Path, files: dict[str, bytes], origins: dict[str, str]) -> None:
    """Store what travels with a job in its directory (files private, like the rest)."""
    if files:
        root = JobDir(job_dir).modules
        for rel, data in files.items():
            target = root / rel
            make_private_dir(target.parent)
            atomic_write_bytes(target, data)
    if files or origins:
        index = {"files": sorted(files), "origins": origins}
        atomic_write_json(JobDir(job_dir).modules_index, index)


def install_shipped_modules(job_dir: Path) -> dict[str, str]:
    """In the job: put its shipped modules first on the import path; return the origins.

    ``PYTHONPATH`` gets them too, so processes the job starts (DataLoader
    workers that spawn, subprocesses) import the same code.
    """
    modules = JobDir(job_dir).modules
    if modules.is_dir():
        sys.path.insert(0, str(modules))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(modules), os.environ.get("PYTHONPATH", "")) if p
        )
    try:
        data = read_json(JobDir(job_dir).modules_index, default={}) or {}
    except ValueError:
        return {}
    origins = data.get("origins") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in origins.items()} if isinstance(origins, dict) else {}
