"""Progress for long loops: a tqdm bar when stderr is a terminal, plain status lines otherwise.

Why: in a log file (`job > log 2>&1`) every carriage-return redraw of a bar is kept, so logs grow to
hundreds of KB and cannot be read. Off a terminal, `progress_bar(...)` prints one line every
`KBLAMPP_PROGRESS_INTERVAL` seconds (default 30) and one when the loop ends, each with count,
rate, elapsed time and ETA. KBLAMPP_PROGRESS=bar|lines forces a mode.

`progress_bar` takes the tqdm arguments this project uses (iterable, total, desc, unit, initial, disable)
and returns an object with tqdm's update / set_postfix / set_description / close / iteration.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

MODE_ENV = "KBLAMPP_PROGRESS"
INTERVAL_ENV = "KBLAMPP_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0


def use_bars(stream: TextIO | None = None) -> bool:
    """Bars only on a terminal (or when KBLAMPP_PROGRESS=bar); KBLAMPP_PROGRESS=lines forces lines."""
    mode = os.environ.get(MODE_ENV, "").strip().lower()
    if mode in ("bar", "lines"):
        return mode == "bar"
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def interval_s() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


def format_duration(seconds: float) -> str:
    """12.3 -> '12s', 754 -> '12:34', 4000 -> '1:06:40'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def format_rate(rate: float, unit: str) -> str:
    if rate <= 0:
        return f"- {unit}/s"
    if rate >= 100:
        return f"{rate:.0f} {unit}/s"
    return f"{rate:.3g} {unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{unit}"


class LineProgress:
    """tqdm's interface, printing `desc: n/total (p%), rate, elapsed, ETA, postfix` lines instead of a bar."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str | None = None,
                 unit: str = "it", initial: int = 0, interval: float | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc or "progress", unit
        self.n = self.initial = initial
        self.interval = interval_s() if interval is None else interval
        self.stream, self.clock = stream, clock
        self.start = self.last_print = clock()
        self.postfix = ""
        self.closed = False

    # ---- tqdm interface --------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        try:
            for item in () if self.iterable is None else self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last_print >= self.interval and (self.total is None or self.n < self.total):
            self.last_print = now
            self._print(self.line(now))

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = " ".join(f"{k}={v}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or self.desc

    def refresh(self) -> None:
        pass

    def write(self, text: str) -> None:
        self._print(text)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._print(self.line(self.clock(), final=True))

    # ---- the status line -------------------------------------------------------------------------
    def line(self, now: float, final: bool = False) -> str:
        elapsed = max(now - self.start, 0.0)
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        parts = [f"{self.desc}: {count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if final:
            parts.append(f"done in {format_duration(elapsed)}")
        else:
            parts.append(f"elapsed {format_duration(elapsed)}")
        parts.append(format_rate(rate, self.unit))
        if not final and self.total is not None and rate > 0:
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _print(self, text: str) -> None:
        stream = self.stream or sys.stderr
        print(text, file=stream, flush=True)


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
             unit: str = "it", initial: int = 0, disable: bool = False, **tqdm_kwargs: Any):
    """A tqdm bar on a terminal, a LineProgress off it, tqdm(disable=True) when disabled."""
    if disable or use_bars():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, **tqdm_kwargs)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)


def status(message: str, stream: TextIO | None = None) -> None:
    """One progress line (stderr, flushed) for work that is not a loop, e.g. an evaluation row done."""
    print(message, file=stream or sys.stderr, flush=True)


def quiet_library_bars() -> None:
    """Off a terminal, turn off the bars of transformers / huggingface_hub too (weight loading,
    downloads): their redraws would otherwise fill the log. Bars stay on a terminal."""
    if use_bars():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
