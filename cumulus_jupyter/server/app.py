"""``CumulusApp``: the Jupyter server extension, also runnable headless (``jupyter cumulus``)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_data_dir
from jupyter_server.extension.application import ExtensionApp
from traitlets import (
    Bool,
    CaselessStrEnum,
    Float,
    Integer,
    List,
    TraitError,
    Type,
    Unicode,
    default,
    validate,
)

from .._version import __version__
from ..connection import TOKEN_ENV, URL_ENV
from ..jobdir import shared_environment
from ..states import JobState
from .backends import Backend, LocalBackend
from .backends.raycluster import RayBackend
from .backends.warm import WarmTemplate, default_preload
from .gpu import detect_gpus
from .handlers import handlers
from .manager import JobManager
from .webhooks import DEFAULT_STATES, FORMATS, Webhooks, redact


class CumulusApp(ExtensionApp):
    """Runs notebook functions as pausable, resumable, checkpointed jobs on this host."""

    name = "cumulus"
    description = "A GPU job server for Jupyter: run, pause, resume and checkpoint training jobs."
    version = __version__
    # `jupyter cumulus` is a job server only: no notebook UI and no other extensions.
    load_other_extensions = False
    # Configurable from the command line and config files: --RayBackend.address=...
    classes = [*ExtensionApp.classes, RayBackend]

    job_root = Unicode(
        config=True,
        help="Directory holding one sub-directory per job (spec, log, checkpoints, result). "
        "It is the source of truth: a restarted server rebuilds its view from it.",
    )

    @default("job_root")
    def _default_job_root(self) -> str:
        return str(Path(jupyter_data_dir()) / "cumulus" / "jobs")

    backend = CaselessStrEnum(
        ["local", "ray"],
        default_value="local",
        config=True,
        help="Where runs execute: 'local' (processes of this server's host) or 'ray' (Ray "
        "jobs on the cluster at RayBackend.address; the job root must be on storage every "
        "node mounts at the same path).",
    )
    backend_class = Type(
        default_value=LocalBackend,
        klass=Backend,
        config=True,
        help="The execution backend that starts, signals and watches job processes, when "
        "CumulusApp.backend is 'local' (another class may replace LocalBackend here).",
    )
    pause_timeout = Float(
        60.0,
        config=True,
        help="Seconds a job has to stop after a pause (or its duration limit) "
        "before it is sent SIGTERM.",
    )
    kill_grace = Float(
        10.0,
        config=True,
        help="Seconds between SIGTERM and SIGKILL when a job does not stop "
        "(after a pause timeout or a cancel).",
    )
    max_payload_bytes = Integer(
        256 << 20,
        config=True,
        help="Largest pickled function + arguments a client may submit, in bytes (else 413).",
    )
    job_nice = Integer(
        19,
        config=True,
        help="Niceness job processes give themselves and their session's autogroup "
        "(0-19), and the warm template too: the server that pauses and reports on them "
        "stays responsive when many jobs compete for the CPU. Jobs are the host's "
        "background work: they yield the CPU to what runs at normal priority (the server, "
        "kernels) only while every core is busy, which a job on a GPU hardly notices.",
    )
    gpus = List(
        Unicode(),
        default_value=None,
        allow_none=True,
        config=True,
        help="GPU devices jobs may use, as CUDA indices or GPU UUIDs (e.g. ['0', '1']; "
        "on the command line --CumulusApp.gpus=0,1). Default: CUDA_VISIBLE_DEVICES, else "
        "what nvidia-smi lists. An empty list ([]) runs every job on the CPU, as one "
        "shared device.",
    )

    @validate("gpus")
    def _validate_gpus(self, proposal: Any) -> list[str] | None:
        value = proposal["value"]
        if value is None:
            return None
        # The command line gives one string: accept "0,1" and '["0", "1"]' too.
        devices: list[str] = []
        for item in value:
            text = str(item).strip()
            if text.startswith("["):
                try:
                    parts = [str(x) for x in json.loads(text)]
                except ValueError:
                    raise TraitError(f"CumulusApp.gpus: {text!r} is not a JSON list") from None
            else:
                parts = text.split(",")
            devices += [p.strip() for p in parts if p.strip()]
        for device in devices:
            if not device.replace("-", "").isalnum():
                raise TraitError(
                    f"CumulusApp.gpus: {device!r} is not a CUDA device index or GPU UUID"
                )
        return devices

    freeze_gc = Bool(
        True,
        config=True,
        help="Once the server has started, move what it holds by then (modules, classes, "
        "configuration: some 200,000 objects with JupyterLab's extensions) out of the "
        "cyclic garbage collector's sight (gc.freeze()). A full collection would otherwise "
        "scan them all, stalling every request for 0.1-0.3 s on a small host. They are "
        "still freed by reference counting; only reference cycles among them stay.",
    )
    warm_workers = Bool(
        True,
        config=True,
        help="Start runs by forking a warm template process of the server's Python that has "
        "imported CumulusApp.preload already, instead of a cold interpreter (which imports "
        "torch anew on every start and resume). A run whose interpreter or environment "
        "differs from the template's starts cold.",
    )
    preload = List(
        Unicode(),
        default_value=None,
        allow_none=True,
        config=True,
        help="Modules the warm template imports (default: torch, numpy and cloudpickle, "
        "where installed).",
    )

    notify_url = List(
        Unicode(),
        default_value=[],
        config=True,
        help="URLs that receive a POST with the event as JSON when a job reaches one of "
        "CumulusApp.notify_states (on the command line: --CumulusApp.notify_url=URL, several "
        "separated by commas). Delivery is retried with backoff for notify_retry_seconds; "
        "URLs are logged without their query string or user info.",
    )
    notify_states = List(
        Unicode(),
        default_value=list(DEFAULT_STATES),
        config=True,
        help="The job states that are posted to CumulusApp.notify_url "
        "(e.g. --CumulusApp.notify_states=completed,failed).",
    )
    notify_format = CaselessStrEnum(
        list(FORMATS),
        default_value="json",
        config=True,
        help="'json' posts the event as it is; 'slack' posts a Slack incoming-webhook message.",
    )
    notify_retry_seconds = Float(
        300.0,
        config=True,
        help="How long a failed webhook POST is tried again before it is dropped.",
    )
    event_limit = Integer(
        10_000, config=True, help="How many events the event log keeps (the newest)."
    )
    event_days = Float(30.0, config=True, help="How many days the event log keeps an event.")

    @validate("notify_url")
    def _validate_notify_url(self, proposal: Any) -> list[str]:
        urls = _comma_list(proposal["value"])
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise TraitError(
                    f"CumulusApp.notify_url: {redact(url)!r} is not an http:// or https:// URL"
                )
        return urls

    @validate("notify_states")
    def _validate_notify_states(self, proposal: Any) -> list[str]:
        states = _comma_list(proposal["value"])
        known = [s.value for s in JobState]
        for state in states:
            if state not in known:
                raise TraitError(
                    f"CumulusApp.notify_states: {state!r} is not a job state; use some of {known}"
                )
        return states

    manager: JobManager | None = None
    webhooks: Webhooks | None = None

    @classmethod
    def make_serverapp(cls, **kwargs: Any) -> Any:
        # Defaults for the headless `jupyter cumulus` only (the seed's
        # http://localhost:8081); the command line and config files still win.
        kwargs.setdefault("port", 8081)
        kwargs.setdefault("open_browser", False)
        return super().make_serverapp(**kwargs)

    def _link_jupyter_server_extension(self, serverapp: Any) -> None:
        try:
            super()._link_jupyter_server_extension(serverapp)
        except TraitError as e:
            # Jupyter would log this as a warning and go on with the defaults
            # (another job root, no webhooks): refuse to start instead.
            self.log.critical("cumulus: %s", e)
            raise SystemExit(f"cumulus: {e}") from None

    def initialize_settings(self) -> None:
        backend: Backend[Any]
        if self.backend == "ray":
            devices: list[str] = []  # Ray's resources, not this host's, decide placement
            backend = self._ray_backend()
        else:
            devices = detect_gpus() if self.gpus is None else list(self.gpus)
            backend = self.backend_class()  # type: ignore[abstract]  # a concrete subclass
        if self.warm_workers and isinstance(backend, LocalBackend):
            preload = default_preload() if self.preload is None else list(self.preload)
            backend.warm = WarmTemplate(sys.executable, preload, self.log, nice=self.job_nice)
        self.manager = JobManager(
            self.job_root,
            backend=backend,
            devices=devices,
            pause_timeout=self.pause_timeout,
            kill_grace=self.kill_grace,
            max_payload_bytes=self.max_payload_bytes,
            job_nice=self.job_nice,
            log=self.log,
            event_limit=self.event_limit,
            event_max_age=self.event_days * 86400,
        )
        if self.notify_url:
            self.webhooks = Webhooks(
                self.notify_url,
                self.notify_states,
                self.notify_format,
                retry_for=self.notify_retry_seconds,
                log=self.log,
            )
            self.manager.events.subscribe(self.webhooks)
        self.settings["cumulus_manager"] = self.manager
        self.log.info(
            "cumulus: jobs in %s, devices %s", self.manager.store.root, self.manager.ledger.devices
        )

    def _ray_backend(self) -> Backend[Any]:
        """The Ray backend, once every node of its cluster is shown to see the job root."""
        try:
            backend = RayBackend(parent=self, log=self.log)
            root = Path(self.job_root)
            root.mkdir(parents=True, exist_ok=True)
            nodes = backend.check_root(root)
        except (RuntimeError, OSError) as e:  # OSError: the cluster went away meanwhile
            # Refuse to start: a server whose runs cannot read their job
            # directories would fail every job later, one by one.
            self.log.critical("cumulus: %s", e)
            raise SystemExit(f"cumulus: {e}") from None
        self.log.info(
            "cumulus: Ray backend at %s; %d node(s) see the job root %s",
            backend.address,
            len(nodes),
            self.job_root,
        )
        return backend

    def initialize_handlers(self) -> None:
        self.handlers.extend(handlers())

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        await super()._start_jupyter_server_extension(serverapp)
        self._export_connection(serverapp)
        assert self.manager is not None
        warm = getattr(self.manager.backend, "warm", None)
        if warm is not None:
            # Now, not earlier: runs inherit the connection just exported, and a
            # template with another environment would not be used.
            warm.prepare(shared_environment(os.environ))
        await self.manager.start()
        if self.freeze_gc:
            # Soon, not now: other extensions start alongside this one.
            asyncio.get_running_loop().call_soon(self._freeze_gc)

    def _freeze_gc(self) -> None:
        """Collect the startup's garbage once, then freeze every object the server holds."""
        gc.collect()
        gc.freeze()
        self.log.info(
            "cumulus: %d objects of the server's startup frozen for the garbage collector",
            gc.get_freeze_count(),
        )

    def _export_connection(self, serverapp: Any) -> None:
        """Let kernels started by this server find it: ``CumulusClient()`` needs no arguments."""
        url = serverapp.connection_url
        os.environ[URL_ENV] = url
        token = getattr(serverapp.identity_provider, "token", "") or ""
        if token:
            os.environ[TOKEN_ENV] = token
        else:
            os.environ.pop(TOKEN_ENV, None)

    async def stop_extension(self) -> None:
        if self.manager is not None:
            await self.manager.stop()
            warm = getattr(self.manager.backend, "warm", None)
            if warm is not None:
                warm.close()
        if self.webhooks is not None:
            await self.webhooks.close()


def _comma_list(values: list[str]) -> list[str]:
    """A list trait given on the command line as one "a,b" string, or as a list."""
    return [part.strip() for value in values for part in str(value).split(",") if part.strip()]


main = launch_new_instance = CumulusApp.launch_instance
