"""What ``python -m build`` ships: the prebuilt JupyterLab panel and the server config."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from servers import labextension_list

from cumulus_jupyter import __version__

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_ships_the_labextension_and_the_server_config(tmp_path):
    # The default build: an sdist, then the wheel from that sdist, so a user
    # building from the sdist needs no Node either.
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [wheel] = tmp_path.glob("cumulus_jupyter-*.whl")
    [sdist] = tmp_path.glob("cumulus_jupyter-*.tar.gz")
    data = f"cumulus_jupyter-{__version__}.data/data/"
    lab = data + "share/jupyter/labextensions/cumulus-jupyter/"
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        package = json.loads(whl.read(lab + "package.json"))
        config = json.loads(
            whl.read(data + "etc/jupyter/jupyter_server_config.d/cumulus_jupyter.json")
        )
        install = json.loads(whl.read(lab + "install.json"))
    assert package["name"] == "cumulus-jupyter"
    assert package["version"] == __version__  # the panel and the package move together
    assert any(re.fullmatch(re.escape(lab) + r"static/remoteEntry\.\w+\.js", n) for n in names)
    assert lab + "static/style.js" in names
    assert install["packageName"] == "cumulus-jupyter"
    assert config == {"ServerApp": {"jpserver_extensions": {"cumulus_jupyter": True}}}
    assert "cumulus_jupyter/openapi.yaml" in names

    # Installed by pip (not editable), JupyterLab finds it where pip put it.
    prefix = tmp_path / "prefix"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--ignore-installed",  # never uninstall the running copy
            "--prefix",
            str(prefix),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "JUPYTER_PATH": str(prefix / "share" / "jupyter")}
    text = labextension_list(env)
    installed = str(prefix / "share" / "jupyter" / "labextensions")
    assert installed in text, text
    # The entries listed under that directory: its indented lines.
    lines = text.split(installed, 1)[1].splitlines()[1:]
    entries = list(itertools.takewhile(lambda line: line[:1].isspace(), lines))
    pattern = rf"cumulus-jupyter v{re.escape(__version__)} enabled\s+OK"
    assert any(re.search(pattern, line) for line in entries), text

    with tarfile.open(sdist) as sd:
        members = sd.getnames()
    root = f"cumulus_jupyter-{__version__}/"
    assert root + "cumulus_jupyter/labextension/package.json" in members  # prebuilt
    assert root + "labextension/src/panel.tsx" in members  # and its source
    assert not [m for m in members if "node_modules" in m or "/.hypothesis" in m]
