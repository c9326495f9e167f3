"""Progress off a terminal: plain lines for long work, nothing for short."""

from __future__ import annotations

import pytest

from fedlm import progress


def test_off_a_terminal_long_work_prints_lines_and_short_work_none(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    assert not progress.console.is_terminal  # pytest captures stderr

    with progress.progress_bar("short", unit="steps") as update:
        for step in range(1, 4):
            clock[0] += 1.0
            update(step, 3)
    assert capsys.readouterr().err == ""

    with progress.progress_bar("value", unit="coalitions") as update:
        for done in range(1, 8):
            clock[0] += 20.0  # a line at 40 s (the first past 30 s), 80 s and 120 s, then the end at 140 s
            update(done, 7)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["value: 2/7 coalitions (29%), 40 s, ETA 100 s",
                     "value: 4/7 coalitions (57%), 80 s, ETA 60 s",
                     "value: 6/7 coalitions (86%), 120 s, ETA 20 s",
                     "value: 7/7 coalitions (100%), 140 s"]


def test_off_a_terminal_a_status_prints_its_latest_message_every_30_s(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    with progress.status("value") as say:
        for i in range(1, 5):
            clock[0] += 25.0
            say(f"retraining coalition {i} of 4")
    assert capsys.readouterr().err.splitlines() == ["value: retraining coalition 2 of 4, 50 s",
                                                    "value: retraining coalition 4 of 4, 100 s"]
