"""The JupyterLab panel's copies of Python constants agree with their sources.

The panel (TypeScript) cannot import Python, so it holds a few constants of
its own; each names its source in a comment, and these tests read them out
of the TypeScript source to check that they still say the same.
"""

from __future__ import annotations

import re
from pathlib import Path

from cumulus_jupyter import metrics, states

SRC = Path(__file__).resolve().parent.parent / "labextension" / "src"


def quoted(text: str) -> set[str]:
    """The single-quoted string literals in ``text``."""
    return set(re.findall(r"'([^'\\]*)'", text))


def ts_set(file: str, name: str) -> set[str]:
    """The strings of ``export const NAME ... = new Set...([...])`` in ``labextension/src/FILE``."""
    source = (SRC / file).read_text()
    match = re.search(
        rf"export const {name}\b[^=]*=\s*new Set(?:<\w+>)?\(\s*\[(.*?)\]\s*\)", source, re.S
    )
    assert match, f"no `export const {name} = new Set([...])` in {file}"
    return quoted(match.group(1))


def ts_union(file: str, name: str) -> set[str]:
    """The strings of ``export type NAME = 'a' | 'b' ...;`` in ``labextension/src/FILE``."""
    source = (SRC / file).read_text()
    match = re.search(rf"export type {name}\s*=(.*?);", source, re.S)
    assert match, f"no `export type {name} = ...;` in {file}"
    return quoted(match.group(1))


def test_the_panels_active_states_are_states_active():
    assert ts_set("api.ts", "ACTIVE") == {s.value for s in states.ACTIVE}


def test_the_panels_position_fields_are_metrics_position_fields():
    assert ts_set("metrics.ts", "POSITION_FIELDS") == set(metrics.POSITION_FIELDS)


def test_the_panels_job_states_and_actions_are_the_lifecycles():
    assert ts_union("api.ts", "JobState") == {s.value for s in states.JobState}
    assert ts_union("api.ts", "JobAction") == {a.value for a in states.Action}
