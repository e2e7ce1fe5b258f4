"""The layering of the code base: the import contracts of `.importlinter` hold (the same check `make lint` runs,
here in process for `make test-fast`), and docs/architecture.md names every module, so the map cannot drift."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERED = ("core", "data", "models", "launchers")


def test_import_contracts_hold():
    from importlinter.application.use_cases import lint_imports
    from importlinter.configuration import configure

    configure()  # what the lint-imports command does first: the readers, the graph builder, the printer

    cwd = os.getcwd()
    os.chdir(REPO)  # the contracts file and the packages are found from the repository root
    try:
        ok = lint_imports(config_filename=str(REPO / ".importlinter"), cache_dir=None, no_logo=True)
    finally:
        os.chdir(cwd)
    assert ok, "an import breaks a contract of .importlinter: run `lint-imports` for the offending import"


@pytest.mark.parametrize("package", LAYERED)
def test_architecture_doc_names_every_module(package):
    doc = (REPO / "docs" / "architecture.md").read_text()
    missing = [
        str(path.relative_to(REPO))
        for path in sorted((REPO / package).rglob("*.py"))
        if path.name != "__init__.py" and path.name not in doc
    ]
    assert not missing, f"docs/architecture.md does not name {missing}: add them to its module map"


def test_tools_are_listed_in_the_architecture_doc():
    doc = (REPO / "docs" / "architecture.md").read_text()
    tools = sorted(p.stem for p in (REPO / "tools").glob("*.py") if p.name != "__init__.py")
    missing = [t for t in tools if t not in doc and not (t.startswith("bench_") and "bench_*" in doc)]
    assert not missing, f"docs/architecture.md does not name the tools {missing}"
