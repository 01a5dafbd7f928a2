"""Turn a job's raw output into lines the way a terminal would show them.

Progress bars (tqdm and friends) redraw one line with ``\\r`` thousands of
times; only the last drawing of each line is kept.
"""

from __future__ import annotations


def collapse(line: str) -> str:
    """What a terminal shows for one line: the text after its last carriage return."""
    return line.rstrip("\r").rsplit("\r", 1)[-1]


class LineAssembler:
    """Feed chunks of output; get back finished lines and the line being drawn."""

    def __init__(self) -> None:
        self._partial = ""

    def feed(self, text: str) -> tuple[list[str], str]:
        """Add ``text``; return (completed lines, the current unfinished line)."""
        parts = (self._partial + text).split("\n")
        self._partial = parts.pop()
        # Keep the raw tail only from its last \r on: it is all that can show.
        if "\r" in self._partial.rstrip("\r"):
            self._partial = "\r" + collapse(self._partial)
        return [collapse(p) for p in parts], collapse(self._partial)

    @property
    def partial(self) -> str:
        return collapse(self._partial)


def render(text: str) -> str:
    """The whole ``text`` as a terminal would finally show it."""
    lines, partial = LineAssembler().feed(text)
    return "\n".join([*lines, partial]) if partial else "\n".join(lines) + ("\n" if lines else "")
