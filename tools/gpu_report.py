"""One GPU report: every benchmark of docs/performance.md on one GPU in one go, each section with its own time cap.

    python tools/gpu_report.py --out /tmp/report                  # on a GPU machine (about 8 minutes)
    python tools/gpu_report.py --smoke --out /tmp/report          # the same code on CPU, tiny sizes (tests)
    python tools/gpu_report.py --prepare .whl                     # here: the wheels the GPU machine lacks
    python3 tools/gpu_report.py --wheels .whl --out $OUT/report   # there: install them first, then the report

Sections (in this order; the figures of docs/performance.md):

    env              GPU, driver, CUDA, Python and package versions, commit, the command
    train            XL/1 training step, FSDP2: bf16 and bf16-autocast, eager (64, 128, with the host-sync check)
                     and compiled (128, 64): img/s, step time, MFU, peak memory
    sample           XL/1 250-step Euler CFG-interval sampling, batch 64, bf16: eager vs the fast path
                     (compiled + CUDA graphs) with the numerics check
    vavae            VA-VAE f16d32 stage-1 step (random frozen networks): fp32 eager (the official setting) vs bf16
    extract          extraction: VA-VAE f16d32 encode (both flips) + DINOv2-L/14, network and the real job
    checkpoint       async-checkpoint stall with XL/1's optimizer state and EMA
    data             loader samples/s per worker from real MDS shards (XL latents, VA-VAE images + features,
                     local and remote) and the data wait of a 128-batch loader at 600 img/s
    train_deepspeed  XL/1 training step, DeepSpeed ZeRO-2, bf16 eager (needs the deepspeed wheel)

Each step of a section is one of the benchmark tools (tools/bench_*.py: their ``main``) run in a child process
with a time limit (the section's cap, within the report's overall ``--budget``); a step that runs over is killed
with its process group and reported as a timeout, a crash or an out-of-memory is reported with the end of its
output, and the next section runs. ``report.md`` and ``report.json`` in ``--out`` are rewritten after every step
(so a report cut short still holds every finished figure), ``report.log`` collects each step's output. A section
whose dependency (mosaicml-streaming, deepspeed) cannot be imported is reported as skipped with the reason.

``--smoke`` runs every section with tiny models and sizes on the CPU (children forked from a parent that has
imported the tools, so that it takes seconds); on a GPU the children are fresh interpreters (``--launch``).

``--prepare DIR`` (here, with network access to the package index) downloads the wheels the report needs beyond
what the GPU machine has -- mosaicml-streaming and the modules it imports, deepspeed (built here with ``pip wheel
--no-deps``) and its requirements -- for the GPU machine's Python (``--python-version``, default 3.12, manylinux
x86-64), and writes ``DIR/install.sh``. ``--wheels DIR`` installs them (``pip install --no-index --no-deps
--target``) into ``$TMPDIR/gpu_report_site`` before the sections run and puts that on the children's path.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import importlib
import importlib.util
import json
import math
import multiprocessing as mp
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from core.fileio import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

XL = "LightningDiT-XL/1"
VAVAE_CONFIG = "configs/vavae_f16d32_stage1.yaml"


@dataclass
class Step:
    tool: str  # module under tools/ whose main(argv) runs (or "env")
    argv: list[str]
    cap: float  # seconds
    label: str = ""


@dataclass
class Section:
    name: str
    title: str
    steps: list[Step]
    needs: tuple[str, ...] = ()  # importable modules the section needs
    results: list[dict] = field(default_factory=list)


def sections(smoke: bool) -> list[Section]:
    """The report's sections: full sizes on a GPU, tiny ones with ``smoke`` (CPU)."""
    if smoke:
        tiny_train = ["--batch", "2", "--steps", "1", "--warmup", "1", "--precision", "fp32"]
        return [
            Section("env", "Software and device", [Step("env", [], 60)]),
            Section(
                "train",
                "Training step (FSDP2)",
                [
                    Step("bench_train", [*tiny_train, "--modes", "eager", "--sync-check"], 60, "eager"),
                    Step("bench_train", [*tiny_train, "--modes", "compiled"], 60, "compiled"),
                    Step("check_host_sync", ["--out", "{scratch}", "--steps", "4"], 60, "trainer loop host syncs"),
                ],
            ),
            Section(
                "sample",
                "250-step Euler CFG-interval sampling",
                [
                    Step(
                        "bench_sample",
                        [
                            "--num-steps",
                            "4",
                            "--cfg-interval-start",
                            "0.3",
                            "--batch",
                            "2",
                            "--precision",
                            "fp32",
                            "--modes",
                            "eager",
                            "compiled",
                        ],
                        60,
                    )
                ],
            ),
            Section(
                "vavae",
                "VA-VAE training step",
                [
                    Step(
                        "bench_train",
                        [
                            "--config",
                            "configs/tiny_vavae.yaml",
                            "--batch",
                            "2",
                            "--steps",
                            "1",
                            "--warmup",
                            "0",
                            "--precision",
                            "fp32",
                            "--baseline",
                            "eager:fp32:2",
                        ],
                        90,
                    )
                ],
            ),
            Section(
                "extract",
                "Extraction (VA-VAE encode both flips + DINOv2)",
                [
                    Step(
                        "bench_extract", ["--image-size", "16", "--batch", "2", "--repeats", "1", "--pipeline", "4"], 60
                    )
                ],
                needs=("streaming",),
            ),
            Section(
                "checkpoint",
                "Async checkpoint stall",
                [Step("bench_checkpoint", ["--steps", "1", "--saves", "2", "--batch", "2"], 60)],
            ),
            Section(
                "data",
                "Data loader from real MDS shards",
                [
                    Step(
                        "bench_data",
                        [
                            "--latent-shape",
                            "4",
                            "8",
                            "8",
                            "--image-size",
                            "16",
                            "--features-shape",
                            "8",
                            "2",
                            "2",
                            "--latent-samples",
                            "96",
                            "--image-samples",
                            "24",
                            "--latent-batch",
                            "16",
                            "--image-batch",
                            "4",
                            "--workers",
                            "0",
                            "1",
                            "--shard-mib",
                            "0.25",
                        ],
                        90,
                        "throughput",
                    ),
                    Step(
                        "bench_data",
                        [
                            "--schema",
                            "latent",
                            "--paths",
                            "local",
                            "--latent-shape",
                            "4",
                            "8",
                            "8",
                            "--latent-samples",
                            "64",
                            "--latent-batch",
                            "16",
                            "--workers",
                            "1",
                            "--step-ms",
                            "5",
                        ],
                        60,
                        "data wait",
                    ),
                ],
                needs=("streaming",),
            ),
            Section(
                "train_deepspeed",
                "Training step (DeepSpeed ZeRO-2)",
                [Step("bench_train", [*tiny_train, "--engine", "deepspeed", "--zero-stage", "2"], 90)],
                needs=("deepspeed",),
            ),
        ]
    xl = ["--model", XL, "--steps", "10", "--warmup", "3"]
    return [
        Section("env", "Software and device", [Step("env", [], 20)]),
        Section(
            "train",
            "XL/1 training step (FSDP2)",
            [
                Step(
                    "bench_train",
                    [
                        *xl,
                        "--batch",
                        "64",
                        "128",
                        "--modes",
                        "eager",
                        "--precision",
                        "bf16",
                        "bf16-autocast",
                        "--sync-check",
                    ],
                    70,
                    "eager",
                ),
                Step(
                    "bench_train",
                    [*xl, "--batch", "128", "64", "--modes", "compiled", "--precision", "bf16"],
                    90,
                    "compiled bf16",
                ),
                Step(
                    "bench_train",
                    [*xl, "--batch", "128", "--modes", "compiled", "--precision", "bf16-autocast"],
                    65,
                    "compiled bf16-autocast",
                ),
                Step("check_host_sync", ["--out", "{scratch}", "--steps", "8"], 40, "trainer loop host syncs"),
            ],
        ),
        Section(
            "sample",
            "XL/1 250-step Euler CFG-interval sampling",
            [
                Step(
                    "bench_sample",
                    ["--model", XL, "--batch", "64", "--precision", "bf16", "--modes", "eager", "compiled+graphs"],
                    90,
                )
            ],
        ),
        Section(
            "vavae",
            "VA-VAE f16d32 stage-1 training step",
            [
                Step(
                    "bench_train",
                    [
                        "--config",
                        VAVAE_CONFIG,
                        "--random-frozen",
                        "--batch",
                        "8",
                        "32",
                        "--modes",
                        "eager",
                        "--precision",
                        "fp32",
                        "bf16",
                        "--steps",
                        "5",
                        "--warmup",
                        "2",
                        "--baseline",
                        "eager:fp32:8",
                    ],
                    50,
                )
            ],
        ),
        Section(
            "extract",
            "Extraction: f16d32 encode (both flips) + DINOv2-L/14, 256 px",
            [
                Step(
                    "bench_extract",
                    [
                        "--tokenizer-kwargs",
                        '{"random_init": true}',
                        "--image-size",
                        "256",
                        "--features-model",
                        "vit_large_patch14_dinov2.lvd142m",
                        "--features-model-kwargs",
                        "{}",
                        "--batch",
                        "64",
                        "--precision",
                        "bf16",
                        "--modes",
                        "eager",
                        "--pipeline",
                        "1024",
                        "--num-workers",
                        "8",
                    ],
                    45,
                )
            ],
            needs=("streaming",),
        ),
        Section(
            "checkpoint",
            "Async checkpoint stall, XL/1 with Adam + EMA",
            [Step("bench_checkpoint", ["--model", XL, "--saves", "3"], 35)],
        ),
        Section(
            "data",
            "Data loader from real MDS shards",
            [
                Step(
                    "bench_data",
                    ["--workers", "1", "4", "--latent-samples", "8192", "--image-samples", "512"],
                    30,
                    "throughput",
                ),
                Step(
                    "bench_data",
                    [
                        "--schema",
                        "latent",
                        "--paths",
                        "local",
                        "--workers",
                        "1",
                        "2",
                        "--latent-samples",
                        "4096",
                        "--step-ms",
                        "213",
                    ],
                    25,
                    "data wait at 600 img/s",
                ),
            ],
            needs=("streaming",),
        ),
        Section(
            "train_deepspeed",
            "XL/1 training step (DeepSpeed ZeRO-2)",
            [
                Step(
                    "bench_train",
                    [
                        *xl,
                        "--engine",
                        "deepspeed",
                        "--zero-stage",
                        "2",
                        "--batch",
                        "64",
                        "128",
                        "--modes",
                        "eager",
                        "--precision",
                        "bf16",
                        "--sync-check",
                    ],
                    45,
                )
            ],
            needs=("deepspeed",),
        ),
    ]


