"""What travels with a job: the user's own modules, and verify_resume run as a job runs.

A project keeps its model in ``model.py`` beside the notebook or script and a
package beside it; the job, which runs in its own directory on the server's
environment, must import them as the submitter did.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from kernels import Kernel, text_of

from cumulus_jupyter.runtime import verify_resume

MODEL = """\
import helpers


class GPT:
    def __init__(self, width):
        self.width = helpers.double(width)
"""
HELPERS = """\
def double(x):
    return 2 * x
"""
PACKAGE_INIT = "from .layers import depth\n"
PACKAGE_LAYERS = "def depth():\n    return 3\n"


@pytest.fixture
def project(tmp_path):
    """A user's project: model.py (importing helpers.py) and a package, beside the code."""
    root = tmp_path / "project"
    (root / "nets").mkdir(parents=True)
    (root / "model.py").write_text(MODEL)
    (root / "helpers.py").write_text(HELPERS)
    (root / "nets" / "__init__.py").write_text(PACKAGE_INIT)
    (root / "nets" / "layers.py").write_text(PACKAGE_LAYERS)
    return root


def run_script(project, server, body):
    """Run a script in the project directory, as a user runs theirs; return its output."""
    script = project / "train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from cumulus_jupyter import CumulusClient
            from cumulus_jupyter.errors import JobFailedError

            client = CumulusClient({server.url!r}, token={server.token!r})
            """
        )
        + textwrap.dedent(body)
    )
    done = subprocess.run(
        [sys.executable, str(script)], cwd=project, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_script_function_takes_its_local_modules_along(project, server):
    out = run_script(
        project,
        server,
        """
        from model import GPT

        def train(width):
            import nets.layers  # imported only inside the job
            return GPT(width).width * nets.layers.depth()

        print("result", client.run(train, args=[7], gpu_memory=0.1))
        """,
    )
    assert "result 42" in out


def test_a_module_the_job_cannot_import_is_named_with_what_to_do(project, server):
    # Imported in the script, then gone before the job could get it.
    out = run_script(
        project,
        server,
        """
        import os
        import model

        os.remove(model.__file__)

        def train():
            return model.GPT(1).width

        try:
            client.run(train, gpu_memory=0.1)
        except JobFailedError as e:
            print("error", e.exc_type, str(e).splitlines()[0])
        """,
    )
    line = next(x for x in out.splitlines() if x.startswith("error"))
    assert "ModuleNotFoundError" in line
    assert "could not import 'model'" in line
    assert f"imported from {project / 'model.py'}" in line
    assert "install it into the job server's Python environment" in line
    assert "ship=['model']" in line


def test_a_module_never_imported_here_is_named_too(project, server):
    out = run_script(
        project,
        server,
        """
        def train():
            import not_a_module_anywhere  # noqa: F401

        try:
            client.run(train, gpu_memory=0.1)
        except JobFailedError as e:
            print("error", str(e).splitlines()[0])
        """,
    )
    line = next(x for x in out.splitlines() if x.startswith("error"))
    assert "could not import 'not_a_module_anywhere'" in line
    assert "had not imported" in line


def test_a_cumulus_cell_imports_modules_beside_the_notebook(project, server):
    kernel = Kernel(server, cwd=str(project))
    try:
        kernel.ok("%load_ext cumulus_jupyter")
        out = text_of(
            kernel.ok(
                "%%cumulus --wait --gpu-memory 0.1\n"
                "from model import GPT\n"
                "from nets import depth\n"
                "print('width', GPT(5).width * depth())\n"
            )
        )
        assert "width 30" in out
    finally:
        kernel.shutdown()


def loop_train(*, restore_counter=True):
    """Seeds only torch and never uses random or NumPy (as nanoGPT's train.py).

    Its learning rate comes from a counter of its own; without
    ``restore_counter`` a resume starts the counter over.
    """
    import torch

    from cumulus_jupyter.runtime import Checkpointer, should_pause

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [torch.randn(2, 4) for _ in range(12)]
    ckpt = Checkpointer()
    iter_num = 0
    if ckpt.exists():
        extra = ckpt.load(model, optimizer)["extra"]
        iter_num = extra["iter_num"] if restore_counter else 0
    for epoch, step, x in ckpt.loop(data, epochs=2):
        for group in optimizer.param_groups:
            group["lr"] = 0.1 / (1 + iter_num)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        iter_num += 1
        if should_pause():
            ckpt.save(model, optimizer, epoch, step, extra={"iter_num": iter_num})
            return "paused"
    return "completed"


def test_verify_resume_is_exact_for_code_that_seeds_only_torch():
    report = verify_resume(loop_train, steps=16, pause_at=5)
    assert report.exact, str(report)


def test_verify_resume_names_a_counter_that_is_not_restored():
    report = verify_resume(loop_train, kwargs={"restore_counter": False}, steps=16, pause_at=5)
    assert not report.exact
    text = str(report)
    assert "param_groups" in text
    assert "RNG state" not in text  # no generator differs: both runs started alike
    assert "state the checkpoint does not hold" in text


def import_by_name(name):
    """Imports a module by a computed name, which nothing can see before it runs."""
    import importlib

    from cumulus_jupyter.runtime import Checkpointer, should_pause

    importlib.import_module(name)
    ckpt = Checkpointer()
    for _epoch, step, _ in ckpt.loop(range(10), epochs=1):
        if should_pause():
            ckpt.save(None, None, 0, step)
            return "paused"
    return "completed"


def test_verify_resume_imports_only_what_a_job_could(tmp_path, monkeypatch):
    # The module is importable from the caller's working directory, as in a
    # notebook's; a job runs elsewhere and cannot import it (nothing showed
    # it must travel), so verify_resume must not pass it either.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "only_here.py").write_text("VALUE = 1\n")
    with pytest.raises(RuntimeError, match=r"could not import 'only_here'"):
        verify_resume(import_by_name, args=["only_here"], steps=6, pause_at=2)


def test_verify_resume_takes_the_local_modules_along(project, monkeypatch):
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(project))
    import model

    def train():
        from cumulus_jupyter.runtime import Checkpointer, should_pause

        ckpt = Checkpointer()
        width = model.GPT(3).width
        for _epoch, step, _ in ckpt.loop(range(8), epochs=1):
            if should_pause():
                ckpt.save(None, None, 0, step, extra={"width": width})
                return "paused"
        return "completed"

    assert verify_resume(train, steps=6, pause_at=2).exact
