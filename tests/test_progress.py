"""Progress output: bars on a terminal, timed plain lines in logs, nothing when silenced."""

from __future__ import annotations

import effdeploy.progress as prog


def test_logs_a_plain_line_per_interval_when_not_a_terminal(monkeypatch, capsys) -> None:
    monkeypatch.delenv("EFFDEPLOY_PROGRESS", raising=False)
    monkeypatch.setattr(prog, "LOG_INTERVAL_S", 0.0)  # every item is "a minute later"
    assert list(prog.progress(range(3), desc="adaround", unit="layer")) == [0, 1, 2]
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3
    assert all(line.startswith(f"  adaround: {i}/3 layer (") for i, line in enumerate(lines))
    bar = prog.progress(range(1), desc="epoch 1/2", unit="step")
    bar.set_postfix(loss="0.500")  # what the trainer shows on a bar
    assert list(bar) == [0]
    assert capsys.readouterr().err.strip().endswith("s) loss=0.500")


def test_quiet_between_intervals_and_when_silenced(monkeypatch, capsys) -> None:
    monkeypatch.delenv("EFFDEPLOY_PROGRESS", raising=False)
    assert list(prog.progress(iter(range(5)), desc="x")) == list(range(5))  # no len(): still works
    assert capsys.readouterr().err == ""  # under a minute: no line
    monkeypatch.setenv("EFFDEPLOY_PROGRESS", "0")
    monkeypatch.setattr(prog, "LOG_INTERVAL_S", 0.0)
    assert list(prog.progress(range(2))) == [0, 1]
    assert capsys.readouterr().err == ""
