"""The Ray backend against a real Ray cluster on this host (a head and two nodes of one
logical GPU each; Ray's resources are logical, so a host without GPUs can test placement),
through a real Jupyter server started with ``--CumulusApp.backend=ray``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jobfuncs
import psutil
import pytest
from conftest import serving
from servers import ServerProcess, free_port, wait_until
from test_exact_resume import assert_same_state, losses

from cumulus_jupyter.jobdir import WORKER_MODULE, job_environment
from cumulus_jupyter.kernel.display import job_header_html

ray_cluster_utils = pytest.importorskip(
    "ray.cluster_utils", reason="the Ray backend's tests need the extra: pip install .[ray]"
)
from ray.job_submission import JobSubmissionClient  # noqa: E402

from cumulus_jupyter.server.backends.raycluster import RayBackend  # noqa: E402


class RayCluster:
    """A head without GPUs (it runs Ray's own services) and GPU nodes that can be removed."""

    def __init__(self) -> None:
        port = free_port()
        self.address = f"http://127.0.0.1:{port}"
        self.cluster = ray_cluster_utils.Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "num_gpus": 0,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": port,
            },
        )
        self.nodes = [self.add_node() for _ in range(2)]
        self.client = JobSubmissionClient(self.address)

    def add_node(self):
        node = self.cluster.add_node(num_cpus=2, num_gpus=1)
        self.cluster.wait_for_nodes()
        return node

    def node_of(self, node_name: str):
        """The cluster node whose id the record's ``node`` names (``ip (id prefix)``)."""
        prefix = node_name.split("(")[1].rstrip(")")
        (node,) = [n for n in self.nodes if n.node_id.startswith(prefix)]
        return node

    def remove(self, node) -> None:
        self.nodes.remove(node)
        self.cluster.remove_node(node)

    def status(self, submission_id: str) -> str:
        return self.client.get_job_status(submission_id).value

    def shutdown(self) -> None:
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = RayCluster()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def ray_server(base: Path, cluster: RayCluster, **config) -> ServerProcess:
    return ServerProcess(
        base,
        backend="ray",
        pause_timeout=20,
        kill_grace=2,
        extra=[f"--RayBackend.address={cluster.address}"],
        **config,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_cluster):
    with serving(ray_server(tmp_path_factory.mktemp("ray"), ray_cluster)) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """exact_train run straight through on a local server: what every Ray run must equal."""
    with serving(ServerProcess(tmp_path_factory.mktemp("local"))) as srv:
        job = srv.client().run_async(jobfuncs.exact_train)
        return job.result(timeout=180), losses(job)


