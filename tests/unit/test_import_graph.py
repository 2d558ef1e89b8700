"""The package's import graph: no stage imports another stage, and shared code imports no stage.

Stages talk through manifests only (DESIGN.md): `pipeline/prepare`, `pipeline/cache`, `pipeline/train` and
`pipeline/publish` each import shared modules (config, manifests, runner, families, prompts, remote, ...) and never
each other; shared modules import no stage, so an earlier stage never depends on a later one. Only the command line
(`pipeline/cli.py`) sees every stage. Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pipeline

PACKAGE_ROOT = Path(pipeline.__file__).parent
STAGES = ("prepare", "cache", "train", "publish")
TOP = {"cli"}  # may import every stage


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the pipeline modules `path` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "pipeline" or name.startswith("pipeline.")}


def _stage_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def _edges() -> list[tuple[str, str]]:
    files = sorted(p for p in PACKAGE_ROOT.rglob("*.py") if "schemas" not in p.parts)
    return [(_module_name(path), target) for path in files for target in sorted(_imports(path))]


def test_the_graph_is_read_from_every_module():
    edges = _edges()
    importers = {source for source, _ in edges}
    assert {"pipeline.cli", "pipeline.cache.stage", "pipeline.train.stage", "pipeline.publish.stage",
            "pipeline.prepare.stage"} <= importers  # fmt: skip
    assert ("pipeline.cli", "pipeline.train.stage") in edges  # the top sees the stages


def test_no_stage_imports_another_stage():
    crossing = [(source, target) for source, target in _edges()
                if _stage_of(source) and _stage_of(target) and _stage_of(source) != _stage_of(target)]  # fmt: skip
    assert crossing == [], "stages must talk through manifests, not imports; move shared code beside the stages"


def test_shared_modules_import_no_stage():
    upward = [(source, target) for source, target in _edges()
              if not _stage_of(source) and source.split(".")[-1] not in TOP and _stage_of(target)]  # fmt: skip
    assert upward == [], "shared code must not depend on a stage; move what it needs out of the stage package"


def test_the_check_sees_a_crossing_import(tmp_path, monkeypatch):
    """The checker itself finds a cross-stage import (so the tests above cannot pass vacuously)."""
    fake = tmp_path / "pipeline" / "cache"
    fake.mkdir(parents=True)
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "stage.py").write_text("def f():\n    from ..train.validation import thing\n")
    monkeypatch.setitem(globals(), "PACKAGE_ROOT", tmp_path / "pipeline")
    assert ("pipeline.cache.stage", "pipeline.train.validation") in _edges()
