"""%%cumulus and %cumulus in a real IPython kernel talking to a real server."""

from __future__ import annotations

import re

import pytest
from kernels import Kernel, text_of
from servers import wait_until


@pytest.fixture(scope="module")
def kernel(server, tmp_path_factory):
    k = Kernel(server, str(tmp_path_factory.mktemp("kernel")))
    k.ok("%load_ext cumulus_jupyter")
    yield k
    k.shutdown()


def error_of(kernel, code):
    reply, messages = kernel.run(code)
    assert reply["status"] == "error", text_of(messages)
    return reply["ename"], reply["evalue"]


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("--gpu-memory 2", "gpu_memory must be greater than 0 and at most 1"),
        ("--gpu-memory x", "invalid float value"),
        ("--duration soon", "duration 'soon' is not understood"),
        ("--bogus", "unrecognized arguments"),
        ("--out 1x", "--out needs a variable name"),
        ("--max-restarts -1", "max_restarts must be a whole number from 0 to 100"),
    ],
)
def test_cell_magic_argument_errors(kernel, client, line, match):
    before = len(client.jobs())
    ename, evalue = error_of(kernel, f"%%cumulus {line}\n1 + 1")
    assert ename == "UsageError"
    assert match in evalue
    assert len(client.jobs()) == before  # nothing was submitted


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("", "takes one of: jobs, attach"),
        ("frobnicate", "got 'frobnicate'"),
        ("pause", "needs a job id"),
        ("pause nosuchjob", "no job 'nosuchjob'"),
    ],
)
def test_line_magic_errors(kernel, line, match):
    ename, evalue = error_of(kernel, f"%cumulus {line}")
    assert ename == "UsageError" and match in evalue


def test_help_documents_every_subcommand(kernel):
    reply, _ = kernel.run("%cumulus?")
    page = "".join(p["data"]["text/plain"] for p in reply["payload"] if p.get("source") == "page")
    for word in ("--gpu-memory", "--wait", "--out", "jobs", "attach", "checkpoints", "resume"):
        assert word in page


def test_syntax_error_is_reported_at_its_line_before_submitting(kernel, client):
    before = len(client.jobs())
    ename, evalue = error_of(kernel, "%%cumulus\nx = 1\ny = (\n")
    assert ename == "UsageError"
    assert 'File "<cell>", line 3' in evalue  # line 1 is the %%cumulus line
    assert "y = (" in evalue and "SyntaxError: '(' was never closed" in evalue
    assert len(client.jobs()) == before


def test_unshippable_name_is_named(kernel, client):
    before = len(client.jobs())
    kernel.ok("import threading\nguard = threading.Lock()")
    ename, evalue = error_of(kernel, "%%cumulus\nwith guard:\n    pass")
    assert ename == "UsageError"
    assert "'guard'" in evalue and "lock" in evalue
    assert len(client.jobs()) == before


def test_namespace_is_shipped_and_last_expression_is_the_result(kernel, client):
    kernel.ok(
        "import torch\n"
        "weights = torch.arange(5.0)\n"
        "class Scaler:\n"
        "    def __init__(self, k):\n"
        "        self.k = k\n"
        "def helper(t, scaler):\n"
        "    return float((t * scaler.k).sum())\n"
    )
    messages = kernel.ok(
        "%%cumulus --wait --gpu-memory 0.2 --name shipped --out shipped_job\n"
        "import os\n"
        "print('in job', os.environ['CUMULUS_JOB_ID'])\n"
        "helper(weights, Scaler(3)) + 1"
    )
    results = [m for m in messages if m["type"] == "execute_result"]
    assert results and results[0]["data"]["text/plain"] == "31.0"
    job_id = re.search(r"in job (\w+)", text_of(messages)).group(1)
    assert client.get_job(job_id).info()["name"] == "shipped"
    assert text_of(kernel.ok("print(shipped_job.id)")).strip() == job_id
    assert text_of(kernel.ok("print(_ == 31.0)")).strip() == "True"