def run_processes(job_dir: Path) -> list[psutil.Process]:
    """Processes of this host that are a run of the job in ``job_dir`` (or started by one)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        with contextlib.suppress(psutil.Error):
            cmd = proc.info["cmdline"] or []
            if (WORKER_MODULE in cmd and str(job_dir) in cmd) or proc.info["cwd"] == str(job_dir):
                found.append(proc)
    return found


def test_a_job_runs_as_a_ray_job_and_its_record_says_where(server, ray_cluster):
    client = server.client()
    job = client.run_async(jobfuncs.environment, args=("CUDA_VISIBLE_DEVICES",), gpu_memory=0.5)
    assert job.result(timeout=180) == {"CUDA_VISIBLE_DEVICES": job.info()["device"]}
    info = job.info()
    (run,) = info["runs"]
    # One Ray job per run, its id made from the job's id and run number.
    assert run["ray_submission_id"] == f"cumulus-{job.id}-run1"
    assert ray_cluster.status(run["ray_submission_id"]) == "SUCCEEDED"
    details = ray_cluster.client.get_job_info(run["ray_submission_id"])
    # Where it ran: the node Ray chose (one of the GPU nodes, never the head) and
    # the device Ray gave it, as the run saw it.
    assert info["node"] == run["node"]
    assert ray_cluster.node_of(info["node"]).node_id == details.driver_node_id
    assert info["devices"] == [info["device"]] and info["device"] in ("0",)
    assert run["submitted"] <= run["started"] <= run["ended"]
    assert info["state"] == "completed"
    assert client.gpus() == []  # Ray holds the shares, not this server
    assert f"on node {info['node']}" in job_header_html(info)  # the widget says where


def test_a_retried_start_of_a_run_never_starts_it_twice(server, ray_cluster):
    """The server may die between Ray taking a run and the record saying so: starting
    the same run again finds the run Ray has, by its submission id."""
    job = server.client().run_async(jobfuncs.add, args=(1, 2))
    assert job.result(timeout=180) == 3
    job_dir = server.job_root / job.id
    env = job_environment(os.environ, job_dir, job.id, 1, gpu_fraction=0.1)
    backend = RayBackend(address=ray_cluster.address)
    try:
        again = backend.start(job_dir, sys.executable, env)
    finally:
        backend.unwatch_all()
    assert again.to_json() == job.info()["process"]
    same = [j for j in ray_cluster.client.list_jobs() if j.submission_id == again.submission_id]
    assert len(same) == 1 and same[0].status.value == "SUCCEEDED"
    assert job.result() == 3 and len(job.info()["runs"]) == 1


def test_printed_output_and_a_failure_come_back_as_from_a_local_run(server):
    client = server.client()
    job = client.run_async(jobfuncs.failing, args=(3,))
    assert job.wait(timeout=180) == "failed"
    assert "ValueError" in job.info()["message"]
    assert job.info()["restarts"] == []  # a function that raised is not restarted
    job = client.run_async(jobfuncs.add, args=(2, 3))
    assert job.result(timeout=180) == 5


def test_pause_then_resume_on_ray_ends_exactly_as_a_straight_run(server, ray_cluster, reference):
    expected, expected_losses = reference
    client = server.client()
    job = client.run_async(jobfuncs.exact_train, kwargs={"step_seconds": 0.05, "every_steps": 4})
    wait_until(lambda: job.metrics(), timeout=180, what="the first steps")
    job.pause()
    # No signal crosses nodes: the run saw the pause in control.json.
    assert job.wait(timeout=120) == "paused"
    first = job.info()["runs"][0]
    assert ray_cluster.status(first["ray_submission_id"]) == "SUCCEEDED"
    assert not run_processes(server.job_root / job.id)  # paused: nothing left running
    job.resume()
    result = job.result(timeout=240)
    info = job.info()
    assert [r["ray_submission_id"] for r in info["runs"]] == [
        f"cumulus-{job.id}-run1",
        f"cumulus-{job.id}-run2",
    ]
    assert all(r["node"] for r in info["runs"])  # on either node
    assert_same_state(result, expected)
    assert list(losses(job).values()) == list(expected_losses.values())


def test_cancel_stops_the_ray_job_and_leaves_no_process(server, ray_cluster, tmp_path):
    client = server.client()
    job = client.run_async(jobfuncs.ignore_everything, args=(str(tmp_path / "pid"),))
    wait_until(lambda: (tmp_path / "pid").exists(), timeout=180, what="the run to start")
    pid = int((tmp_path / "pid").read_text())
    assert psutil.pid_exists(pid)
    job.cancel()
    assert job.wait(timeout=60) == "cancelled"
    sid = job.info()["runs"][0]["ray_submission_id"]
    wait_until(lambda: ray_cluster.status(sid) == "STOPPED", timeout=60, what="Ray's stop")
    # It ignored SIGTERM: Ray's SIGKILL came kill_grace (2 s) later, to its whole tree.
    wait_until(
        lambda: not run_processes(server.job_root / job.id),
        timeout=30,
        what=lambda: f"no process of the job, left: {run_processes(server.job_root / job.id)}",
    )


def test_four_half_shares_run_on_two_gpus_while_a_fifth_waits_for_ray(server, tmp_path):
    client = server.client()
    release = tmp_path / "release"
    jobs = [
        client.run_async(jobfuncs.hold_until, args=(str(release),), gpu_memory=0.5)
        for _ in range(5)
    ]

    def states():
        return [j.info()["state"] for j in jobs]

    wait_until(
        lambda: sorted(states()) == ["queued"] + ["running"] * 4,
        timeout=240,
        what=lambda: f"four running and one queued, got {states()}",
    )
    running = [j.info() for j in jobs if j.info()["state"] == "running"]
    (waiting,) = [j.info() for j in jobs if j.info()["state"] == "queued"]
    # Two on each node: Ray packs 0.5 + 0.5 on each logical GPU.
    nodes = [i["node"] for i in running]
    assert len(set(nodes)) == 2 and all(nodes.count(n) == 2 for n in nodes)
    # The fifth was handed to Ray and waits for it, saying so.
    assert waiting["runs"][0]["ray_submission_id"] and waiting["started"] is None
    assert "waiting to be placed" in waiting["message"] and "Ray" in waiting["message"]
    release.touch()
    for j in jobs:
        assert j.result(timeout=240) == "released"


def test_a_run_whose_node_is_lost_restarts_on_the_other_node_and_ends_exactly(
    server, ray_cluster, reference
):
    expected, expected_losses = reference
    client = server.client()
    job = client.run_async(
        jobfuncs.exact_train,
        kwargs={"step_seconds": 0.05, "every_steps": 2},
        max_restarts=1,
        gpu_memory=1.0,  # the whole GPU of its node: the restart must go to the other one
    )
    wait_until(lambda: job.get_checkpoints(), timeout=180, what="a checkpoint")
    lost_node = job.info()["node"]
    ray_cluster.remove(ray_cluster.node_of(lost_node))
    try:
        result = job.result(timeout=300)
    finally:
        ray_cluster.nodes.append(ray_cluster.add_node())  # the next tests have two again
    info = job.info()
    (restart,) = info["restarts"]
    assert restart["run"] == 1 and "Ray" in restart["cause"] and "died" in restart["cause"]
    assert [r["state"] for r in info["runs"]] == ["lost", "completed"]
    assert info["runs"][1]["node"] != lost_node
    assert_same_state(result, expected)
    assert list(losses(job).values()) == list(expected_losses.values())


def test_a_sigkilled_server_readopts_its_ray_jobs(ray_cluster, tmp_path):
    srv = ray_server(tmp_path, ray_cluster)
    with serving(srv):
        client = srv.client()
        early, late = tmp_path / "early", tmp_path / "late"
        quick = client.run_async(
            jobfuncs.print_when_released, args=(str(early), "hello", str(early))
        )
        held = client.run_async(jobfuncs.hold_until, args=(str(late),))
        wait_until(
            lambda: quick.status() == "running" == held.status(), timeout=180, what="both running"
        )
        quick_sid = quick.info()["runs"][0]["ray_submission_id"]
        held_sid = held.info()["runs"][0]["ray_submission_id"]
        srv.stop(signal.SIGKILL)
        early.touch()  # `quick` finishes while the server is down
        wait_until(lambda: ray_cluster.status(quick_sid) == "SUCCEEDED", timeout=60, what="quick")
        assert ray_cluster.status(held_sid) == "RUNNING"
        srv.start()
        client = srv.client()
        quick, held = client.get_job(quick.id), client.get_job(held.id)
        # The one that ended meanwhile shows its result and log.
        assert quick.result(timeout=60) == "done"
        assert "hello" in quick.logs()
        # The other is adopted by its submission id, not started again.
        assert held.status() == "running"
        late.touch()
        assert held.result(timeout=120) == "released"
        assert [r["ray_submission_id"] for r in held.info()["runs"]] == [held_sid]


@pytest.mark.skipif(
    shutil.which("unshare") is None
    or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0,
    reason="needs unshare -m (a mount namespace) to give the server a job root the nodes lack",
)
def test_a_server_whose_job_root_the_nodes_cannot_see_refuses_to_start(ray_cluster, tmp_path):
    srv = ray_server(tmp_path, ray_cluster)
    srv.job_root.mkdir()
    # The server alone sees a private file system at the job root path: the Ray
    # nodes see the (empty) directory under it, as a node without the NFS mount would.
    script = f'mount -t tmpfs none "{srv.job_root}" && exec "$@"'
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *srv.argv()],
        env=srv.environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "do not see the job root" in out and str(srv.job_root) in out
    for node in ray_cluster.nodes:
        assert node.node_id in out  # each node that cannot see it is named
    assert sys.executable  # the probe ran with the server's interpreter
    assert os.listdir(srv.job_root) == []  # nothing of the probe was left where nodes look
