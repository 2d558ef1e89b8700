"""The stage runner: the one skeleton every stage follows, after dvc's `Stage.reproduce` / `changed()`.

    key (hash of the inputs, computed before any work)
      -> up to date?   the output's manifest records this key and every output it lists is intact: skip
      -> why it runs   logged the way `dvc repro` says it ("config key lr changed: 0.1 -> 0.2", "--force was given")
      -> the stage's own work
      -> manifest      written last, atomically; then the stat record

Checks go from cheap to dear. A different key means the stage runs: no output file is read. With the same key, each
output's stat (size, mtime, ctime, inode) is compared with the stat record written after the manifest, and only files
whose stat differs are re-hashed, so an up-to-date `st cache` does not re-read the cache. Stat records are this
machine's state, like dvc's state database, not part of the output: they live under `$ST_STATE_DIR` (default
`$XDG_CACHE_HOME/st/state`, else `~/.cache/st/state`), one JSON file per output folder, keyed by its real path and
manifest digest. Without one (a folder copied from elsewhere, a new machine) every output is hashed once and the record
written.

Which options enter a key is declared on the option itself (`opt(..., key=False)` in config.py), so a stage's key
material is `config.stage_keys(stage)` plus what the stage hashes from its inputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

from .errors import ManifestError
from .filecheck import MISSING, check_entry
from .fsutil import atomic_write_text
from .hashing import sha256_bytes
from .log import get_logger
from .manifest import MANIFEST_NAME, read_manifest, write_manifest

log = get_logger("runner")


@dataclass
class Previous:
    """What an output folder already holds, and whether it matches the key just computed."""

    manifest: dict[str, Any] | None
    current: bool
    problem: str | None = None
    damaged: list[str] = field(default_factory=list)


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def state_dir() -> Path:
    """Where this machine keeps stat records: $ST_STATE_DIR, else $XDG_CACHE_HOME/st/state, else ~/.cache/st/state."""
    if os.environ.get("ST_STATE_DIR"):
        return Path(os.environ["ST_STATE_DIR"])
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "st" / "state"


def _record_path(out_dir: Path) -> Path:
    return state_dir() / f"{sha256_bytes(str(out_dir.resolve()).encode())[:32]}.json"


def _read_stat_record(out_dir: Path, manifest: dict[str, Any]) -> dict[str, list]:
    try:
        record = json.loads(_record_path(out_dir).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("folder") != str(out_dir.resolve()) or \
            record.get("digest") != manifest.get("digest") or not isinstance(record.get("files"), dict):  # fmt: skip
        return {}
    return record["files"]


def _write_stat_record(out_dir: Path, manifest: dict[str, Any]) -> None:
    files = {e["path"]: [e["sha256"], *(_stat(out_dir / e["path"]) or [])] for e in manifest.get("outputs", [])}
    doc = {"folder": str(out_dir.resolve()), "digest": manifest.get("digest"), "files": files}
    try:
        path = _record_path(out_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(doc, sort_keys=True) + "\n")
    except OSError as exc:  # a record only saves hashing: without it the next check hashes
        log.debug("could not write the stat record of %s: %s", out_dir, exc)


def damaged_outputs(out_dir: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Outputs of `manifest` that are missing or changed, as {path: "is missing" | "was modified"}. A file whose stat
    matches the stat record is not re-hashed; the record is refreshed when every file turned out intact but some had
    to be hashed."""
    record = _read_stat_record(out_dir, manifest)
    damaged, hashed = {}, 0
    for entry in manifest.get("outputs", []):
        path = out_dir / entry["path"]
        if record.get(entry["path"]) == [entry["sha256"], *(_stat(path) or [None])]:
            continue  # the same size, times and inode as when it was recorded with this sha256
        mismatch = check_entry(out_dir, entry)
        hashed += 1
        if mismatch is not None:
            damaged[entry["path"]] = "is missing" if mismatch.kind == MISSING else "was modified"
    if not damaged and hashed:
        _write_stat_record(out_dir, manifest)
    return damaged


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """"config key X changed: a -> b" lines between the recorded and the current key config."""
    changes = []
    for key in sorted(set(old) | set(new)):
        if key not in old:
            changes.append(f"config key {key} is new: {_short(new[key])}")
        elif key not in new:
            changes.append(f"config key {key} is no longer read")
        elif old[key] != new[key]:
            changes.append(f"config key {key} changed: {_short(old[key])} -> {_short(new[key])}")
    return changes


@dataclass
class StageResult:
    """What a stage run returns: its output folder, its manifest (None where it wrote none: a part, a process other
    than the first), whether it was already up to date, and why it ran."""

    out_dir: Path
    manifest: dict[str, Any] | None
    up_to_date: bool
    reasons: list[str] = field(default_factory=list)


class StageRun:
    """One run of a stage into `out_dir`: decides whether it must run, says why, and writes its manifest.

    `config` is the key config the manifest records (`config.stage_keys(stage)`, possibly with stage additions);
    `key` hashes it together with everything else the stage read.
    """

    def __init__(self, stage: str, schema_version: int, out_dir: Path, key: str, config: dict[str, Any], *,
                 force: bool = False) -> None:  # fmt: skip
        self.stage = stage
        self.schema_version = schema_version
        self.out_dir = Path(out_dir)
        self.key = key
        self.config = config
        self.force = force

    @cached_property
    def previous(self) -> Previous:
        """The output folder's manifest and whether it is current: key first, then stat, then hashes."""
        path = self.out_dir / MANIFEST_NAME
        if not path.is_file():
            return Previous(None, False, f"there is no previous output in {self.out_dir}")
        try:
            manifest = read_manifest(path, stage=self.stage, versions=(self.schema_version,))
        except ManifestError as exc:
            return Previous(None, False, f"the previous manifest cannot be used ({exc})")
        if manifest.get("key") != self.key:
            return Previous(manifest, False)
        damaged = [f"{path} {what}" for path, what in damaged_outputs(self.out_dir, manifest).items()]
        if damaged:
            return Previous(manifest, False, "the previous output is damaged: " + "; ".join(damaged), damaged)
        return Previous(manifest, True)

    @property
    def up_to_date(self) -> bool:
        """True when the previous output is current and --force was not given (the command line says so)."""
        if self.force or not self.previous.current:
            return False
        log.debug("%s: %s is up to date (key %s), nothing to do", self.stage, self.out_dir / MANIFEST_NAME,
                 self.key[:12])  # fmt: skip
        return True

    def reasons(self, extra: Iterable[str | None] = (), *, announce: bool = True) -> list[str]:
        """Why the stage runs (forced, no output, damaged output, config changes, `extra` input changes); logged
        unless `announce` is False (the processes other than the first of a multi-process run)."""
        previous = self.previous
        if self.force:
            reasons = ["--force was given"]
        elif previous.problem:
            reasons = [previous.problem]
        else:
            reasons = config_changes(previous.manifest.get("config", {}), self.config) if previous.manifest else []
            reasons += [r for r in extra if r]
            reasons = reasons or ["its inputs changed (the stage key differs from the recorded one)"]
        for reason in reasons if announce else ():
            log.info("%s: running because %s", self.stage, reason)
        return reasons

    def write_manifest(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Validate and write the manifest (after every other output is in place), then the stat record."""
        doc = write_manifest(self.out_dir, doc, self.stage, self.schema_version)
        _write_stat_record(self.out_dir, doc)
        return doc
