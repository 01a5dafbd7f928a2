"""Progress-bar output collapsed the way a terminal shows it."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

from cumulus_jupyter.kernel.logstream import LineAssembler, render
from cumulus_jupyter.kernel.magics import LiveOutput


def test_assembler_keeps_the_last_drawing_of_each_line():
    a = LineAssembler()
    assert a.feed("hello\n 10%") == (["hello"], " 10%")
    assert a.feed("\r 20%\r 30%") == ([], " 30%")
    assert a.feed("\rdone\nnext") == (["done"], "next")
    assert a.feed("\r\n") == (["next"], "")  # Windows line ends too


def test_assembler_memory_stays_bounded_under_endless_redraws():
    a = LineAssembler()
    for i in range(10_000):
        a.feed(f"\r{i:5d}/10000")
    assert a.partial == " 9999/10000"
    assert len(a._partial) < 20


def test_render_a_whole_log():
    assert render("a\r\nb 1%\rb 100%\nc") == "a\nb 100%\nc"
    assert render("x\n") == "x\n"


def test_live_output_in_a_terminal_redraws_with_carriage_returns():
    buf = io.StringIO()
    with redirect_stdout(buf):
        out = LiveOutput()
        out.feed("start\n 10%")
        out.feed("\r 50%")
        out.feed("\r100%\nend\n")
        out.close()
    assert buf.getvalue() == "start\n\r 10%\r 50%\r100%\nend\n"
