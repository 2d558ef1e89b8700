"""`st status`: the lineage chain of stage outputs, read from their manifests alone.

Each stage's state says whether its parent is still what it was built from: the child records the parent's digest,
and the parent manifest (found among the folders given, else at the path the child recorded in its provenance) is
compared with it. Output files are checked cheaply (present, right size) unless `verify=True` re-hashes them.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .artifacts.location import is_remote_path
from .errors import InputError, ManifestError
from .lineage import locate, recorded_parent_path
from .manifest import MANIFEST_NAME, read_manifest
from .console import format_table
from .verify import (
    STAGES,
    Mismatch,
    check_outputs,
    human_bytes,
    manifest_file,
    raw_stage,
    read_raw,
    run_folder,
    short_error,
)

# Where each child records the path it read its parent's manifest from (in its provenance, outside the digest).
PARENT_STAGE = {"cache": "prepare", "train": "cache", "publish": "train"}
NOT_FOUND = "parent not found (copied without it?)"


@dataclass
class ParentLink:
    """What a child recorded about its parent, and what is there now."""

    stage: str
    recorded_digest: str
    current_digest: str | None = None  # None when the parent manifest was not found or is unreadable
    manifest: Path | None = None


@dataclass
class StageStatus:
    """One row of `st status`: a stage output, its state, and what its manifest says about it."""

    stage: str
    folder: Path
    manifest: Path
    found_by: str  # "given", or "recorded path" for an ancestor located through a child's provenance
    digest: str | None = None
    state: str = "ok"  # ok | stale | parent not found | parent invalid | damaged | invalid | missing
    problems: list[str] = field(default_factory=list)
    damaged: list[Mismatch] = field(default_factory=list)
    parent: ParentLink | None = None
    files: int = 0
    bytes: int = 0
    count: int | None = None
    count_unit: str = ""
    seconds: float | None = None
    finished: str | None = None
    doc: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def message(self) -> str:
        return "; ".join(self.problems) if self.problems else "ok"

    def add(self, state: str, message: str) -> None:
        if not self.problems:
            self.state = state
        self.problems.append(message)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("doc")
        data["folder"], data["manifest"] = str(self.folder), str(self.manifest)
        data["message"] = self.message
        if self.parent is not None and self.parent.manifest is not None:
            data["parent"]["manifest"] = str(self.parent.manifest)
        return data


def _count(doc: dict[str, Any]) -> tuple[int | None, str]:
    stage = doc["stage"]
    if stage in ("prepare", "cache"):
        return doc["stats"].get("samples"), "samples"
    if stage == "train":
        return doc["metrics"].get("steps"), "steps"
    return len(doc.get("weights", [])), "weights"


def _load(file: Path, found_by: str, stage_hint: str | None = None) -> StageStatus:
    """Read one manifest into a row; a manifest failing its schema or digest gives an "invalid" row."""
    if not file.is_file():
        row = StageStatus(stage_hint or "?", file.parent, file, found_by)
        row.add("missing", f"missing: no {MANIFEST_NAME} (not run yet, or interrupted)")
        return row
    try:
        doc = read_manifest(file)
    except ManifestError as exc:
        raw = read_raw(file)
        row = StageStatus(raw_stage(raw) or stage_hint or "?", file.parent, file, found_by)
        digest = raw.get("digest") if isinstance(raw, dict) else None
        row.digest = digest if isinstance(digest, str) else None
        row.add("invalid", f"invalid: {short_error(exc, file)}")
        return row
    prov = doc["provenance"]
    count, unit = _count(doc)
    return StageStatus(doc["stage"], file.parent, file, found_by, digest=doc["digest"],
                       files=len(doc["outputs"]), bytes=sum(o["bytes"] for o in doc["outputs"]), count=count,
                       count_unit=unit, seconds=prov.get("seconds"), finished=prov.get("finished"),
                       doc=doc)  # fmt: skip


def _load_remote(value: Path) -> StageStatus:
    """A row for an s3://bucket/prefix output: its manifest read from the bucket, its folder the prefix."""
    from .artifacts.inspect import manifest_copy

    where, file = manifest_copy(value)
    if file is None:
        raise ManifestError(f"{where.url} holds no {MANIFEST_NAME} (not run yet, or its upload stopped midway)")
    row = _load(file, "given")
    row.folder, row.manifest = where, where / MANIFEST_NAME
    return row


def _recorded_parent(row: StageStatus) -> Path | None:
    """The parent manifest at the path the child recorded: as written (absolute, or relative to the current folder),
    else relative to the child's folder or the folder holding it (stage folders side by side in a run folder)."""
    if not row.doc or is_remote_path(row.folder):  # a prefix's parent: give it too (another s3:// path)
        return None
    return locate(recorded_parent_path(row.doc), row.folder, row.folder.parent)