# ------------------------------------------------------------------------------------------- the env step
def env_main(argv=None) -> int:
    """Print the software and device as one JSON line (no CUDA work beyond the device query)."""
    import importlib.metadata as md  # lazy: ~20 ms and 40 modules (email, csv, ...) that --help does not need

    import torch  # lazy: the report's parent (--help, scheduling the steps) stays torch-free; this runs in a step

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    for dist in (
        "torchvision",
        "timm",
        "scipy",
        "numpy",
        "torchdiffeq",
        "triton",
        "mosaicml-streaming",
        "deepspeed",
        "zstandard",
        "xxhash",
        "pydantic",
    ):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            info[dist] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
        )
        try:
            info["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
                .stdout.strip()
                .splitlines()[0]
            )
        except (OSError, subprocess.SubprocessError, IndexError):
            info["driver"] = None
    else:
        info["gpu"] = None
    try:
        info["commit"] = (
            subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=20
            ).stdout.strip()
            or None
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
        info["dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    print("ENV " + json.dumps(info))
    rows = [{"what": k, "value": str(v)} for k, v in info.items()]
    from core.metrics import format_table  # lazy: core.metrics imports torch (see above)

    print(format_table(rows))
    return 0


# ------------------------------------------------------------------------------------------- running steps
def _step_entry(step: Step):
    if step.tool == "env":
        return env_main
    return importlib.import_module(f"tools.{step.tool}").main


def _child(step_json: str) -> int:
    """Entry of a spawned step: run the tool's main with its argv."""
    step = Step(**json.loads(step_json))
    return int(_step_entry(step)(step.argv) or 0)


def _fork_target(step: Step, log_path: str) -> None:  # the forked child
    atexit._clear()  # the parent's exit handlers are not ours (e.g. removing its temporary directories)
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # also where the parent had replaced them (pytest)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    code = 1
    try:
        code = int(_step_entry(step)(step.argv) or 0)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - report it in the log, exit non-zero
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            atexit._run_exitfuncs()  # this process's own, as at a normal exit (streaming's shared memory)
        finally:
            os._exit(code)


def _kill_group(pid: int, reap) -> None:
    """SIGTERM the process group of child ``pid``, SIGKILL it after 5 s. ``reap()`` collects the child without
    blocking: a dead but unreaped leader (a zombie) still counts as a member of its group."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            reap()
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def run_step(step: Step, timeout: float, launch: str, log_path: Path, env: dict) -> tuple[str, int, float]:
    """Run ``step`` in a child process for at most ``timeout`` s: (status, exit code, seconds); status is "ok",
    "failed" or "timeout". Its output (stdout + stderr) goes to ``log_path``."""
    t0 = time.monotonic()
    if launch == "fork":
        proc = mp.get_context("fork").Process(target=_fork_target, args=(step, str(log_path)), daemon=False)
        proc.start()
        proc.join(timeout)
        if proc.is_alive():
            _kill_group(proc.pid, lambda: proc.join(0))
            proc.join(10)
            return "timeout", -1, time.monotonic() - t0
        code = proc.exitcode if proc.exitcode is not None else -1
    else:
        with open(log_path, "w") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "tools.gpu_report", "--_step", json.dumps(step.__dict__)],
                cwd=str(REPO),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = child.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill_group(child.pid, child.poll)
                child.wait(10)
                return "timeout", -1, time.monotonic() - t0
    return ("ok" if code == 0 else "failed"), code, time.monotonic() - t0


def parse_tables(text: str) -> tuple[list[list[dict]], list[str]]:
    """The tables ``core.metrics.format_table`` printed in ``text`` (as lists of dict rows, numbers as floats) and
    the other lines."""
    lines = text.splitlines()
    tables, notes, i = [], [], 0
    while i < len(lines):
        if (
            " | " in lines[i]
            and i + 1 < len(lines)
            and set(lines[i + 1].strip()) <= {"-", "+"}
            and "-+-" in lines[i + 1]
        ):
            header = [h.strip() for h in lines[i].split(" | ")]
            rows, i = [], i + 2
            while i < len(lines) and " | " in lines[i]:
                cells = [c.strip() for c in lines[i].split(" | ")]
                rows.append({h: _number(c) for h, c in zip(header, cells)})
                i += 1
            tables.append(rows)
            continue
        if lines[i].strip() and " | " not in lines[i]:  # (a table's rows printed as progress: skipped)
            notes.append(lines[i])
        i += 1
    return tables, notes


def _number(cell: str) -> Any:
    try:
        return int(cell) if cell.lstrip("-").isdigit() else float(cell)
    except ValueError:
        return cell


def _import_problem(module: str) -> Optional[str]:
    """Why ``module`` cannot be imported here (None if it can). deepspeed is only looked up, not imported: importing
    it initialises CUDA (a forked step could then not use it) and takes seconds; a broken install fails its step."""
    if module == "deepspeed":
        return None if importlib.util.find_spec(module) is not None else "deepspeed is not installed"
    try:
        importlib.import_module(module)
        return None
    except Exception as e:  # noqa: BLE001 - any failure is a reason to skip
        return f"import {module} failed: {type(e).__name__}: {e}"


def command_line(step: Step) -> str:
    if step.tool == "env":
        return "python tools/gpu_report.py (env)"
    return " ".join(["python", f"tools/{step.tool}.py", *map(shlex.quote, step.argv)])


# --------------------------------------------------------------------------------------------- the report
class Report:
    def __init__(self, out: Path, argv: list[str], smoke: bool, budget: float, launch: str):
        self.out = out
        self.data: dict[str, Any] = {
            "command": "python tools/gpu_report.py " + " ".join(map(shlex.quote, argv)),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "smoke": smoke,
            "budget_s": budget,
            "launch": launch,
            "env": {},
            "sections": [],
        }

    def add(self, section: Section) -> dict:
        entry = {"name": section.name, "title": section.title, "status": "pending", "seconds": 0.0, "steps": []}
        self.data["sections"].append(entry)
        return entry

    def write(self) -> None:
        self.data["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        atomic_write_text(self.out / "report.json", json.dumps(self.data, indent=1, default=str), durable=False)
        atomic_write_text(self.out / "report.md", self.markdown(), durable=False)

    def markdown(self) -> str:
        d, env = self.data, self.data["env"]
        device = env.get("gpu") or "CPU"
        lines = [
            f"# GPU report{' (smoke, CPU, tiny sizes)' if d['smoke'] else ''}",
            "",
            f"* device: {device}"
            + (
                f" ({env.get('gpu_memory_gib')} GiB, driver {env.get('driver')}, CUDA {env.get('cuda')})"
                if env.get("gpu")
                else ""
            )
            + f", {env.get('cpus', '?')} CPUs",
            f"* software: Python {env.get('python', '?')}, torch {env.get('torch', '?')}, torchvision "
            f"{env.get('torchvision')}, timm {env.get('timm')}, triton {env.get('triton')}, mosaicml-streaming "
            f"{env.get('mosaicml-streaming')}, deepspeed {env.get('deepspeed')}",
            f"* code: commit {env.get('commit')}{' + local changes' if env.get('dirty') else ''}",
            f"* command: `{d['command']}` (started {d['started']}, last written {d.get('updated')}, budget "
            f"{d['budget_s']:g} s, steps {d['launch']}ed)",
            "",
            "| section | status | seconds |",
            "|---|---|---|",
        ]
        for s in d["sections"]:
            lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} |")
        for s in d["sections"]:
            lines += [
                "",
                f"## {s['name']}: {s['title']}",
                "",
                f"status: **{s['status']}**" + (f" ({s['reason']})" if s.get("reason") else ""),
            ]
            for st in s["steps"]:
                lines += [
                    "",
                    f"### {st['label'] or st['tool']}: {st['status']} in {st['seconds']:.0f} s (cap {st['cap']:.0f} s)",
                    "",
                    f"`{st['command']}`",
                ]
                for note in st.get("notes", [])[:12]:
                    lines += ["", f"    {note}"] if note is st["notes"][0] else [f"    {note}"]
                for table in st.get("tables", []):
                    lines += [""] + _markdown_table(table)
                if st["status"] != "ok" and st.get("tail"):
                    lines += ["", "```", *st["tail"], "```"]
        return "\n".join(lines) + "\n"


def _markdown_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    headers = list(rows[0].keys())
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) and math.isfinite(v) else str(v)
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(cell(r.get(h, "")) for h in headers) + " |" for r in rows
    ]


# --------------------------------------------------------------------------------------------- --prepare
# Distributions the report imports beyond the GPU machine's (torch, torchvision, timm, scipy, torchdiffeq and their
# requirements): streaming and what its import pulls in, deepspeed's requirements. Versions: this environment's.
PREPARE_DISTS = (
    "mosaicml-streaming",
    "zstd",
    "zstandard",
    "xxhash",
    "brotli",
    "python-snappy",
    "cramjam",
    "catalogue",
    "hjson",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "py-cpuinfo",
    "msgpack",
    "einops",
    "ninja",
    "psutil",
    "packaging",
    "filelock",
    "tqdm",
)


def _constraint(name: str) -> Optional[str]:
    text = (REPO / "constraints.txt").read_text() if (REPO / "constraints.txt").is_file() else ""
    for line in text.splitlines():
        if line.split("==")[0].strip().lower() == name.lower() and "==" in line:
            return line.split("#")[0].strip().split("==")[1]
    return None


def prepare(
    wheel_dir: Path,
    python_version: str,
    dists: tuple[str, ...] = PREPARE_DISTS,
    build: tuple[str, ...] = ("deepspeed",),
    dry_run: bool = False,
) -> int | list[list[str]]:
    """Gather into ``wheel_dir`` the wheels of ``dists`` for CPython ``python_version`` on x86-64 Linux (pip
    download, binary only, no dependencies) and build those of ``build`` from source (pip wheel, DeepSpeed ships
    only as source), then write ``install.sh``. ``dry_run``: return the pip commands instead of running them."""
    import importlib.metadata as md  # lazy: see env_main

    wheel_dir.mkdir(parents=True, exist_ok=True)
    platforms = [
        "manylinux_2_28_x86_64",
        "manylinux_2_27_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "manylinux1_x86_64",
        "manylinux_2_24_x86_64",
        "manylinux_2_31_x86_64",
        "manylinux_2_34_x86_64",
        "manylinux_2_35_x86_64",
        "manylinux_2_5_x86_64",
    ]
    pip = [sys.executable, "-m", "pip"]
    failed = []
    planned: list[list[str]] = []
    for name in dists:
        version = _constraint(name)
        if version is None:
            try:
                version = md.version(name)
            except md.PackageNotFoundError:
                version = None
        spec = f"{name}=={version}" if version else name
        cmd = [
            *pip,
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            *[a for p in platforms for a in ("--platform", p)],
            "-d",
            str(wheel_dir),
            spec,
        ]
        if dry_run:
            planned.append(cmd)
            continue
        print("+", " ".join(cmd[3:]), flush=True)
        if subprocess.run(cmd).returncode != 0 and version is not None:
            print(f"no {python_version} wheel of {spec}: the newest one of {name} instead", flush=True)
            cmd[-1] = name  # e.g. zstd 1.5.7.2 has no cp312 manylinux wheel
            if subprocess.run(cmd).returncode != 0:
                failed.append(spec)
    for name in build:
        spec = f"{name}=={_constraint(name) or md.version(name)}"
        cmd = [*pip, "wheel", "--no-deps", "-w", str(wheel_dir), spec]
        if dry_run:
            planned.append(cmd)
            continue
        print("+", " ".join(cmd[3:]), flush=True)
        if subprocess.run(cmd, env={**os.environ, "DS_BUILD_OPS": "0"}).returncode != 0:
            failed.append(spec)
    if dry_run:
        return planned
    script = wheel_dir / "install.sh"
    script.write_text(
        "#!/bin/sh\n"
        "# Written by tools/gpu_report.py --prepare: installs the wheels of this folder (no index, no dependencies)\n"
        "# into TARGET (default /tmp/gpu_report_site); then: export PYTHONPATH=TARGET:$PYTHONPATH\n"
        "set -e\n"
        'HERE=$(cd "$(dirname "$0")" && pwd)\n'
        "TARGET=${1:-/tmp/gpu_report_site}\n"
        "${PYTHON:-python3} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
        '--target "$TARGET" "$HERE"/*.whl\n'
        'echo "export PYTHONPATH=$TARGET:\\$PYTHONPATH"\n'
    )
    script.chmod(0o755)
    wheels = sorted(p.name for p in wheel_dir.glob("*.whl"))
    size = sum(p.stat().st_size for p in wheel_dir.glob("*.whl")) / 2**20
    print(f"{len(wheels)} wheels ({size:.1f} MiB) in {wheel_dir}; install script {script}")
    if failed:
        print(f"could not fetch: {', '.join(failed)} (the sections that need them will be skipped)", file=sys.stderr)
    return 1 if failed else 0


def install_wheels(wheel_dir: Path, target: Path) -> Optional[str]:
    """Install the wheels of ``wheel_dir`` into ``target``; None or the error."""
    wheels = sorted(str(p) for p in wheel_dir.glob("*.whl"))
    if not wheels:
        return f"no wheels in {wheel_dir}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(target),
            *wheels,
        ],
        capture_output=True,
        text=True,
    )
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["pip failed"])[-1]


# --------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--out", default="gpu_report", help="folder of report.md, report.json and report.log")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models and sizes (the test suite runs this)")
    p.add_argument("--sections", nargs="+", default=None, help="run only these sections (default: all)")
    p.add_argument("--skip", nargs="+", default=[], help="report these sections as skipped without running them")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="overall seconds for the sections (default 470 on a GPU: the whole report within 8 minutes; "
        "300 with --smoke); no step starts with less than 10 s of it left",
    )
    p.add_argument(
        "--cap", nargs="+", default=[], metavar="SECTION=SECONDS", help="change a section's cap (shared by its steps)"
    )
    p.add_argument(
        "--launch",
        choices=["spawn", "fork"],
        default=None,
        help="child processes: fresh interpreters (default on a GPU) or forked from this process after "
        "the tools are imported (default with --smoke: seconds instead of an import per step)",
    )
    p.add_argument("--wheels", default=None, help="install these wheels (from --prepare) first")
    p.add_argument("--prepare", default=None, metavar="DIR", help="download the wheels into DIR and exit")
    p.add_argument("--python-version", default="3.12", help="--prepare: the GPU machine's Python")
    p.add_argument("--_step", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    started = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args._step is not None:
        return _child(args._step)
    if args.prepare:
        return prepare(Path(args.prepare), args.python_version)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget if args.budget is not None else (300.0 if args.smoke else 470.0)
    launch = args.launch or ("fork" if args.smoke else "spawn")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if args.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is a CPU run, also on a GPU machine
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # fork-safe device checks in this process
    env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    report = Report(out, argv, args.smoke, budget, launch)
    log = out / "report.log"
    log.write_text("")
    wheel_problem = None
    if args.wheels:
        site = Path(tempfile.gettempdir()) / "gpu_report_site"  # not under --out: it comes back as files
        wheel_problem = install_wheels(Path(args.wheels), site)
        if wheel_problem is None:
            sys.path.insert(0, str(site))
            env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
            os.environ["PYTHONPATH"] = env["PYTHONPATH"]
        report.data["wheels"] = {"dir": args.wheels, "problem": wheel_problem}
    caps = {}
    for item in args.cap:
        name, _, seconds = item.partition("=")
        caps[name] = float(seconds)
    chosen = sections(args.smoke)
    if args.sections:
        unknown = set(args.sections) - {s.name for s in chosen}
        if unknown:
            print(f"error: unknown section(s) {sorted(unknown)}; known: {[s.name for s in chosen]}", file=sys.stderr)
            return 2
        chosen = [s for s in chosen if s.name in args.sections or s.name == "env"]
    unknown = set(args.skip) - {s.name for s in sections(args.smoke)}
    if unknown:
        print(f"error: unknown section(s) {sorted(unknown)} in --skip", file=sys.stderr)
        return 2
    if launch == "fork":  # import what the steps run once, here (no CUDA work here)
        for mod in ("torch", "tools.bench_train", "tools.bench_sample", "tools.bench_checkpoint", "tools.bench_data"):
            importlib.import_module(mod)
    entries = [report.add(s) for s in chosen]
    report.write()
    deadline = started + budget  # the wheels' installation counts too
    with tempfile.TemporaryDirectory(prefix="gpu_report_") as tmp:
        for section, entry in zip(chosen, entries):
            if section.name in args.skip:
                entry.update(status="skipped", reason="--skip")
                report.write()
                continue
            problems = [p for p in (_import_problem(m) for m in section.needs) if p]
            if problems:
                entry.update(
                    status="skipped",
                    reason="; ".join(problems)
                    + (f" (installing the wheels failed: {wheel_problem})" if wheel_problem else ""),
                )
                report.write()
                continue
            cap = caps.get(section.name, sum(st.cap for st in section.steps))
            section_end = min(deadline, time.monotonic() + cap)
            statuses = []
            t_section = time.monotonic()
            for i, step in enumerate(section.steps):
                left = section_end - time.monotonic()
                record = {
                    "tool": step.tool,
                    "label": step.label,
                    "command": command_line(step),
                    "cap": step.cap,
                    "seconds": 0.0,
                }
                entry["steps"].append(record)
                if left < 10:
                    record.update(
                        status="skipped", notes=["not started: the section's cap or the report's budget is used up"]
                    )
                    statuses.append("skipped")
                    report.write()
                    continue
                timeout = left if section.name in caps else min(left, step.cap)
                step_log = Path(tmp) / f"{section.name}.{i}.log"
                record["status"] = "running"
                report.write()
                scratch = str(Path(tmp) / f"{section.name}.{i}")  # "{scratch}" in argv: a fresh folder per step
                step = replace(step, argv=[a.replace("{scratch}", scratch) for a in step.argv])
                status, code, seconds = run_step(step, timeout, launch, step_log, env)
                text = step_log.read_text(errors="replace") if step_log.exists() else ""
                with open(log, "a") as f:
                    f.write(
                        f"\n===== {section.name} / {step.label or step.tool}: {record['command']}\n"
                        f"===== {status} (exit {code}) in {seconds:.1f} s\n"
                        + (text if len(text) <= 200_000 else "[...]\n" + text[-200_000:])
                    )
                tables, notes = parse_tables(text)
                if step.tool == "env":
                    env_line = next((n for n in notes if n.startswith("ENV ")), None)
                    if env_line:
                        report.data["env"] = json.loads(env_line[4:])
                    notes = [n for n in notes if not n.startswith("ENV ")]
                record.update(
                    status=status if status != "failed" else f"failed (exit {code})",
                    seconds=seconds,
                    tables=tables,
                    notes=[n for n in notes if not n.startswith("  warnings.warn")][:40],
                    tail=text.splitlines()[-25:] if status != "ok" else [],
                )
                if status == "timeout":
                    record["status"] = f"timeout after {seconds:.0f} s"
                statuses.append(status)
                entry["seconds"] = time.monotonic() - t_section
                report.write()
            entry["seconds"] = time.monotonic() - t_section
            entry["status"] = (
                "ok"
                if all(s == "ok" for s in statuses)
                else "partial"
                if any(s == "ok" for s in statuses)
                else "timeout"
                if "timeout" in statuses
                else "skipped"
                if all(s == "skipped" for s in statuses)
                else "failed"
            )
            if entry["status"] == "skipped":
                entry["reason"] = "out of time"
            report.write()
    report.data["finished"] = True
    report.write()
    bad = [s["name"] for s in report.data["sections"] if s["status"] not in ("ok", "skipped")]
    print(
        f"report: {out / 'report.md'} ({len(entries)} sections" + (f"; not ok: {', '.join(bad)}" if bad else "") + ")"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
