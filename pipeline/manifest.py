"""Stage manifests: the versioned JSON documents through which stages talk to each other.

Every manifest has `schema` ("st.<stage>/<version>"), `stage`, `key`, `digest`, `parent`, `config`, `outputs`, `stats`
and `provenance`. `key` hashes the stage's inputs (computed before any work); `digest` is the sha256 of the canonical
JSON of everything except `provenance` and `digest` itself. Documents are validated against the JSON Schemas when
written and when read. The schemas are package data (`pipeline/schemas/`, a link to the repository's top-level
`manifests/`, their source of truth), read through importlib.resources so that an installed wheel finds them.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib.resources
import json
import os
import platform
import socket
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ManifestError
from .fsutil import atomic_write_text
from .hashing import sha256_file, sha256_json

MANIFEST_NAME = "manifest.json"
SCHEMA_PACKAGE = "pipeline"
SCHEMA_FOLDER = "schemas"
EXCLUDED_FROM_DIGEST = ("provenance", "digest")


def schema_resource(stage: str, version: int):
    """The packaged JSON Schema of `st.<stage>/<version>` (a Traversable; it may not exist)."""
    return importlib.resources.files(SCHEMA_PACKAGE).joinpath(SCHEMA_FOLDER, f"{stage}.v{version}.schema.json")


@functools.lru_cache(maxsize=None)
def _validator(stage: str, version: int):
    import jsonschema

    resource = schema_resource(stage, version)
    if not resource.is_file():
        raise ManifestError(f"no schema for st.{stage}/{version} in this installation of st {__version__} (looked "
                            f"for {resource}); reinstall st, or use the st version that wrote the manifest")
    schema = json.loads(resource.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def validate(doc: dict[str, Any], stage: str, version: int, where: str) -> None:
    """Raise ManifestError naming the first schema violation of `doc`."""
    errors = sorted(_validator(stage, version).iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        location = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ManifestError(f"{where} does not match schema st.{stage}/{version} at {location}: {err.message}")


def compute_digest(doc: dict[str, Any]) -> str:
    return sha256_json({k: v for k, v in doc.items() if k not in EXCLUDED_FROM_DIGEST})


def output_entry(root: Path, path: Path) -> dict[str, Any]:
    """Describe one output file relative to the stage folder: path, sha256 and size."""
    return {"path": path.relative_to(root).as_posix(), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def provenance(started: float, finished: float, **extra: Any) -> dict[str, Any]:
    return {
        "tool": "st",
        "version": __version__,
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "pid": os.getpid(),
        "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"),
        "finished": _dt.datetime.fromtimestamp(finished, _dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(finished - started, 3),
        **extra,
    }


def finalise(doc: dict[str, Any]) -> dict[str, Any]:
    """Sort outputs by path and fill in `digest`."""
    doc = dict(doc)
    doc["outputs"] = sorted(doc.get("outputs", []), key=lambda o: o["path"])
    doc["digest"] = compute_digest(doc)
    return doc


def write_manifest(out_dir: Path, doc: dict[str, Any], stage: str, version: int) -> dict[str, Any]:
    """Validate and atomically write `out_dir/manifest.json`; call it after every other output is in place."""
    doc = finalise(doc)
    validate(doc, stage, version, str(out_dir / MANIFEST_NAME))
    atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return doc


def parse_schema_id(value: Any) -> tuple[str, int] | None:
    if not isinstance(value, str) or not value.startswith("st.") or "/" not in value:
        return None
    stage, _, version = value[3:].partition("/")
    return (stage, int(version)) if version.isdigit() else None


def read_manifest(path: str | Path, stage: str | None = None, versions: tuple[int, ...] = (1,)) -> dict[str, Any]:
    """Read and validate a manifest. `path` may be the manifest file or the stage folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist; run the stage that writes it first")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); re-run the stage that wrote it") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{path} is not a manifest (expected a JSON object)")
    parsed = parse_schema_id(doc.get("schema"))
    if parsed is None:
        raise ManifestError(f"{path} has no valid 'schema' field (found {doc.get('schema')!r})")
    found_stage, version = parsed
    if stage is not None and found_stage != stage:
        raise ManifestError(f"{path} is a '{found_stage}' manifest, but a '{stage}' manifest is needed here")
    if version not in versions:
        known = ", ".join(f"st.{found_stage}/{v}" for v in versions)
        raise ManifestError(
            f"{path} has schema st.{found_stage}/{version}, which this st {__version__} cannot read (it reads {known});"
            " re-run the stage with this version of st"
        )
    validate(doc, found_stage, version, str(path))
    if doc.get("digest") != compute_digest(doc):
        raise ManifestError(f"{path} was edited after it was written (its digest does not match its content)")
    return doc
