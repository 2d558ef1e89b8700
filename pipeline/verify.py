"""`st verify`: re-hash the output files a stage manifest lists and compare them with what it recorded.

For a cache output it also checks structure, since a crafted folder can carry a manifest whose hashes all match: each
shard must be a well-formed tar of well-formed samples whose every member decodes within the bounds the manifest
implies, its index (in its sidecar) must describe it exactly, and the shared embeddings must decode too (see
`pipeline.shardformat`).

Also home to what `st status` shares with it: turning the paths a user gives into manifest files (a manifest, a stage
folder, or a run folder with prepare/, cache/, train/ and publish/ inside) and the per-file check of a manifest's
`outputs`, cheap (existence and size) or full (sha256).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .artifacts.location import is_remote_path
from .errors import ManifestError, UserError
from .filecheck import MISSING, SHA256, SIZE, FileMismatch, check_entry
from .manifest import MANIFEST_NAME, parse_schema_id, read_manifest

STAGES = ("prepare", "cache", "train", "publish")
LARGE_BYTES = 64 << 20  # a manifest whose outputs add up to this much gets a progress bar


@dataclass
class Mismatch:
    """One output file that does not match its manifest entry."""

    path: str  # relative to the stage folder
    problem: str  # "missing", "size differs", "sha256 differs" or "malformed"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.problem}: {self.path}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Verification:
    """The result of re-hashing one manifest's outputs; `error` is set when the manifest itself is invalid."""

    manifest: Path
    stage: str | None
    files: int = 0
    bytes: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.mismatches


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)  # pragma: no cover


def read_raw(file: Path) -> Any:
    """The JSON in `file`, or None when it cannot be read or parsed."""
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def raw_stage(raw: Any) -> str | None:
    """The stage a (possibly invalid) manifest document claims to be, from its `schema` field."""
    parsed = parse_schema_id(raw.get("schema")) if isinstance(raw, dict) else None
    return parsed[0] if parsed else None


def short_error(exc: Exception, file: Path) -> str:
    """A manifest error's message without the manifest's path (shown beside it already)."""
    return str(exc).replace(str(file), MANIFEST_NAME)


def run_folder(path: Path) -> dict[str, Path] | None:
    """Stage name -> subfolder, when `path` is a run folder (no manifest of its own; prepare/, cache/... inside)."""
    path = Path(path)
    if not path.is_dir() or (path / MANIFEST_NAME).exists():
        return None
    found = {stage: path / stage for stage in STAGES if (path / stage).is_dir()}
    return found or None


def manifest_file(path: Path) -> Path:
    """The stage manifest `path` names (the file, or `<folder>/manifest.json`); ManifestError when it names none.

    A file called manifest.json counts even when it is damaged (that is a finding); any other file must carry an
    `st.<stage>/<n>` schema id of one of the four stages."""
    path = Path(path)
    file = path / MANIFEST_NAME if path.is_dir() else path
    if not file.is_file():
        if path.is_dir():
            raise ManifestError(f"{path} is not a stage folder (it holds no {MANIFEST_NAME}); pass the output folder "
                                "of a stage, its manifest.json, or a run folder with prepare/, cache/, train/, "
                                "publish/ inside")  # fmt: skip
        raise ManifestError(f"{path} does not exist")
    stage = raw_stage(read_raw(file))
    if stage is None and file.name != MANIFEST_NAME:
        raise ManifestError(f"{file} is not an st manifest (it has no 'schema' field like \"st.cache/1\")")
    if stage is not None and stage not in STAGES:
        raise ManifestError(f"{file} is a '{stage}' document, not a stage manifest ({', '.join(STAGES)})")
    return file


def expand(paths: Iterable[Path]) -> list[Path]:
    """Manifest files for the given manifests, stage folders and run folders, in order; raises before any work."""
    files: list[Path] = []
    for path in paths:
        if is_remote_path(path):  # s3://bucket/prefix: its manifest is read from the bucket by verify_manifest
            files.append(path)
            continue
        stages = run_folder(Path(path))
        if stages is None:
            files.append(manifest_file(Path(path)))
            continue
        found = [folder / MANIFEST_NAME for folder in stages.values() if (folder / MANIFEST_NAME).is_file()]
        if not found:
            raise ManifestError(f"{path} holds stage folders ({', '.join(stages)}) but no {MANIFEST_NAME} in them")
        files += found
    return files


_PROBLEMS = {MISSING: "missing", SIZE: "size differs", SHA256: "sha256 differs"}


