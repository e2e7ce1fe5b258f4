"""launchers/slurm.py before anything queues: preflight refusals (every problem at once, each naming its key and
what to do, nothing submitted), path resolution, the cluster profile, pipeline files and --dry-run output.

In process, no cluster: ``SLURM_CONF`` names a missing file (sinfo is not asked), ``--no-snapshot`` in dry runs
(no git call), and ``launchers.slurm.submit`` is replaced by a sentinel that fails the test if a job would be
submitted (the one boundary here: sbatch; tests/integration/test_slurm_pipeline.py submits for real).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_cluster(monkeypatch, tmp_path):
    from launchers import slurm

    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no-slurm.conf"))
    monkeypatch.setenv("LLAT_SLURM_PROFILE", "none")

    def refuse(*args, **kwargs):
        raise AssertionError("a job was submitted")

    monkeypatch.setattr(slurm, "submit", refuse)
    monkeypatch.chdir(tmp_path)


def run(*argv: str) -> tuple[int, str, str]:
    from launchers import slurm

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = slurm.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def data_dir(root: Path, index=True, stats=True, manifest=True) -> Path:
    d = root / "latents"
    d.mkdir(parents=True, exist_ok=True)
    if index:
        (d / "index.json").write_text(json.dumps({"version": 2, "shards": [{"samples": 64}]}))
    if stats:
        (d / "latents_stats.pt").write_bytes(b"x")
    if manifest:
        (d / "manifest.json").write_text("{}")
    return d


CPU = ("--gpus-per-node", "0", "--tasks-per-node", "2")


def test_train_missing_data_is_refused_with_the_extraction_command(tmp_path):
    code, out, err = run(str(REPO / "configs/tiny_dit.yaml"), *CPU, "data.path=rel/latents", "run_dir=run")
    assert code == 2 and out == ""
    assert "preflight found 1 problem; nothing was submitted" in err
    # the relative path is reported (and would be run) as an absolute one
    assert f"data.path: training data directory not found: {tmp_path / 'rel/latents'}" in err
    assert f"launchers/slurm.py extract configs/extract_<dataset>.yaml out_dir={tmp_path / 'rel/latents'}" in err
    assert not (tmp_path / "run").exists()


def test_every_problem_is_reported_at_once(tmp_path):
    d = data_dir(tmp_path, index=False, stats=False, manifest=False)
    (tmp_path / "afile").write_text("")
    code, _, err = run(
        str(REPO / "configs/tiny_dit.yaml"),
        *CPU,
        f"data.path={d}",
        "model.init_from=missing_init.pt",
        "eval.every_epochs=1",
        "eval.reference=ref.npz",
        "run_dir=afile/run",
    )
    assert code == 2
    expected = [
        f"data.path: MDS index index.json not found: {d / 'index.json'}",
        f"data.latent_norm: latent statistics latents_stats.pt not found: {d / 'latents_stats.pt'}",
        f"data.path: manifest.json (names the tokenizer that decodes the samples) not found: {d / 'manifest.json'}",
        f"eval.reference: reference batch not found: {tmp_path / 'ref.npz'}",
        "eval.feature_extractor_weights: not set: the job needs weights of the inception-v3-compat feature extractor",
        f"model.init_from: checkpoint to initialise from not found: {tmp_path / 'missing_init.pt'}",
        f"run_dir: {tmp_path / 'afile'} is not a directory, so {tmp_path / 'afile/run'} cannot be created",
    ]
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"
    assert f"preflight found {len(expected)} problems" in err, err  # each once (latents_stats.pt is read twice)
    assert "weights-inception-2015-12-05-6726825d.pth" in err  # what to do


def test_complete_inputs_pass_and_paths_are_absolute(tmp_path):
    d = data_dir(tmp_path)
    code, out, err = run(
        str(REPO / "configs/tiny_dit.yaml"), *CPU, "--dry-run", "--no-snapshot", "data.path=latents", "run_dir=run"
    )
    assert code == 0, err
    assert "preflight" not in err
    resolved = yaml.safe_load(out.split("# ---- resolved train config ----")[1].split("# ----")[0])
    assert resolved["data"]["path"] == str(d) and resolved["run_dir"] == str(tmp_path / "run")
    assert "#SBATCH --cpus-per-task=1" in out  # data.num_workers (0) + 1
    assert f"export PYTHONPATH={REPO}" in out and "export PYTHONSAFEPATH=1" in out


def test_extract_inputs(tmp_path):
    code, _, err = run(
        str(REPO / "configs/extract_synthetic.yaml"),
        "--job",
        "extract",
        *CPU,
        "source.kind=folder",
        "source.path=imagenet/train",
        "tokenizer.kind=vavae",
        "tokenizer.kwargs={checkpoint: vavae.pt}",
        "features.enabled=true",
        "features.weights=dinov2.pth",
        "out_dir=out",
    )
    assert code == 2
    for text in (
        f"source.path: image folder not found: {tmp_path / 'imagenet/train'}",
        f"tokenizer.kwargs.checkpoint: tokenizer checkpoint not found: {tmp_path / 'vavae.pt'}",
        f"features.weights: DINOv2 weights not found: {tmp_path / 'dinov2.pth'}",
    ):
        assert text in err, err


def test_sample_and_evaluate_inputs(tmp_path):
    d = data_dir(tmp_path)
    code, _, err = run(
        "sample", str(REPO / "configs/tiny_dit.yaml"), *CPU, f"data.path={d}", "run_dir=run", "--", "--num", "100"
    )
    assert code == 2
    assert f"run_dir: no complete checkpoint in {tmp_path / 'run/checkpoints'} to sample from" in err
    code, _, err = run("sample", str(REPO / "configs/tiny_dit.yaml"), f"data.path={d}")
    assert code == 2 and "sample: give tools/sample.py's --num" in err
    code, _, err = run(
        "evaluate", str(REPO / "configs/tiny_dit.yaml"), "--", "s.npz", "--reference", "ref", "--json", "m.json"
    )
    assert code == 2
    assert f"samples: samples to evaluate not found: {tmp_path / 's.npz'}" in err
    assert f"eval.reference: reference batch not found: {tmp_path / 'ref'}" in err
    assert "eval.feature_extractor_weights: not set" in err


def test_cluster_profile_and_after(tmp_path):
    data_dir(tmp_path)
    profile = tmp_path / "site.yaml"
    profile.write_text(
        "partition: gpu\naccount: proj\nqos: normal\nconstraint: h100\nsetup: [module load cuda]\n"
        "kinds:\n  train: {time_min: 600}\n"
    )
    code, out, err = run(
        "train",
        str(REPO / "configs/tiny_dit.yaml"),
        "--dry-run",
        "--no-snapshot",
        "--profile",
        str(profile),
        "--qos",
        "high",
        "--after",
        "17",
        "--after",
        "18",
        "data.path=latents",
    )
    assert code == 0, err
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",  # the CLI wins over the profile
        "#SBATCH --constraint=h100",
        "#SBATCH --time=600",  # the profile's per-kind setting
        "#SBATCH --dependency=afterok:17:18",
        "#SBATCH --kill-on-invalid-dep=yes",
        "module load cuda",
        f"# ---- cluster profile: {profile} ----",
    ):
        assert line in out, f"{line!r} not in:\n{out}"
    os.environ["LLAT_SLURM_PROFILE"] = str(profile)  # the variable works like the flag (reset by monkeypatch)
    profile.write_text("partiton: gpu\n")
    code, _, err = run("train", str(REPO / "configs/tiny_dit.yaml"), "--dry-run", "data.path=latents")
    assert code == 2 and f"cluster profile {profile}" in err and "did you mean 'partition'" in err, err


def write_pipeline(tmp_path: Path, reference: bool) -> Path:
    text = (REPO / "configs/pipeline_synthetic.yaml").read_text().replace("runs/pipeline_synthetic", str(tmp_path))
    text = text.replace("config: configs/", f"config: {REPO}/configs/")
    path = tmp_path / "pipe.yaml"
    path.write_text(text)
    if reference:
        (tmp_path / "reference").mkdir()
    return path


def test_pipeline_preflight_counts_earlier_outputs_as_present(tmp_path):
    pipe = write_pipeline(tmp_path, reference=False)
    code, out, err = run("pipeline", str(pipe))
    assert code == 2 and out == ""
    # the data (extract), checkpoints (train) and samples (sample) do not exist yet but are produced: the only
    # problem is the reference batch, which nothing produces
    assert "preflight found 1 problem; nothing was submitted" in err, err
    assert f"stages.evaluate: eval.reference: reference batch not found: {tmp_path / 'reference'}" in err
    pipe = write_pipeline(tmp_path, reference=True)
    code, out, err = run("pipeline", str(pipe), "--dry-run", "--no-snapshot", "--nodes", "2")
    assert code == 0 and "preflight" not in err, err
    stages = [line for line in out.splitlines() if line.startswith("# ======== stage")]
    assert stages == [f"# ======== stage {s}: submit" for s in ("extract", "train", "sample", "evaluate")]
    assert out.count("#SBATCH --nodes=2") == 3 and out.count("#SBATCH --nodes=1") == 1  # evaluate: one task
    assert out.count("#SBATCH --dependency=") == 3
    assert f"data.path={tmp_path / 'data'}" not in out and f"path: {tmp_path / 'data'}" in out  # train reads extract's
    assert f"--out {tmp_path / 'dit/samples/fid40'} --npz {tmp_path / 'dit/samples/fid40.npz'}" in out
    # the extract stage is complete once its manifest is written: skipped
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "index.json").write_text(json.dumps({"shards": [{"samples": 64}]}))
    (tmp_path / "data" / "manifest.json").write_text("{}")
    code, out, err = run("pipeline", str(pipe), "--dry-run", "--no-snapshot")
    assert code == 0, err
    assert "# ======== stage extract: complete" in out and "# ======== stage train: submit" in out
    assert "preflight found 1 problem" in err and "latents_stats.pt not found" in err  # a finished extraction has them


@pytest.mark.parametrize(
    "body, message",
    [
        ("stages: {train: {config: nope.yaml}}", "stages.train.config: file not found: nope.yaml"),
        ("stages: {sample: {num: 5}}", "stages.train: required"),
        ("stages: {train: {config: configs/tiny_dit.yaml}, evaluate: {}}", "stages: sample missing between"),
        ("stages: {trian: {}}", "stages.trian: unknown stage"),
        ("stages: {train: {config: configs/tiny_dit.yaml, overides: []}}", "stages.train.overides: unknown key"),
    ],
)
def test_pipeline_file_errors(tmp_path, body, message):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny_dit.yaml").write_text((REPO / "configs/tiny_dit.yaml").read_text())
    (tmp_path / "p.yaml").write_text(body)
    code, _, err = run("pipeline", "p.yaml", "--dry-run")
    assert code == 2 and message in err, err


def test_shipped_pipelines_load():
    from launchers.pipeline import load_pipeline

    os.chdir(REPO)
    pc = load_pipeline("configs/pipeline_synthetic.yaml")
    assert list(pc.stages) == ["extract", "train", "sample", "evaluate"] and pc.name == "synthetic"
    assert pc.stages["sample"].options["num"] == 40
    xl = load_pipeline("configs/pipeline_imagenet_xl.yaml")
    assert list(xl.stages) == ["extract", "train", "sample", "evaluate"]
    assert xl.stages["sample"].options["num"] == 50000
    assert Path(xl.stages["extract"].config).name == "extract_imagenet256_vavae.yaml"
    assert Path(xl.stages["train"].config).name == "lightningdit_xl.yaml"
