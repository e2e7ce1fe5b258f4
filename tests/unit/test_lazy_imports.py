"""Function-local imports only where an optional dependency really is optional (issue #15).

An ``import`` inside a function or method of core/, data/, models/, launchers/, tools/ or train.py is allowed only
(a) of a package in ``OPTIONAL`` below (a dependency that some supported setup runs without), or
(b) with a ``# lazy: <reason>`` comment on the import line, or on the line(s) just above the first import of a
    block of consecutive imports (blank lines between them allowed), naming a real reason: a command line whose
    cheap paths (--help, argument errors, the Slurm login-node launcher) must answer without torch or another heavy
    library, or code that submitit pickles and runs on the compute node.
Everything else (stdlib, numpy, yaml, PIL, torch in the library layers, in-repo modules) is imported at module
level. Pure ``ast``: no module is imported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECKED = ("core", "data", "models", "launchers", "tools", "train.py")

# The optional third-party dependencies (top-level import names), each with why it is optional. A function-local
# import of one of these needs no comment. Not listed because nothing here imports them in a function: submitit
# (optional, but only the Slurm launcher's modules import it, at their top), boto3 (streaming's own S3 client),
# moto and import-linter (test extras), tqdm (cheap, always installed: module level).
OPTIONAL = {
    "deepspeed": "FSDP2-only installs and the GPU benchmark machine have none (core/engines/deepspeed.py)",
    "streaming": "mosaicml-streaming: not on the GPU benchmark machine; configs are checked without it",
    "wandb": "logging with wandb.mode=disabled, the GPU benchmark machine, reading runs without an account",
    "torch_fidelity": "only FID/IS/KID/PR evaluation; training without in-loop evaluation never loads it",
    "timm": "only the frozen DINOv2 (REPA features, the VF loss) is a timm model; ~1.7 s to import",
    "torchdiffeq": "only the dopri5 sampler; Euler/Heun sampling and training never load it",
    "matplotlib": "the leaderboard plot uses it when installed, else draws with PIL (not a dependency)",
    "cv2": "opencv: only the VA-VAE training resize (data/images.py); DiT-only setups go without (~0.2 s import)",
    "psutil": "only the local launcher's signal forwarding; comes with deepspeed, absent from lean installs",
}

LAZY = re.compile(r"#\s*lazy:\s*\S")


def _top_packages(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if node.level or not node.module:  # relative: this repository's own code
        return ["."]
    return [node.module.split(".")[0]]


def function_local_import_offenders(source: str) -> list[tuple[int, str]]:
    """(line, statement) of every import inside a function body of ``source`` that is neither of an OPTIONAL
    package nor explained by a ``# lazy: <reason>`` comment (see the module docstring)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    # parent statement list of every statement, to find an import's previous sibling (blocks share a comment)
    previous: dict[ast.AST, ast.AST | None] = {}
    in_function: set[ast.AST] = set()

    def visit(node: ast.AST, inside: bool) -> None:
        inside = inside or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            stmts = getattr(node, field, None)
            if not isinstance(stmts, list):
                continue
            for i, child in enumerate(stmts):
                previous[child] = stmts[i - 1] if i else None
                if inside:
                    in_function.add(child)
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    imports = sorted(
        (n for n in in_function if isinstance(n, (ast.Import, ast.ImportFrom))), key=lambda n: (n.lineno, n.col_offset)
    )
    explained: dict[ast.AST, bool] = {}
    offenders = []
    for node in imports:
        ok = any(LAZY.search(lines[i]) for i in range(node.lineno - 1, node.end_lineno))
        k = node.lineno - 2
        while not ok and k >= 0 and lines[k].strip().startswith("#"):  # the comment lines just above
            ok = bool(LAZY.search(lines[k]))
            k -= 1
        prev = previous.get(node)
        if not ok and isinstance(prev, (ast.Import, ast.ImportFrom)):  # the rest of a block: its first's comment
            between = lines[prev.end_lineno : node.lineno - 1]
            ok = explained.get(prev, False) and all(not line.strip() for line in between)
        explained[node] = ok
        if not ok and not all(p in OPTIONAL for p in _top_packages(node)):
            offenders.append((node.lineno, ast.unparse(node)))
    return offenders


def _checked_files() -> list[Path]:
    files = []
    for name in CHECKED:
        path = REPO / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def test_function_local_imports_are_optional_or_explained():
    offenders = [
        f"{path.relative_to(REPO)}:{line}: {statement}"
        for path in _checked_files()
        for line, statement in function_local_import_offenders(path.read_text())
    ]
    assert not offenders, (
        "function-local imports of a module that is not an optional dependency:\n  "
        + "\n  ".join(offenders)
        + "\nMove each to the module's top (the layer rule of docs/architecture.md still holds: never import a "
        "higher layer), or, for a real reason (a command line's --help / argument errors without torch, code that "
        "submitit runs on the compute node), add `# lazy: <reason>` on the import line or just above its block; "
        f"a dependency that some supported setup runs without goes into OPTIONAL in {Path(__file__).name}."
    )


def test_every_optional_package_is_imported_in_a_function_somewhere():
    """The OPTIONAL list does not rot: each entry still earns its place (its reason is not stale)."""
    used = set()
    for path in _checked_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        used.update(_top_packages(inner))
    assert sorted(set(OPTIONAL) - used) == [], "OPTIONAL lists packages no function imports: remove them"


def test_checker_flags_unexplained_imports():
    source = "\n".join(
        [
            "import os",  # 1: module level: fine
            "def f():",
            "    import json",  # 3: stdlib in a function: flagged
            "    from core.config import Checks",  # 4: in-repo: flagged
            "    import deepspeed.comm",  # 5: optional: fine
            "    from torch.utils.data import DataLoader  # lazy:",  # 6: an empty reason: flagged
            "    # lazy: --help without torch",
            "    import torch",  # 8: explained by the comment above
            "",
            "    import numpy as np",  # 10: same block (blank lines only): explained
            "    x = 1",
            "    import yaml",  # 12: after code: a new block, flagged
            "    from . import sibling",  # 13: relative (in-repo): flagged
            "class C:",
            "    def m(self):",
            "        if True:",
            "            import PIL  # lazy: a reason on the line itself",  # 17: fine
            "        try:",
            "            import cv2",  # 19: optional: fine
            "        except ImportError:",
            "            import pickle",  # 21: flagged
            "        import streaming, json",  # 22: one of them not optional: flagged
        ]
    )
    assert function_local_import_offenders(source) == [
        (3, "import json"),
        (4, "from core.config import Checks"),
        (6, "from torch.utils.data import DataLoader"),
        (12, "import yaml"),
        (13, "from . import sibling"),
        (21, "import pickle"),
        (22, "import streaming, json"),
    ]
