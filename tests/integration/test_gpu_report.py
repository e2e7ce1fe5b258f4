"""tools/gpu_report.py: the --smoke report (every section, CPU, tiny sizes) is written with every section present, a
step that runs over its cap is killed and reported while the report goes on, and --prepare asks pip for wheels of the
GPU machine's Python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools import gpu_report

REPO = Path(__file__).resolve().parents[2]


def test_smoke_report_has_every_section(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # DeepSpeed's CPU path JIT-builds a communication op (a minute): its section is skipped here (its engine has
    # tests of its own); it must still be listed, with the reason.
    proc = subprocess.run(
        [sys.executable, "tools/gpu_report.py", "--smoke", "--out", str(out), "--skip", "train_deepspeed"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    log = (out / "report.log").read_text()
    names = [s.name for s in gpu_report.sections(smoke=True)]
    assert [s["name"] for s in data["sections"]] == names
    assert data["finished"] and data["smoke"] and data["env"]["torch"]
    for s in data["sections"]:
        assert f"## {s['name']}:" in md
        if s["name"] == "train_deepspeed":
            assert s["status"] == "skipped" and s["reason"] == "--skip"
            continue
        assert s["status"] == "ok", (s, log[-3000:])
        for step in s["steps"]:
            assert step["status"] == "ok" and step["tables"] and step["tables"][0], step
            assert step["command"].startswith("python tools/")
    rows = {s["name"]: [r for st in s["steps"] for t in st["tables"] for r in t] for s in data["sections"]}
    assert all(r["host syncs"] == "n/a (cpu)" for r in rows["train"] if "host syncs" in r)
    assert any("host syncs" in r for r in rows["train"])
    assert {r["save"] for r in rows["checkpoint"]} == {0, 1}
    assert {r["schema"] for r in rows["data"]} == {"latent", "image"}
    assert all(r["ok"] == "yes" for r in rows["sample"])
    assert "| section | status | seconds |" in md and "command: `python tools/gpu_report.py --smoke" in md


def _sleeper(argv):
    time.sleep(60)
    return 0


def _crasher(argv):
    print("about to fail")
    raise RuntimeError("boom")


@pytest.mark.parametrize("entry,status", [(_sleeper, "timeout"), (_crasher, "failed")])
def test_a_step_over_its_cap_or_crashing_is_reported(tmp_path, monkeypatch, entry, status):
    monkeypatch.setattr(gpu_report, "_step_entry", lambda step: entry)
    t0 = time.monotonic()
    got, code, seconds = gpu_report.run_step(
        gpu_report.Step("x", [], 1), 1.0, "fork", tmp_path / "log", dict(os.environ)
    )
    assert got == status and time.monotonic() - t0 < 30
    if status == "failed":
        text = (tmp_path / "log").read_text()
        assert code == 1 and "about to fail" in text and "RuntimeError: boom" in text


def test_parse_tables_reads_format_table():
    from core.metrics import format_table

    text = (
        "header line\n"
        + format_table([{"a": 1, "b": 2.5, "c": "x y"}, {"a": 2, "b": float("nan"), "c": "z"}])
        + "\nfooter"
    )
    tables, notes = gpu_report.parse_tables(text)
    assert tables == [[{"a": 1, "b": 2.5, "c": "x y"}, {"a": 2, "b": tables[0][1]["b"], "c": "z"}]]
    assert notes == ["header line", "footer"]


def test_prepare_plans_every_wheel_for_the_gpu_machines_python(tmp_path):
    planned = gpu_report.prepare(tmp_path, "3.12", dry_run=True)
    downloads = [c for c in planned if "download" in c]
    assert len(downloads) == len(gpu_report.PREPARE_DISTS)
    for c in downloads:
        assert c[c.index("--python-version") + 1] == "3.12" and "--no-deps" in c and "--only-binary=:all:" in c
    assert any(c[-1].startswith("mosaicml-streaming==") for c in downloads)
    build = [c for c in planned if "wheel" in c]
    assert len(build) == 1 and build[0][-1].startswith("deepspeed==") and "--no-deps" in build[0]


def test_prepare_downloads_a_real_wheel_and_writes_the_install_script(tmp_path):
    """For real, through pip and the package registry (reachable from this machine and CI): one small wheel."""
    assert gpu_report.prepare(tmp_path, "3.12", dists=("xxhash",), build=()) == 0
    wheels = [p.name for p in tmp_path.glob("*.whl")]
    assert len(wheels) == 1 and wheels[0].startswith("xxhash-") and "cp312" in wheels[0], wheels
    script = (tmp_path / "install.sh").read_text()
    assert "--no-index" in script and "--no-deps" in script and os.access(tmp_path / "install.sh", os.X_OK)