def check_outputs(folder: Path, outputs: list[dict[str, Any]], *, rehash: bool,
                  advance: Callable[[int], Any] | None = None) -> list[Mismatch]:  # fmt: skip
    """Compare each `{path, sha256, bytes}` entry with the file under `folder`: existence and size, plus the sha256
    when `rehash`. `advance(n)` is called with each file's recorded bytes once it is checked, for a progress bar."""
    mismatches = []
    for entry in outputs:
        found = check_entry(folder, entry, hash=rehash)
        if found is not None:
            mismatches.append(Mismatch(entry["path"], _PROBLEMS[found.kind], _detail(found, entry)))
        if advance is not None:
            advance(entry["bytes"])
    return mismatches


def _detail(found: FileMismatch, entry: dict[str, Any]) -> str:
    if found.kind == SIZE:
        return f"recorded {entry['bytes']} bytes, found {found.found_bytes}"
    if found.kind == SHA256:
        return f"recorded {entry['sha256'][:12]}.."
    return ""


def verify_manifest(path: Path, *, progress: bool = True) -> Verification:
    """Check a manifest's schema and digest, then re-hash every output it lists (and check a cache's structure)."""
    if is_remote_path(path):
        from .artifacts.inspect import verify_remote

        return verify_remote(path)
    file = manifest_file(path)
    try:
        doc = read_manifest(file)
    except ManifestError as exc:
        return Verification(file, raw_stage(read_raw(file)), error=short_error(exc, file))
    outputs = doc["outputs"]
    total = sum(o["bytes"] for o in outputs)
    result = Verification(file, doc["stage"], files=len(outputs), bytes=total)
    if progress and total >= LARGE_BYTES:
        from .progress import progress_bar

        with progress_bar(total=total, desc=f"verify {doc['stage']}", unit="B", unit_scale=True) as bar:
            result.mismatches = check_outputs(file.parent, outputs, rehash=True, advance=bar.update)
    else:
        result.mismatches = check_outputs(file.parent, outputs, rehash=True)
    if doc["stage"] == "cache":
        result.mismatches += check_cache_structure(file.parent, doc, {m.path for m in result.mismatches})
    return result


def check_cache_structure(folder: Path, doc: dict[str, Any], failed: set[str]) -> list[Mismatch]:
    """Decode every shard and the shared embeddings of a cache output in full, within the bounds its manifest
    implies; one finding per file, naming the member. Files in `failed` (already reported) are skipped; a shard whose
    hash was not just checked as one of the outputs is hash-checked as it is read."""
    from .shardformat import CacheChecks, IndexedShard, read_shard, scan_shard

    checks = CacheChecks(doc)
    hashed = {o["path"]: o["sha256"] for o in doc["outputs"] if o["path"] not in failed}
    found = []
    for shard in doc["shards"]:
        if shard["path"] in failed:
            continue
        path = folder / shard["path"]
        expected = None if hashed.get(shard["path"]) == shard["sha256"] else shard["sha256"]
        try:
            for key, members in read_shard(path, expected_sha256=expected, expected_bytes=shard["bytes"],
                                           expected_samples=shard["samples"]):  # fmt: skip
                checks.check_sample(path, shard, key, members, decompress=True)
            indexed = IndexedShard(folder, shard, checks)
            if indexed.load_recorded(None):  # the sidecar was re-hashed as one of the outputs
                indexed.compare(scan_shard(path, expected_sha256=None, expected_bytes=shard["bytes"]))
        except UserError as exc:
            found.append(Mismatch(shard["path"], "malformed", _relative(str(exc), path, shard["path"])))
    embeds = doc["embeds"]["path"]
    if embeds not in failed and (folder / embeds).is_file():
        try:
            checks.check_embeds((folder / embeds).read_bytes(), embeds, decompress=True)
        except UserError as exc:
            found.append(Mismatch(embeds, "malformed", str(exc).removeprefix(f"{embeds}: ")))
    return found


def _relative(message: str, path: Path, rel: str) -> str:
    """A shard error's message without the shard's absolute path (the finding names the shard already)."""
    return message.replace(f"cache shard {path}, ", "").replace(f"cache shard {path}", "the shard").replace(
        str(path), rel)


def verify_paths(paths: Iterable[Path], *, progress: bool = True) -> list[Verification]:
    """Verify every manifest the paths name (see `expand`); ManifestError up front for a path that names none."""
    return [verify_manifest(file, progress=progress) for file in expand(paths)]


def format_verification(result: Verification) -> str:
    """`ok  <path>  (N files, X MB)`, or FAILED with one indented line per problem."""
    if result.ok:
        return f"ok  {result.manifest}  ({result.files} files, {human_bytes(result.bytes)})"
    lines = [f"FAILED  {result.manifest}"]
    if result.error is not None:
        lines.append(f"  invalid manifest: {result.error}")
    lines += [f"  {m}" for m in result.mismatches]
    return "\n".join(lines)
