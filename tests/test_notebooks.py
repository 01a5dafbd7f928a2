"""The example notebooks run end to end against a real Jupyter server with the extension.

Each notebook is executed with nbclient in a real ipykernel whose environment points
at the module's server (as a kernel started by that server would), then its outputs
and the server's records are checked.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
WIDGET = "application/vnd.jupyter.widget-view+json"


def outputs(cell: Any) -> list[dict[str, Any]]:
    return cell.get("outputs", []) if cell.cell_type == "code" else []


def text_of(cell: Any) -> str:
    """A code cell's stream text and text/plain results, in order."""
    parts = []
    for out in outputs(cell):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] in ("execute_result", "display_data"):
            parts.append(out["data"].get("text/plain", "") + "\n")
    return "".join(parts)


def cells_with(nb: Any, source_part: str) -> list[Any]:
    return [c for c in nb.cells if c.cell_type == "code" and source_part in c.source]


def only_cell(nb: Any, source_part: str) -> Any:
    found = cells_with(nb, source_part)
    assert len(found) == 1, f"expected one cell containing {source_part!r}, got {len(found)}"
    return found[0]


def printed_dict(text: str, key: str, value: str) -> dict[str, Any]:
    """The printed dict (one per line) whose ``key`` is ``value``."""
    for line in text.splitlines():
        if line.startswith("{") and f"{key!r}: {value!r}" in line:
            return ast.literal_eval(line)
    raise AssertionError(f"no printed dict with {key}={value!r} in:\n{text}")


def widget_outputs(cell: Any) -> list[dict[str, Any]]:
    return [o for o in outputs(cell) if WIDGET in o.get("data", {})]


def job_named(server: Any, name: str) -> Any:
    jobs = [j for j in server.client().jobs() if j.name == name]
    assert jobs, f"the server has no job named {name!r}"
    return jobs[-1]


def check_checkpointed_training(nb: Any, server: Any) -> None:
    result = printed_dict(text_of(only_cell(nb, "client.run(")), "status", "completed")
    assert isinstance(result["final_loss"], float)

    listing = text_of(only_cell(nb, "Available checkpoints"))
    count = int(re.search(r"Available checkpoints: (\d+)", listing).group(1))
    rows = re.findall(r"checkpoint-e(\d+)-s(\d+)\.pt\s+epoch (\d+)\s+step\s+(\d+)", listing)
    assert count == len(rows) >= 3
    assert all(e == e2 and s == s2 for e, s, e2, s2 in rows)

    evaluated = text_of(only_cell(nb, "accuracy"))
    last_epoch, last_step = rows[-1][2], rows[-1][3]
    match = re.search(r"\(epoch (\d+), step (\d+)\): accuracy ([\d.]+)%", evaluated)
    assert match, evaluated
    assert match.group(1, 2) == (last_epoch, last_step)
    assert float(match.group(3)) > 50  # four classes: chance is 25%

    job = job_named(server, "basic-training")
    assert job.status() == "completed"
    assert job.result(timeout=10) == result
    assert len(job.get_checkpoints()) == count


def check_pause_resume(nb: Any, server: Any) -> None:
    started = only_cell(nb, "%%cumulus")
    assert widget_outputs(started), "the %%cumulus cell shows no job widget"
    assert widget_outputs(only_cell(nb, "%cumulus checkpoints")), "no checkpoint browser"
    assert widget_outputs(only_cell(nb, "job  # a Job shows as its widget"))

    pause_cell = only_cell(nb, "paused = job.result(")
    paused = printed_dict(text_of(pause_cell), "status", "paused")
    assert "state: paused" in text_of(pause_cell)
    assert paused["start_step"] == 0

    listing = text_of(only_cell(nb, "Available checkpoints"))
    steps = [int(s) for s in re.findall(r"step\s+(\d+)$", listing, re.M)]
    assert steps and steps[-1] == paused["last_step"]  # the pause saved the newest one

    resumed_cell = only_cell(nb, "final = job.result(")
    final = printed_dict(text_of(resumed_cell), "status", "completed")
    match = re.search(r"resumed at step (\d+) \(paused at step (\d+)\)", text_of(resumed_cell))
    assert match, text_of(resumed_cell)
    start, paused_at = int(match.group(1)), int(match.group(2))
    assert start == paused_at + 1 == paused["last_step"] + 1 == final["start_step"]
    assert start > 0

    logs = text_of(only_cell(nb, "print(job.logs())"))
    assert "starting at step 0" in logs and f"starting at step {start}" in logs

    job = job_named(server, "pause-resume-demo")
    info = job.info()
    assert info["state"] == "completed"
    assert [r["state"] for r in info["runs"]] == ["paused", "completed"]
    assert job.result(timeout=10) == final
    assert "pause-resume-demo" in text_of(only_cell(nb, "%cumulus jobs"))


