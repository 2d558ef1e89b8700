"""Lineage checks: a stage trusts its input only while the input's files and its recorded ancestry still hold.

A stage reads one input, its parent's output folder, and checks two things before it uses it:

1. the parent's files still have the sha256 and size its manifest records (`verify_outputs`), and
2. the parent's own parent (the grandparent, found through the path the parent recorded in its provenance) still has
   the digest the parent was built from (`check_parent_chain`). A grandparent that changed means the input is stale:
   the stage refuses, naming both manifests, both digests and the stage to re-run. `force=True` (`--force`) goes on
   anyway; the stage records the reasons it overrode under its manifest's `provenance.lineage`.

A grandparent that is not on disk is not an error: an output folder is portable, so a cache copied to a training machine
without its prepare output (or source images) must still train. That case is logged, never refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .errors import LineageError, ManifestError
from .filecheck import MISSING, SIZE, check_entry
from .log import get_logger
from .manifest import MANIFEST_NAME, read_manifest

log = get_logger("lineage")


def _short(digest: str | None) -> str:
    return f"{str(digest)[:12]}..."


def verify_outputs(manifest: dict[str, Any], folder: Path, manifest_path: Path, *, writer: str,
                   size_only: Iterable[str] = ()) -> None:  # fmt: skip
    """Raise LineageError naming the first output of `manifest` that is missing or changed under `folder`.

    `writer` is the stage that wrote the output (the one to re-run). Paths in `size_only` are only checked for size:
    the caller hash-checks them itself as it reads them, so they are not read twice.
    """
    cheap = set(size_only)
    for entry in manifest.get("outputs", []):
        mismatch = check_entry(folder, entry, hash=entry["path"] not in cheap)
        if mismatch is None:
            continue
        file = mismatch.path
        if mismatch.kind == MISSING:
            raise LineageError(f"{file} is missing, but {manifest_path} lists it; re-run `st {writer}`")
        if mismatch.kind == SIZE:
            raise LineageError(f"{file} changed after `st {writer}` wrote it (its size, {mismatch.found_bytes} bytes, "
                               f"no longer matches the {entry['bytes']} bytes {manifest_path} records); "
                               f"re-run `st {writer}`")  # fmt: skip
        raise LineageError(f"{file} changed after `st {writer}` wrote it (its sha256 no longer matches "
                           f"{manifest_path}); re-run `st {writer}`")  # fmt: skip


def recorded_parent_path(manifest: dict[str, Any]) -> str | None:
    """Where `manifest`'s stage read its parent from, as recorded in its provenance (`parent_path`, `<stage>_path`)."""
    parent = manifest.get("parent") or {}
    provenance = manifest.get("provenance") or {}
    return provenance.get("parent_path") or provenance.get(f"{parent.get('stage')}_path")


def locate(recorded: str | None, *near: Path) -> Path | None:
    """A recorded manifest path: as written, else relative to each of the `near` folders (the folder that recorded
    it first); None if it is not on disk."""
    if not recorded:
        return None
    path = Path(recorded)
    for candidate in (path, *(Path(folder) / path for folder in near)):
        candidate = candidate / MANIFEST_NAME if candidate.is_dir() else candidate
        if candidate.is_file():
            return candidate
    return None


def check_parent_chain(child: dict[str, Any], child_path: Path, *, expect_stage: str, rerun: str,
                       force: bool = False) -> list[str]:  # fmt: skip
    """Check that `child` (the manifest at `child_path`, the input of the running stage) is not stale.

    `child` records the digest of the `expect_stage` output it was built from and where that output was. If that
    manifest is still on disk, its digest must be the recorded one (and it must be readable); otherwise this raises
    LineageError naming both manifests and `rerun` (the command that rebuilds `child`), unless `force` is set: then
    the problem is logged as a warning and returned, for the caller to record under `provenance.lineage`.
    A parent that is not on disk only gets an info line (the folder was copied on its own: that is allowed).
    """
    child_path = Path(child_path)
    child_path = child_path / MANIFEST_NAME if child_path.is_dir() else child_path
    parent = child.get("parent")
    if not parent:  # the first stage: nothing behind it
        return []
    if parent.get("stage") != expect_stage:
        raise LineageError(f"{child_path} was built from a {parent.get('stage')!r} output, but a {expect_stage!r} "
                           f"output is expected there; re-run `{rerun}`")  # fmt: skip
    want = parent.get("digest")
    recorded = recorded_parent_path(child)
    path = locate(recorded, child_path.parent)
    if path is None:
        log.info("lineage: the %s output %s was built from (%s) is not on this machine; the lineage beyond %s "
                 "could not be checked", expect_stage, child_path, recorded or "path not recorded",
                 child_path.parent)  # fmt: skip
        return []
    try:
        found = read_manifest(path, stage=expect_stage)
    except ManifestError as exc:
        problem = (f"{child_path} was built from the {expect_stage} output {path.parent}, whose manifest can no "
                   f"longer be used ({exc}); re-run `st {expect_stage}` and `{rerun}`")  # fmt: skip
    else:
        if found["digest"] == want:
            log.debug("lineage: %s still has digest %s, as %s records", path, _short(want), child_path)
            return []
        problem = (f"{child_path} was built from {expect_stage} digest {_short(want)}, but {path} is now "
                   f"{_short(found['digest'])}; re-run `{rerun}`")  # fmt: skip
    if not force:
        raise LineageError(f"{problem} (or pass --force to use {child_path.parent} as it is)")
    log.warning("lineage: %s; going on because --force was given (recorded in the manifest)", problem)
    return [problem]


def forced_record(reasons: list[str]) -> dict[str, Any]:
    """The `provenance.lineage` entry of a stage that overrode lineage problems with --force (empty if none)."""
    return {"lineage": {"forced": True, "reasons": list(reasons)}} if reasons else {}
