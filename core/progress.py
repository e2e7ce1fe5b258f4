"""Progress of a long loop that fits a terminal and a batch system alike.

``Progress(total, desc=...)`` draws a tqdm bar when stderr is a terminal; otherwise (a Slurm job's log file, a
pipe) it writes a log line every ``interval_s`` seconds and one at the end::

    extract (rank 0 of 8): 51200/1281167 img (4.0%), 612.3 img/s, ETA 33m30s, peak GPU mem 11.52 GiB

(step/total, rate over this run, ETA, and the peak GPU memory when CUDA is in use). ``LLAT_PROGRESS`` forces a
mode: ``bar``, ``log`` or ``off``; ``LLAT_PROGRESS_INTERVAL`` sets the seconds between log lines (default 60).
A disabled ``Progress`` (``enabled=False``, e.g. on ranks other than 0) does nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Optional

import torch
from tqdm import tqdm

__all__ = ["Progress", "format_duration", "progress_mode"]

DEFAULT_INTERVAL_S = 60.0
_log = logging.getLogger(__name__)


def progress_mode(stream: Any = None) -> str:
    """``bar`` on a terminal, else ``log``; ``LLAT_PROGRESS`` (bar / log / off) overrides."""
    forced = os.environ.get("LLAT_PROGRESS", "").strip().lower()
    if forced in ("bar", "log", "off"):
        return forced
    stream = sys.stderr if stream is None else stream
    try:
        return "bar" if stream.isatty() else "log"
    except (AttributeError, ValueError):  # closed or not a file
        return "log"


def format_duration(seconds: float) -> str:
    """1h02m03s / 4m05s / 6s."""
    s = max(int(round(seconds)), 0)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _peak_gpu_memory() -> Optional[str]:
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return None
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    except Exception:  # noqa: BLE001 - progress must never break the job
        return None


class Progress:
    """A tqdm bar on a terminal, periodic log lines otherwise (module docstring). Use as a context manager or
    call ``close()``."""

    def __init__(
        self,
        total: Optional[int],
        *,
        desc: str,
        unit: str = "it",
        initial: int = 0,
        enabled: bool = True,
        interval_s: Optional[float] = None,
        logger: Optional[logging.Logger] = None,
        leave: bool = True,
        stream: Any = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = int(initial)
        self._start_n = self.n
        self.postfix: dict[str, Any] = {}
        self.mode = progress_mode(stream) if enabled else "off"
        if interval_s is None:
            interval_s = float(os.environ.get("LLAT_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S) or DEFAULT_INTERVAL_S)
        self.interval_s = float(interval_s)
        self.log = logger or _log
        self._t0 = self._last = time.monotonic()
        self._bar = None
        self._closed = False
        if self.mode == "bar":
            self._bar = tqdm(
                total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, smoothing=0.1, leave=leave
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += int(n)
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "log" and time.monotonic() - self._last >= self.interval_s:
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        self.postfix.update(values)
        if self._bar is not None:
            self._bar.set_postfix(self.postfix, refresh=False)

    def line(self) -> str:
        """The current log line (also what the log mode writes)."""
        elapsed = time.monotonic() - self._t0
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}: {self.n}/{self.total if self.total is not None else '?'} {self.unit}"]
        if self.total:
            parts[0] += f" ({100.0 * self.n / self.total:.1f}%)"
        parts.append(f"{rate:.1f} {self.unit}/s")
        if self.total is not None and rate > 0 and self.n < self.total:
            parts.append(f"ETA {format_duration((self.total - self.n) / rate)}")
        elif self.total is not None and self.n >= self.total:
            parts.append(f"done in {format_duration(elapsed)}")
        memory = _peak_gpu_memory()
        if memory:
            parts.append(f"peak GPU mem {memory}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def _emit(self) -> None:
        self._last = time.monotonic()
        if self.log.hasHandlers() and self.log.isEnabledFor(logging.INFO):
            self.log.info("%s", self.line())
        else:  # logging not set up for INFO (a plain command line): the line must still reach the job's log
            print(self.line(), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "log" and self.n > self._start_n:
            self._emit()