def check_resume_from_checkpoint(nb: Any, server: Any) -> None:
    assert widget_outputs(only_cell(nb, "client.run_async("))
    assert widget_outputs(only_cell(nb, "CheckpointBrowser(job)"))
    assert printed_dict(text_of(only_cell(nb, "paused = job.result(")), "status", "paused")

    chosen_text = text_of(only_cell(nb, "chosen = "))
    chosen = re.search(r"chosen: (\S+) \(epoch (\d+), step (\d+)\)", chosen_text)
    assert chosen, chosen_text
    chosen_name, chosen_step = chosen.group(1), int(chosen.group(3))

    resumed_cell = only_cell(nb, "job.resume(checkpoint=")
    result = printed_dict(text_of(resumed_cell), "status", "completed")
    match = re.search(
        r"resumed from (\S+) \(step (\d+)\): the run started at step (\d+)", text_of(resumed_cell)
    )
    assert match, text_of(resumed_cell)
    assert match.group(1) == chosen_name == result["loaded"]
    assert int(match.group(2)) == chosen_step
    assert int(match.group(3)) == chosen_step + 1 == result["start_step"]

    job = job_named(server, "resume-demo")
    info = job.info()
    assert [r["state"] for r in info["runs"]] == ["paused", "completed"]
    assert job.result(timeout=10) == result
    newest = job.get_checkpoints()[-1]

    new_cell = only_cell(nb, "def resume_training(")
    new_result = printed_dict(text_of(new_cell), "status", "completed")
    match = re.search(
        r"new job resumed from (\S+) \(step (\d+)\): it started at step (\d+)", text_of(new_cell)
    )
    assert match, text_of(new_cell)
    assert (match.group(1), int(match.group(2))) == (newest["name"], newest["step"])
    assert int(match.group(3)) == newest["step"] + 1 == new_result["start_step"]
    new_job = job_named(server, "resume_training")
    assert new_job.status() == "completed"
    # The new job saved into its own directory; the source job's files are untouched.
    assert [c["name"] for c in new_job.get_checkpoints()] == new_result["saved"]
    assert all(
        Path(c["path"]).parent != Path(newest["path"]).parent for c in new_job.get_checkpoints()
    )
    assert job.get_checkpoints()[-1] == newest


def check_counters_and_schedulers(nb: Any, server: Any) -> None:
    total_steps = 60
    for source, name in (
        ("def train_from_global_step(", "lr-from-global-step"),
        ("def train_with_scheduler(", "lr-from-scheduler"),
    ):
        text = text_of(only_cell(nb, source))
        pattern = rf"{name}: paused after global step (\d+), resumed at global step (\d+)"
        match = re.search(pattern, text)
        assert match, text
        paused_at, resumed_at = int(match.group(1)), int(match.group(2))
        assert 0 < paused_at < total_steps - 1 and resumed_at == paused_at + 1
        # The lrs the two runs trained with, batch by batch, are the unpaused schedule's.
        assert f"{name}: every batch had the lr of a run never paused: True" in text, text
        job = job_named(server, name)
        assert [r["state"] for r in job.info()["runs"]] == ["paused", "completed"]
        result = job.result(timeout=10)
        assert (result["first"], result["last"]) == (resumed_at, total_steps - 1)