def visible_outputs(messages):
    """The cell's outputs as a notebook keeps them: displays updated in place."""
    outputs = []
    by_id = {}
    for m in messages:
        if m["type"] == "stream":
            outputs.append(m["text"])
        elif m["type"] == "display_data":
            outputs.append(m["data"].get("text/plain", ""))
            display_id = m.get("transient", {}).get("display_id")
            if display_id:
                by_id[display_id] = len(outputs) - 1
        elif m["type"] == "update_display_data":
            outputs[by_id[m["transient"]["display_id"]]] = m["data"].get("text/plain", "")
    return outputs


def test_wait_streams_output_and_renders_a_progress_bar_as_one_line(kernel):
    messages = kernel.ok(
        "%%cumulus --wait --gpu-memory 0.2\n"
        "import sys, time\n"
        "from tqdm import tqdm\n"
        "print('before the bar', flush=True)\n"
        "for i in tqdm(range(60), file=sys.stdout, mininterval=0, ascii=True):\n"
        "    time.sleep(0.03)\n"
        "print('after the bar')\n"
        "'finished'"
    )
    updates = sum(1 for m in messages if m["type"] == "update_display_data")
    assert updates >= 2  # the bar was redrawn live, more than once
    # Each output is its own block in the notebook.
    lines = "\n".join(o.rstrip("\n") for o in visible_outputs(messages)).splitlines()
    bar_lines = [ln for ln in lines if "it/s]" in ln or "s/it]" in ln]
    assert len(bar_lines) == 1, lines
    assert "60/60" in bar_lines[0]
    assert lines.index("before the bar") < lines.index(bar_lines[0]) < lines.index("after the bar")
    result = [m for m in messages if m["type"] == "execute_result"]
    assert result[0]["data"]["text/plain"] == "'finished'"


def test_without_wait_the_cell_shows_the_job_widget(kernel, client):
    messages = kernel.ok(
        "%%cumulus --gpu-memory 0.2 --max-restarts 2 --no-notify --out quick\n6 * 7"
    )
    widgets = [
        m
        for m in messages
        if m["type"] == "display_data" and "application/vnd.jupyter.widget-view+json" in m["data"]
    ]
    assert len(widgets) == 1
    assert text_of(kernel.ok("print(quick.result(timeout=60))")).strip() == "42"
    assert text_of(kernel.ok("print(quick.info()['max_restarts'])")).strip() == "2"
    assert text_of(kernel.ok("print(quick.info()['notify'])")).strip() == "False"


def test_line_magics_control_a_job_and_attach_after_a_restart(kernel, client):
    kernel.ok(
        "%%cumulus --gpu-memory 0.2 --out longjob\n"
        "import time\n"
        "from cumulus_jupyter.runtime import Checkpointer, should_pause\n"
        "for step in range(100000):\n"
        "    print('tick', step, flush=True)\n"
        "    if should_pause():\n"
        "        Checkpointer().save(None, None, 0, step)\n"
        "        break\n"
        "    time.sleep(0.1)\n"
    )
    job_id = text_of(kernel.ok("print(longjob.id)")).strip()
    job = client.get_job(job_id)
    wait_until(lambda: "tick 3" in job.logs(), what="the job to print")

    assert job_id in text_of(kernel.ok("%cumulus jobs"))
    kernel.restart()  # the job does not care
    kernel.ok("%load_ext cumulus_jupyter")
    out = text_of(kernel.ok("w = %cumulus attach " + job_id + "\nprint(w.log_text)"))
    assert "tick 0" in out and "tick 3" in out  # the whole log so far

    assert f"job {job_id}: pausing" in text_of(kernel.ok(f"%cumulus pause {job_id}"))
    wait_until(lambda: job.status() == "paused", what="the pause")
    wait_until(lambda: "paused" in text_of(kernel.ok("print(w.state)")), what="the widget")
    out = text_of(kernel.ok(f"%cumulus checkpoints {job_id}"))
    assert f"Checkpoints of job {job_id} (paused)" in out
    assert "checkpoint-e0-s" in out  # (ipywidgets cuts text/plain at 110 characters)
    assert f"job {job_id}: " in text_of(kernel.ok(f"%cumulus resume {job_id}"))
    wait_until(lambda: job.status() == "running", what="the resume")
    logs = text_of(kernel.ok(f"%cumulus logs {job_id}"))
    assert "tick 0" in logs
    kernel.ok(f"%cumulus cancel {job_id}")
    wait_until(lambda: job.status() == "cancelled", what="the cancel")
