"""Shared fixtures of both tiers: ``tests/unit`` (in process: no subprocess, no process group; ``make test-fast``)
and ``tests/integration`` (process groups, launches, DeepSpeed, Slurm, the demo). ``make test`` runs both.

Import paths: the repository root, ``tests/`` (``dist_utils``) and both tier folders are put on ``sys.path``, so a
test module imports a helper of another tier by its module name (``from test_train_resume import ...``) however
pytest is started. The repository root comes first: ``tests/data`` (reference files) must never stand in for the
``data`` package.

Threads: the pytest process runs with ONE intra-op thread, and ``OMP_NUM_THREADS=1`` is the default for the
processes it starts (tiny CPU models: several threads on small kernels of a loaded 2-core machine spin and crawl,
up to 20x slower). ``one_thread``: the same for one test (kept for the modules that name it).

``local_slurm``: a real Slurm cluster of four fake nodes n1..n4 (with accounting) on this machine, started once per
test session by scripts/slurm/start_local_slurm.sh and stopped at the end. It needs root and Debian's packages
(installed on first use). Where that is not possible the tests that use it are skipped with the reason, except
under ``CI=true``, where they fail: CI must run them.
"""

from __future__ import annotations

import gc
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
SLURM_SCRIPTS = REPO / "scripts" / "slurm"
NODES = 4  # enough for the Slurm tests' jobs to run side by side, one job per node (test_slurm.py)

for _path in (TESTS / "integration", TESTS / "unit", TESTS, REPO):  # REPO ends up first
    if str(_path) in sys.path:
        sys.path.remove(str(_path))
    sys.path.insert(0, str(_path))
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# DeepSpeed's CPU shared-memory comm op (an inference kernel) is not built: ~40 s per fresh extensions directory
# (README "DeepSpeed on CPU"). Whatever else JIT-builds does so in a directory of this run, so that a process killed
# mid-build never leaves a lock that blocks a later run.
os.environ.setdefault("LLAT_DEEPSPEED_SHM_COMM", "0")
_OWN_EXTENSIONS_DIR = "TORCH_EXTENSIONS_DIR" not in os.environ
if _OWN_EXTENSIONS_DIR:
    os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="llat-torch-extensions-")


def pytest_collection_finish(session):
    """Move everything the imports and the collection created into gc's permanent generation: the later
    ``gc.collect()`` calls (the streaming tests run one after each test to release shared memory) then only walk the
    objects created since, instead of torch's whole object graph (0.7 s each, 20 s over the unit tier)."""
    gc.collect()
    gc.freeze()


def pytest_sessionfinish(session, exitstatus):
    """Stop the shared ranks of tests/dist_utils.py (also done at exit); remove this run's extensions directory."""
    for name in ("dist_utils", "tests.dist_utils"):
        if name in sys.modules:
            sys.modules[name].close_gangs()
    if _OWN_EXTENSIONS_DIR:
        shutil.rmtree(os.environ["TORCH_EXTENSIONS_DIR"], ignore_errors=True)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class LocalSlurm:
    state_dir: Path
    conf: Path  # exported as SLURM_CONF for the session
    nodes: tuple[str, ...]
    startup_s: float


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _ports_free(base: int) -> bool:
    for port in range(base, base + 10):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory) -> LocalSlurm:
    def unavailable(reason: str):
        if _in_ci():
            pytest.fail(f"CI=true: the local Slurm cluster is required but {reason}", pytrace=False)
        pytest.skip(f"local Slurm cluster not available: {reason}")

    if sys.platform != "linux":
        unavailable(f"needs Linux (this is {sys.platform})")
    if os.geteuid() != 0:
        unavailable("scripts/slurm/start_local_slurm.sh needs root")
    # A cluster of another session may hold the default ports: use the next free block.
    base = next((b for b in range(6817, 7817, 100) if _ports_free(b)), None)
    if base is None:
        unavailable("no free block of 10 TCP ports in 6817-7816")
    state = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, LOCAL_SLURM_PORT_BASE=str(base))
    env.pop("SLURM_CONF", None)
    t0 = time.time()
    try:
        res = subprocess.run(
            [str(SLURM_SCRIPTS / "start_local_slurm.sh"), "--nodes", str(NODES), "--accounting", str(state)],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
    except subprocess.TimeoutExpired:
        unavailable("start_local_slurm.sh did not finish in 15 minutes")
    startup = time.time() - t0
    if res.returncode != 0:
        subprocess.run([str(SLURM_SCRIPTS / "stop_local_slurm.sh"), str(state)], capture_output=True, timeout=120)
        unavailable(f"start_local_slurm.sh failed with exit code {res.returncode}:\n{res.stderr[-3000:]}")
    conf = state / "etc" / "slurm.conf"
    if (state / "etc" / "node_shm").read_text().strip() != "private":
        subprocess.run([str(SLURM_SCRIPTS / "stop_local_slurm.sh"), str(state)], capture_output=True, timeout=120)
        unavailable(
            "the fake nodes cannot get a private /dev/shm (`unshare -m` needs CAP_SYS_ADMIN); the Slurm "
            "tests run several streaming jobs and a 2-node job on one machine, which needs it"
        )
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    print(f"\nlocal Slurm up in {startup:.1f} s (ports {base}+, {state})", file=sys.stderr)
    try:
        yield LocalSlurm(state, conf, tuple(f"n{i}" for i in range(1, NODES + 1)), startup)
    finally:
        subprocess.run([str(SLURM_SCRIPTS / "stop_local_slurm.sh"), str(state)], capture_output=True, timeout=180)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 HTTP endpoint on localhost (moto server mode, tests/s3_utils.py); the AWS environment variables
    point at it for the rest of the session."""
    from s3_utils import start_s3_server, stop_s3_server

    server = start_s3_server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    stop_s3_server(server)


@pytest.fixture
def clean_streaming_shm():
    """MosaicML streaming's shared memory removed before and after the test: every dataset a test opens in this
    process leaves its segments behind (streaming's cleanup removes every streaming segment of the machine, so only
    tests that run no job beside them use it: ``pytestmark = pytest.mark.usefixtures("clean_streaming_shm")``)."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    yield
    gc.collect()
    clean_stale_shared_memory()
