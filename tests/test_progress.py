"""kblampp.progress: tqdm bars on a terminal, one status line per interval (and one at the end) in a log."""
from __future__ import annotations

import io

import pytest
from tqdm.auto import tqdm

from kblampp.progress import LineProgress, format_duration, format_rate, progress_bar, use_bars


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_status_lines_every_interval_with_rate_eta_and_postfix():
    clock, out = Clock(), io.StringIO()
    bar = LineProgress(total=100, desc="retrieval", unit="step", interval=10, stream=out, clock=clock)
    for _ in range(39):  # 39 steps in 9.75 s: no line yet (under the interval)
        clock.t += 0.25
        bar.update(1)
    assert out.getvalue() == ""
    bar.set_postfix({"loss": "0.5000", "q/s": "2000"})
    clock.t += 0.25
    bar.update(1)  # step 40 at 10 s: the first line
    clock.t += 20.0
    bar.update(60)  # the last step: only the final line reports it
    bar.close()
    bar.close()  # closing twice prints once
    assert out.getvalue().splitlines() == [
        "retrieval: 40/100 step (40%), elapsed 10s, 4 step/s, ETA 15s, loss=0.5000 q/s=2000",
        "retrieval: 100/100 step (100%), done in 30s, 3.33 step/s, loss=0.5000 q/s=2000",
    ]


def test_iteration_resume_offset_and_unknown_total():
    clock, out = Clock(), io.StringIO()
    items = []
    bar = LineProgress(range(3), desc="worlds", interval=60, stream=out, clock=clock)
    for i in bar:
        clock.t += 2
        items.append(i)
    assert items == [0, 1, 2] and out.getvalue() == "worlds: 3/3 it (100%), done in 6s, 2 s/it\n"
    out = io.StringIO()
    resumed = LineProgress(total=10, desc="e2e", unit="step", initial=6, interval=0, stream=out, clock=clock)
    clock.t += 4
    resumed.update(2)  # the rate counts the steps of this run only (2 in 4 s), not the resumed 6
    assert out.getvalue() == "e2e: 8/10 step (80%), elapsed 4s, 2 s/step, ETA 4s\n"
    out = io.StringIO()
    open_ended = LineProgress(desc="lines", interval=0, stream=out, clock=clock)
    clock.t += 1
    open_ended.update(5)
    open_ended.close()
    assert out.getvalue().splitlines() == ["lines: 5 it, elapsed 1s, 5 it/s", "lines: 5 it, done in 1s, 5 it/s"]


def test_formatting_helpers():
    assert [format_duration(s) for s in (0.4, 12.3, 59.6, 754, 4000)] == ["0s", "12s", "1:00", "12:34", "1:06:40"]
    assert format_rate(0, "q") == "- q/s" and format_rate(41.04, "sent") == "41 sent/s"
    assert format_rate(0.25, "q") == "4 s/q" and format_rate(2512.4, "q") == "2512 q/s"


def test_mode_follows_the_terminal_and_the_environment(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("KBLAMPP_PROGRESS", raising=False)
    assert use_bars(Tty()) and not use_bars(io.StringIO())
    monkeypatch.setenv("KBLAMPP_PROGRESS", "lines")
    assert not use_bars(Tty())
    assert isinstance(progress_bar(total=3, desc="x"), LineProgress)
    disabled = progress_bar(total=3, desc="x", disable=True)
    assert isinstance(disabled, tqdm) and disabled.disable
    monkeypatch.setenv("KBLAMPP_PROGRESS", "bar")
    assert use_bars(io.StringIO())
    bar = progress_bar(total=3, desc="x", file=io.StringIO())
    assert isinstance(bar, tqdm) and not bar.disable
    bar.close()


def test_embedding_off_a_terminal_writes_lines_not_carriage_returns(tmp_path, capsys, monkeypatch):
    """The real code path (Embedder.encode) with stderr captured (not a terminal): one final line."""
    from kblampp.embedding import load_embedder
    from test_embedding import make_tiny_embedder_dir

    monkeypatch.delenv("KBLAMPP_PROGRESS", raising=False)
    emb = load_embedder(str(make_tiny_embedder_dir(tmp_path / "emb")))
    capsys.readouterr()
    emb.encode(["a b c"] * 200, batch_size=8)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("embed ")]
    assert "\r" not in err and len(lines) >= 1
    assert lines[-1].startswith(f"embed {emb.name}: 200/200 sent (100%), done in ")


@pytest.mark.parametrize("interval", ["0.5", "nonsense"])
def test_interval_from_the_environment(monkeypatch, interval):
    monkeypatch.setenv("KBLAMPP_PROGRESS_INTERVAL", interval)
    assert LineProgress(total=1).interval == (0.5 if interval == "0.5" else 30.0)
