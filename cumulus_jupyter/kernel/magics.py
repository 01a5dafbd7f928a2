"""``%%cumulus`` and ``%cumulus``: run notebook cells as jobs and control them.

Load with ``%load_ext cumulus_jupyter``.
"""

from __future__ import annotations

import ast
import sys
import time
import traceback
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from ..errors import CumulusError
from ..runtime.cellrun import run_cell
from ..spec import SpecError, parse_duration, parse_gpu_memory
from .client import CumulusClient, Job
from .display import CHECKPOINT_HEADER, JobTable, checkpoint_rows, in_kernel
from .logstream import LineAssembler, render
from .payload import first_unpicklable
from .widgets import CheckpointBrowser, JobWidget

_SUBCOMMANDS = ("jobs", "attach", "pause", "resume", "cancel", "logs", "checkpoints")
_UPDATE_EVERY = 0.1  # seconds between redraws of a progress line


def names_read(tree: ast.AST) -> set[str]:
    """Every name a cell reads (loads), in any scope of it."""
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


class LiveOutput:
    """Writes a job's output into the cell: finished lines as text, the line
    being redrawn (a progress bar) as one display that updates in place."""

    def __init__(self) -> None:
        self.lines = LineAssembler()
        self._in_kernel = in_kernel()
        self._drawing = False  # a line being redrawn is on screen
        self._handle: Any = None
        self._shown = ""
        self._last_update = 0.0

    def feed(self, text: str) -> None:
        done, partial = self.lines.feed(text)
        for line in done:
            if self._drawing:  # the redrawn line is finished: its last state stays
                self._draw(line, final=True)
            else:
                sys.stdout.write(line + "\n")
        if partial:
            self._draw(partial)

    def close(self) -> None:
        if self._drawing:
            self._draw(self.lines.partial, final=True)
        sys.stdout.flush()

    def _draw(self, text: str, final: bool = False) -> None:
        if not self._in_kernel:  # a terminal redraws the line itself
            sys.stdout.write("\r" + text + ("\n" if final else ""))
            sys.stdout.flush()
        else:
            now = time.monotonic()
            if not self._drawing:
                sys.stdout.flush()  # what came before stays before
                self._handle = display({"text/plain": text}, raw=True, display_id=True)
                self._shown, self._last_update = text, now
            elif text != self._shown and (final or now - self._last_update >= _UPDATE_EVERY):
                self._handle.update({"text/plain": text}, raw=True)
                self._shown, self._last_update = text, now
        self._drawing = not final


