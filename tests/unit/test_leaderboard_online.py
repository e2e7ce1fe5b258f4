"""The leaderboard's online path (core/runlog.read_online_project, models/evaluation/leaderboard.collect_runs).

No W&B server is reachable from a test machine: ``wandb.Api`` is replaced by a fake at that one boundary (its
``runs(path)`` returns objects with the public API's ``id``, ``name``, ``config`` and ``summary``, the summary laid out
as the trainer writes it, core/metrics.py). Everything after the boundary is the real code."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import wandb

from core.runlog import RunData
from models.evaluation.leaderboard import collect_runs, format_table, rank_rows, summarize

CONFIG = {"name": "xl", "model": {"type": "LightningDiT-XL/1"}, "sampling": {"cfg_scale": 1.5}}


def _summary(best_fid: float, best_is: float, best_step: int, final_fid=None) -> dict:
    s = {
        "eval/fid": {"min": best_fid, "last": best_fid + 1},
        "best/fid": best_fid,
        "best/is": best_is,
        "best/precision": 0.7,
        "best/recall": 0.6,
        "best/num_samples": 10000,
        "best/step": best_step,
        "best/epoch": best_step / 100,
        "epoch": 8.0,
        "_step": 800,
    }
    if final_fid is not None:
        s.update({"final/fid": final_fid, "final/is": 250.0, "final/num_samples": 50000})
    return s


class FakeApi:
    calls: list = []
    projects = {
        "team/proj": [
            SimpleNamespace(id="aaa", name="xl", config=CONFIG, summary=_summary(3.0, 200.0, 400, final_fid=2.2)),
            SimpleNamespace(id="bbb", name="b", config=CONFIG, summary=_summary(5.0, 150.0, 600)),
            SimpleNamespace(id="aaa", name="xl", config=CONFIG, summary=_summary(3.0, 200.0, 400, final_fid=2.2)),
        ]
    }

    def runs(self, path, per_page=50, **kwargs):
        FakeApi.calls.append(path)
        return iter(self.projects[path])


@pytest.fixture
def fake_api(monkeypatch):
    FakeApi.calls = []
    monkeypatch.setattr(wandb, "Api", FakeApi)
    return FakeApi


def test_one_query_per_project_runs_deduplicated_and_summaries_ranked(fake_api, tmp_path):
    runs = collect_runs([], ["team/proj"])
    assert fake_api.calls == ["team/proj"]  # one query for the whole project
    assert sorted(r.run_id for r in runs) == ["aaa", "bbb"]  # the run listed twice is one run
    rows = rank_rows([summarize(r) for r in runs])
    top = rows[0]
    assert (top.run_id, top.fid, top.is_, top.precision, top.steps, top.epochs) == ("aaa", 3.0, 200.0, 0.7, 400, 4.0)
    assert (top.num_samples, top.final_fid, top.final_is, top.final_num_samples) == (10000, 2.2, 250.0, 50000)
    assert (top.last_step, top.cfg, top.model) == (800, 1.5, "LightningDiT-XL/1")
    assert (rows[1].run_id, rows[1].fid, rows[1].final_fid) == ("bbb", 5.0, None)
    table = format_table(rows).splitlines()
    assert "FID in-loop" in table[0] and "FID final" in table[0] and "2.200" in table[2] and "50000" in table[2]


def test_a_run_directory_and_its_online_copy_are_one_row(fake_api, monkeypatch):
    """The local copy (full history, eval records) wins; the online copy adds the final evaluation it lacks."""
    import models.evaluation.leaderboard as lb

    local = RunData(run_id="aaa", name="xl", source="runs/xl/wandb", config=CONFIG, run_dir="runs/xl")
    local.history = {200: {"eval/fid": 4.0, "epoch": 2.0}, 400: {"eval/fid": 3.0, "eval/is": 201.0, "epoch": 4.0}}
    monkeypatch.setattr(lb, "discover_runs", lambda roots: [local])
    runs = collect_runs(["runs"], ["team/proj"])
    assert sorted(r.run_id for r in runs) == ["aaa", "bbb"]
    (mine,) = [r for r in runs if r.run_id == "aaa"]
    assert mine is local and mine.final["fid"] == 2.2
    row = summarize(mine)
    assert (row.fid, row.is_, row.curve, row.final_fid) == (3.0, 201.0, [(2.0, 4.0), (4.0, 3.0)], 2.2)


def test_an_unreachable_project_is_a_warning(monkeypatch, capsys):
    def no_network():
        raise ConnectionError("no route to api.wandb.ai")

    monkeypatch.setattr(wandb, "Api", no_network)
    assert collect_runs([], ["team/proj"]) == []
    assert "cannot read W&B project team/proj: ConnectionError: no route to api.wandb.ai" in capsys.readouterr().err