def check_ddp_pause_resume(nb: Any, server: Any) -> None:
    ranks_steps, one_rank_steps, epochs = 32, 64, 3  # 4096 samples, 64 a batch per rank
    assert widget_outputs(only_cell(nb, "%%cumulus --nprocs 2")), "no job widget"
    assert widget_outputs(only_cell(nb, "job  # a Job shows as its widget"))

    pause_cell = only_cell(nb, "paused = job.result(")
    paused = printed_dict(text_of(pause_cell), "status", "paused")
    assert "state: paused" in text_of(pause_cell)
    assert paused["world_size"] == 2 and paused["start_step"] == 0
    pause_step = paused["last_step"]
    assert 0 < pause_step < epochs * ranks_steps - 1

    listing = text_of(only_cell(nb, "Available checkpoints"))
    count = int(re.search(r"Available checkpoints: (\d+)", listing).group(1))
    rows = re.findall(
        r"(checkpoint-e(\d+)-s(\d+)\.dcp)\s+epoch (\d+)\s+step\s+(\d+)\s+"
        r"format (\S+)\s+ranks (\d+)\s+(\d+) bytes",
        listing,
    )
    # One entry for the checkpoint both ranks saved, at the batch the job paused after.
    assert count == len(rows) == 1, listing
    name, e, s, epoch, step, fmt, ranks, size = rows[0]
    assert (e, s) == (epoch, step) and (fmt, ranks) == ("dcp", "2")
    epoch, step = int(epoch), int(step)
    assert epoch * ranks_steps + step == pause_step
    shown = re.search(r"files: (\[.*\])", listing)
    assert shown, listing
    files = ast.literal_eval(shown.group(1))
    assert {".metadata", "rank-0.pt", "rank-1.pt"} <= set(files), files
    assert any(f.endswith(".distcp") for f in files), files

    resumed_cell = only_cell(nb, "job.resume(nprocs=1)")
    resumed = text_of(resumed_cell)
    final = printed_dict(resumed, "status", "completed")
    match = re.search(r"resumed at step (\d+) \(paused at step (\d+)\)", resumed)
    assert match, resumed
    start, paused_at = int(match.group(1)), int(match.group(2))
    assert start == paused_at + 1 == pause_step + 1 == final["start_step"]
    assert final["world_size"] == 1
    assert "the run that finished had world size 1" in resumed
    assert "runs: 2, ranks per run: [2, 1]" in resumed
    # On one rank an epoch has twice the batches: the rest of the paused epoch, then
    # the later epochs whole.
    rest = (one_rank_steps - step - 1) + (epochs - 1 - epoch) * one_rank_steps
    assert final["last_step"] == pause_step + rest
    assert final["accuracy"] > 0.5  # four classes: chance is 25%
    assert f"final loss {final['loss']:.4f}" in resumed

    logs = text_of(only_cell(nb, "print(job.logs())")).splitlines()
    for r in (0, 1):
        assert f"[rank {r}] rank {r} of 2: starting at step 0" in logs
        assert f"[rank {r}] rank {r} of 2: paused after step {pause_step}" in logs
    assert f"rank 0 of 1: starting at step {start}" in logs  # one process: no prefix
    assert f"rank 0 of 1: completed after step {final['last_step']}" in logs

    job = job_named(server, "ddp-pause-resume")
    info = job.info()
    assert info["state"] == "completed" and info["nprocs"] == 1
    runs = info["runs"]
    assert [(r["nprocs"], r["state"]) for r in runs] == [(2, "paused"), (1, "completed")]
    assert job.result(timeout=10) == final
    (entry,) = job.get_checkpoints()
    assert (entry["name"], entry["epoch"], entry["step"]) == (name, epoch, step)
    assert (entry["format"], entry["ranks"], entry["size"]) == ("dcp", 2, int(size))
    # Rank 0 reported every global step: the first run up to the pause, the second
    # from the step after it.
    assert [m["step"] for m in job.metrics(run=1)] == list(range(pause_step + 1))
    assert [m["step"] for m in job.metrics(run=2)] == list(range(start, final["last_step"] + 1))


CHECKS = {
    "01_checkpointed_training": check_checkpointed_training,
    "02_pause_resume": check_pause_resume,
    "03_resume_from_checkpoint": check_resume_from_checkpoint,
    "04_counters_and_schedulers": check_counters_and_schedulers,
    "05_ddp_pause_resume": check_ddp_pause_resume,
}


def test_every_notebook_has_checks():
    assert NOTEBOOKS, "no notebooks found"
    assert sorted(p.stem for p in NOTEBOOKS) == sorted(CHECKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, server, tmp_path, monkeypatch):
    monkeypatch.setenv("CUMULUS_SERVER_URL", server.url)
    monkeypatch.setenv("CUMULUS_TOKEN", server.token)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    errors = [o for c in nb.cells for o in outputs(c) if o["output_type"] == "error"]
    assert not errors, errors
    CHECKS[path.stem](nb, server)