@magics_class
class CumulusMagics(Magics):
    """Run a cell as a cumulus job (``%%cumulus``) and control jobs (``%cumulus``)."""

    shell: Any

    def __init__(self, shell: Any):
        super().__init__(shell)
        self._client: CumulusClient | None = None

    @property
    def client(self) -> CumulusClient:
        if self._client is None:
            try:
                self._client = CumulusClient()
            except CumulusError as e:
                raise UsageError(str(e)) from None
        return self._client

    @magic_arguments()
    @argument(
        "--gpu-memory",
        type=float,
        default=1.0,
        help="Share of one GPU's memory, 0 < F <= 1 (default 1).",
    )
    @argument("--duration", default=None, help="Time limit: seconds, or like 30m, 2h.")
    @argument(
        "--nprocs",
        type=int,
        default=1,
        metavar="N",
        help="Run the cell in N processes (ranks), one GPU each, with torch.distributed "
        "initialised; the result is rank 0's (default 1).",
    )
    @argument(
        "--max-restarts",
        type=int,
        default=0,
        metavar="N",
        help="Start a run that dies without being asked (killed, out of memory) again from "
        "its newest checkpoint, up to N times (default 0).",
    )
    @argument(
        "--no-notify",
        action="store_true",
        help="No JupyterLab notification or webhook for this job's end.",
    )
    @argument("--name", default=None, help="The job's name (default: the cell's number).")
    @argument("--wait", action="store_true", help="Stream the output here and return the result.")
    @argument("--out", default=None, help="Bind the Job to this variable.")
    @argument(
        "--ship",
        action="append",
        default=[],
        metavar="MODULE",
        help="Send this module's source with the job even though it is installed here "
        "(repeatable; your own modules beside the notebook travel without it).",
    )
    @line_cell_magic
    def cumulus(self, line: str, cell: str | None = None) -> Any:
        """Run this cell as a job on the Jupyter server's host, or control jobs.

        Cell magic::

            %%cumulus [--gpu-memory F] [--duration D] [--nprocs N] [--max-restarts N]
                      [--no-notify] [--name NAME] [--wait] [--out VAR] [--ship MODULE]

        The cell runs in its own process with a share of a GPU, independent
        of this kernel. Names it reads from the notebook (data, tensors,
        functions and classes defined here) are shipped by value, and your
        own modules it uses or imports (``model.py`` beside the notebook, a
        local package) travel as source files; the value of its last
        expression is the job's result. Without --wait the cell
        returns at once and shows the job's widget; with --wait the job's
        output streams here and the result is the cell's value. With
        --nprocs N the cell runs in N processes (ranks), each on a GPU of its
        own, with torch.distributed initialised; the result is rank 0's.
        With --max-restarts N a run that dies without being asked starts
        again from its newest checkpoint, up to N times. --no-notify keeps
        the job out of JupyterLab's notifications and the server's webhooks.

        Line magic::

            %cumulus jobs                     table of jobs
            %cumulus attach ID                the job's widget, with its log so far
            %cumulus pause ID                 checkpoint and stop at the next batch
            %cumulus resume ID [CHECKPOINT]   continue, from the latest or a named checkpoint
            %cumulus cancel ID                stop for good
            %cumulus logs ID                  everything the job printed
            %cumulus checkpoints ID           browse, resume from or delete checkpoints
        """
        if cell is None:
            return self._line(line)
        return self._cell(line, cell)

    # -- %%cumulus ---------------------------------------------------------------

    def _cell(self, line: str, cell: str) -> Any:
        args = parse_argstring(self.cumulus, line)
        try:
            gpu_memory = parse_gpu_memory(args.gpu_memory)
            duration = parse_duration(args.duration)
        except SpecError as e:
            raise UsageError(str(e)) from None
        if args.out is not None and not args.out.isidentifier():
            raise UsageError(f"--out needs a variable name, got {args.out!r}")
        count = getattr(self.shell, "execution_count", 0)
        filename = f"<cumulus cell {count}>"
        source = self.shell.transform_cell(cell) if self.shell else cell
        try:
            tree = ast.parse(source, filename)
        except SyntaxError as e:
            # Line 1 of the cell is the %%cumulus line itself. A UsageError
            # shows just this, not the magic machinery's stack.
            e.lineno = (e.lineno or 0) + 1
            e.filename = "<cell>"
            detail = "".join(traceback.format_exception_only(e)).rstrip()
            raise UsageError(f"nothing was submitted:\n{detail}") from None
        namespace = self._capture(names_read(tree))
        name = args.name or f"cell {count}"
        try:
            job = self.client.run_async(
                run_cell,
                args=[source, filename, namespace],
                gpu_memory=gpu_memory,
                duration=duration,
                name=name,
                ship=args.ship,
                nprocs=args.nprocs,  # checked by the server, whose message says what to do
                max_restarts=args.max_restarts,
                notify=not args.no_notify,
            )
        except CumulusError as e:
            raise UsageError(str(e)) from None
        if args.out:
            self.shell.user_ns[args.out] = job
        if not args.wait:
            display(job)
            return None
        return self._follow(job)

    def _capture(self, names: set[str]) -> dict[str, Any]:
        user_ns = self.shell.user_ns
        hidden = getattr(self.shell, "user_ns_hidden", {})
        namespace = {
            name: user_ns[name]
            for name in sorted(names)
            if name in user_ns and name not in hidden and not name.startswith("__")
        }
        found = first_unpicklable(namespace.items())
        if found is not None:
            name, value, e = found
            raise UsageError(
                f"the cell reads {name!r}, a {type(value).__name__}, which cannot be "
                f"sent to the job ({e}); create it inside the cell instead"
            )
        return namespace

    def _follow(self, job: Job) -> Any:
        out = LiveOutput()
        offset = 0
        try:
            while True:
                part = self.client.get_logs(job.id, offset, wait=1.0)
                if part["data"]:
                    out.feed(part["data"])
                offset = part["next_offset"]
                if not part["running"] and offset >= part["size"]:
                    break
            out.close()
            return job.result()
        except KeyboardInterrupt:
            out.close()
            print(
                f"\nStopped watching; job {job.id} goes on. "
                f"`%cumulus attach {job.id}` shows it again."
            )
            return None

    # -- %cumulus ----------------------------------------------------------------

    def _line(self, line: str) -> Any:
        words = line.split()
        if not words or words[0] not in _SUBCOMMANDS:
            raise UsageError(
                f"%cumulus takes one of: {', '.join(_SUBCOMMANDS)} (see %cumulus?)"
                + (f"; got {words[0]!r}" if words else "")
            )
        command, rest = words[0], words[1:]
        if command == "jobs":
            display(JobTable([j.record for j in self.client.jobs()]))
            return None
        if not rest:
            raise UsageError(f"%cumulus {command} needs a job id (see %cumulus jobs)")
        job_id = rest[0]
        try:
            return self._job_command(command, job_id, rest[1:])
        except CumulusError as e:
            raise UsageError(str(e)) from None

    def _job_command(self, command: str, job_id: str, extra: list[str]) -> Any:
        client = self.client
        if command == "attach":
            job = client.get_job(job_id)
            return JobWidget(job) if in_kernel() else job
        if command == "pause":
            print(f"job {job_id}: {client.pause_job(job_id)['state']}")
        elif command == "resume":
            checkpoint = extra[0] if extra else None
            print(f"job {job_id}: {client.resume_job(job_id, checkpoint)['state']}")
        elif command == "cancel":
            print(f"job {job_id}: {client.cancel_job(job_id)['state']}")
        elif command == "logs":
            print(render(client.get_job(job_id).logs()), end="")
        elif command == "checkpoints":
            job = client.get_job(job_id)
            if in_kernel():
                return CheckpointBrowser(job)
            print(CHECKPOINT_HEADER)
            for row, _ in checkpoint_rows(job.get_checkpoints(), job.metrics()):
                print(row)
        return None


def load_ipython_extension(ip: Any) -> None:
    """``%load_ext cumulus_jupyter``: register the magics; make ``runtime`` importable."""
    from ..runtime.context import install_runtime_alias

    install_runtime_alias()
    ip.register_magics(CumulusMagics)