def _inputs(paths: list[Path]) -> dict[str, StageStatus]:
    """Rows for the given paths, by stage: manifests, stage folders, or one run folder."""
    if not paths:
        raise InputError("give at least one stage folder, manifest, or run folder")
    runs = [(p, None if is_remote_path(p) else run_folder(p)) for p in paths]
    runs = [(p, stages) for p, stages in runs if stages is not None]
    if runs and len(paths) > 1:
        raise InputError(f"{runs[0][0]} is a run folder; give one run folder, or stage folders and manifests")
    if runs:
        rows = [_load(folder / MANIFEST_NAME, "given", stage) for stage, folder in runs[0][1].items()]
    else:
        rows = [_load_remote(p) if is_remote_path(p) else _load(manifest_file(p), "given",
                                                                  p.name if p.name in STAGES else None)
                for p in paths]  # fmt: skip
    by_stage: dict[str, StageStatus] = {}
    for row in rows:
        if row.stage not in STAGES:
            raise ManifestError(f"{row.manifest} is not a stage manifest ({row.message})")
        if row.stage in by_stage:
            raise InputError(f"two {row.stage} manifests given ({by_stage[row.stage].manifest} and {row.manifest}); "
                             "give one folder per stage")  # fmt: skip
        by_stage[row.stage] = row
    return by_stage


def _check_parent(row: StageStatus, parent: StageStatus | None) -> None:
    recorded = row.doc["parent"]["digest"]
    pstage = PARENT_STAGE[row.stage]
    row.parent = ParentLink(pstage, recorded)
    if parent is None:
        row.add("parent not found", NOT_FOUND)
        return
    row.parent.manifest = parent.manifest
    if parent.doc is None:
        row.add("parent invalid", f"parent {pstage} unreadable ({parent.state}); re-run `st {pstage}`, "
                                  f"then `st {row.stage}`")  # fmt: skip
        return
    row.parent.current_digest = parent.digest
    if parent.digest != recorded:
        row.add("stale", f"stale: {pstage} changed (recorded {recorded[:8]}.. now {parent.digest[:8]}..); "
                         f"re-run `st {row.stage}`")  # fmt: skip


def stage_status(paths: Iterable[Path], *, verify: bool = False) -> list[StageStatus]:
    """The lineage chain behind `paths`, oldest stage first, with each stage's state.

    A parent not among `paths` is looked for at the path its child recorded, and joins the chain when found."""
    by_stage = _inputs([Path(p) for p in paths])
    for stage in reversed(STAGES[1:]):  # publish, train, cache: each may add its parent for the next round
        row = by_stage.get(stage)
        pstage = PARENT_STAGE[stage]
        if row is None or row.doc is None or pstage in by_stage:
            continue
        found = _recorded_parent(row)
        if found is not None:
            parent = _load(found, "recorded path")
            if parent.stage == pstage:
                by_stage[pstage] = parent
    rows = [by_stage[s] for s in STAGES if s in by_stage]
    for row in rows:
        if row.doc is None:
            continue
        row.damaged = _check(row, verify)
        if row.damaged:
            first = row.damaged[0]
            more = f" (+{len(row.damaged) - 1} more)" if len(row.damaged) > 1 else ""
            row.add("damaged", f"damaged: {first.path} {first.problem}{more}")
        if row.stage in PARENT_STAGE:
            _check_parent(row, by_stage.get(PARENT_STAGE[row.stage]))
    return rows


def _check(row: StageStatus, verify: bool) -> list[Mismatch]:
    if is_remote_path(row.folder):
        from .artifacts.inspect import check_objects

        return check_objects(row.folder, row.doc["outputs"], rehash=verify)
    return check_outputs(row.folder, row.doc["outputs"], rehash=verify)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    return f"{minutes // 60}h {minutes % 60:02d}m"


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        moment = _dt.datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if moment.tzinfo is not None:
        moment = moment.astimezone(_dt.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if moment.tzinfo is not None else "")


def _amount(row: StageStatus) -> str:
    if row.count is None:
        return "-"
    return f"{row.count} {row.count_unit[:-1] if row.count == 1 else row.count_unit}"


def format_status(rows: list[StageStatus]) -> str:
    """The chain as a table, plus a hint when a stale stage has stages after it."""
    table = format_table(
        ["stage", "folder", "digest", "state", "outputs", "count", "took", "finished"],
        [[r.stage, r.folder, (r.digest or "-")[:12], r.message, human_bytes(r.bytes) if r.doc else "-",
          _amount(r), _duration(r.seconds), _when(r.finished)]
         for r in rows],
        right=(4, 5, 6),
    )  # fmt: skip
    stale = next((r for r in rows if r.state in ("stale", "parent invalid")), None)
    after = [r.stage for r in rows if stale and STAGES.index(r.stage) > STAGES.index(stale.stage)]
    if stale and after:
        table += f"\nafter re-running `st {stale.stage}`, re-run the stages after it too ({', '.join(after)})"
    return table
