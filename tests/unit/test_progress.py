"""core/progress.py: a bar on a terminal, periodic log lines (step/total, rate, ETA) in a batch log."""

from __future__ import annotations

import io
import logging
import re

from core.progress import Progress, format_duration, progress_mode
from data.extract import extract, load_extract_config

from test_extract import CONFIG


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_terminal_and_the_environment(monkeypatch):
    monkeypatch.delenv("LLAT_PROGRESS", raising=False)
    assert progress_mode(_Tty()) == "bar"
    assert progress_mode(io.StringIO()) == "log"
    monkeypatch.setenv("LLAT_PROGRESS", "off")
    assert progress_mode(_Tty()) == "off"
    monkeypatch.setenv("LLAT_PROGRESS", "log")
    assert progress_mode(_Tty()) == "log"
    assert Progress(10, desc="x", enabled=False).mode == "off"
    assert [format_duration(s) for s in (0.4, 65, 3725)] == ["0s", "1m05s", "1h02m05s"]


def test_log_lines_carry_step_total_rate_and_eta(monkeypatch):
    monkeypatch.setenv("LLAT_PROGRESS", "log")
    clock = iter([100.0, 102.0, 104.0, 104.0, 104.0, 106.0, 106.0, 106.0])
    monkeypatch.setattr("core.progress.time.monotonic", lambda: next(clock))
    logger = logging.getLogger("test_progress.lines")
    stream = io.StringIO()
    monkeypatch.setattr(logger, "handlers", [logging.StreamHandler(stream)])
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "level", logging.INFO)
    with Progress(10, desc="sampling", unit="img", initial=2, interval_s=3.0, logger=logger) as bar:
        bar.update(2)  # t=102: 2 s since the last line < 3 s: no line
        bar.update(2)  # t=104: a line; 4 images in 4 s
        bar.set_postfix(skipped=1)
        bar.update(4)  # t=106: 2 s since the last line: none until close
    lines = stream.getvalue().splitlines()
    assert lines == [
        "sampling: 6/10 img (60.0%), 1.0 img/s, ETA 4s",
        "sampling: 10/10 img (100.0%), 1.3 img/s, done in 6s, skipped=1",
    ]
    assert not any("GPU" in line for line in lines)  # no CUDA here: nothing to report


def test_without_logging_set_up_the_lines_go_to_stderr(monkeypatch, capsys):
    monkeypatch.setenv("LLAT_PROGRESS", "log")
    logger = logging.getLogger("test_progress.bare")
    monkeypatch.setattr(logger, "propagate", False)  # no handler anywhere: a plain command line
    with Progress(4, desc="features", unit="img", interval_s=3600, logger=logger) as bar:
        bar.update(4)
    assert re.fullmatch(r"features: 4/4 img \(100\.0%\), [\d.]+ img/s, done in 0s\n", capsys.readouterr().err)


def test_extraction_writes_progress_lines_without_a_terminal(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("LLAT_PROGRESS", "log")
    monkeypatch.setenv("LLAT_PROGRESS_INTERVAL", "0")
    overrides = [f"out_dir={tmp_path}", "source.num_samples=8", "source.image_size=8", "chunk_size=4"]
    overrides += ["batch_size=4", "num_workers=0", "progress_bar=true"]
    caplog.set_level(logging.INFO, logger="data.extract")
    extract(load_extract_config(CONFIG, overrides))
    err = caplog.text
    assert re.search(r"extract \(rank 0 of 1, its 2 chunk\(s\)\): 4/8 img \(50\.0%\), [\d.]+ img/s, ETA \d+s", err)
    assert re.search(r"extract \(rank 0 of 1, its 2 chunk\(s\)\): 8/8 img \(100\.0%\), [\d.]+ img/s, done in", err)
    assert "\r" not in err  # no bar
