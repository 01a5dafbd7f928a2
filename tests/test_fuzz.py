"""Schemathesis against a live server: no 5xx, every response as the OpenAPI document says."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jobfuncs
import yaml

SCHEMA = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"


def test_openapi_document_is_in_the_wheel_config():
    pyproject = (SCHEMA.parent.parent / "pyproject.toml").read_text()
    assert '"docs/openapi.yaml" = "cumulus_jupyter/openapi.yaml"' in pyproject


def test_schemathesis_finds_no_server_error_and_no_schema_violation(server, client, tmp_path):
    # A real job, paused with checkpoints, so read operations also meet one.
    job = client.run_async(
        jobfuncs.resumable_train,
        kwargs={"epochs": 1, "steps": 2000, "step_seconds": 0.01, "every_steps": 5},
        gpu_memory=0.2,
    )
    from servers import wait_until

    wait_until(lambda: len(job.get_checkpoints()) >= 2, what="checkpoints")
    job.pause()
    job.wait(timeout=60)
    schema = yaml.safe_load(SCHEMA.read_text())
    for path in ("/jobs/{job_id}/logs", "/jobs/{job_id}/metrics", "/jobs/{job_id}/checkpoints"):
        schema["paths"][path]["get"]["parameters"] = [
            {
                "name": "job_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "example": job.id,
            }
        ]
    copy = tmp_path / "openapi.yaml"
    copy.write_text(yaml.safe_dump(schema))
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is part of the test extras"
    out = subprocess.run(
        [
            st,
            "run",
            str(copy),
            "--url",
            server.url + "cumulus/api",
            "-H",
            f"Authorization: token {server.token}",
            "--max-examples",
            "15",
            "--checks",
            "not_a_server_error,response_schema_conformance,"
            "status_code_conformance,content_type_conformance",
            "--seed",
            "7",
            "--request-timeout",
            "90",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert " passed" in out.stdout
    assert server.token not in out.stdout
