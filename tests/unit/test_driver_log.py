"""What a sandboxed driver logs (hostgroup._driver_log) reaches the Device Manager's log as one line, as written."""

from sandbox.output import escape_controls


def test_a_driver_cannot_forge_lines_or_drive_the_terminal():
    forged = "ok\n2026-11-25 drvbox: stopping\r\x1b[2J\x1b]0;title\x07\x9b31m\x7f"
    out = escape_controls(forged)
    assert "\n" not in out and "\r" not in out and "\x1b" not in out and "\x07" not in out
    assert "\x9b" not in out and "\x7f" not in out
    assert out == "ok\\x0a2026-11-25 drvbox: stopping\\x0d\\x1b[2J\\x1b]0;title\\x07\\x9b31m\\x7f"


def test_ordinary_text_is_left_alone():
    assert escape_controls("COM1: baud 9600, ünïcödé ✓") == "COM1: baud 9600, ünïcödé ✓"
