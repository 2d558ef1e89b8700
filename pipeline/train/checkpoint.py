"""Checkpoints: trainable weights, optimizer, LR scheduler, RNG states, EMA and the data cursor, without pickle.

A checkpoint is a folder `checkpoint-<step>` holding safetensors and JSON files and a small manifest with their hashes.
It is written as `checkpoint-<step>.tmp` and renamed when complete, so a crash while saving leaves the previous
checkpoints intact. Loading verifies every hash; a missing or damaged checkpoint is an error naming it.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path
from typing import Any, Callable

from ..artifacts.checkpoints import checkpoint_written
from ..errors import InputError, UserError
from ..filecheck import check_entry
from ..fsutil import atomic_write_text, fsync_dir
from ..hashing import sha256_file
from ..log import get_logger
from ..ownership import note_writing, remove_owned
from ..tensorfile import save_tensors

log = get_logger("train")

CHECKPOINT_SCHEMA = "st.checkpoint/1"
_NAME = re.compile(r"^(checkpoint|rolling)-(\d+)$")


class CheckpointError(UserError):
    """A checkpoint is missing, damaged, or could not be written."""


def list_checkpoints(folder: Path, kind: str | None = None) -> list[tuple[int, Path]]:
    """Complete checkpoints under `folder`, oldest first (kind: "checkpoint", "rolling", or both)."""
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            match = _NAME.match(path.name)
            if match and path.is_dir() and (path / "manifest.json").is_file() and (kind in (None, match.group(1))):
                found.append((int(match.group(2)), path))
    return sorted(found)


def begin_checkpoint(folder: Path, name: str) -> Path:
    """Create the empty `name.tmp` folder that every process then writes its own state into."""
    tmp = folder / f"{name}.tmp"
    note_writing(folder / name, folder=True)
    if tmp.exists():
        remove_owned(tmp)
    tmp.mkdir(parents=True)
    return tmp


def save_rank_state(tmp: Path, rank: int, state: dict[str, Any]) -> None:
    """One process's RNG and generator states (each process writes its own file: nothing is pickled or sent)."""
    from .state_io import save_state

    save_state(tmp / f"rank{rank}", state)


def finish_checkpoint(folder: Path, name: str, parts: dict[str, Any], info: dict[str, Any]) -> Path:
    """Add weights, optimizer and scheduler to `name.tmp`, hash everything, and rename it to `name`.

    `parts`: {"weights": {...}, "ema": {...} or None, "optimizer": state_dict, "scheduler": state_dict, and
    optionally "crepa": the CREPA projector's weights}."""
    from .state_io import save_state

    final = folder / name
    tmp = folder / f"{name}.tmp"
    try:
        save_tensors(tmp / "weights.safetensors", parts["weights"])
        if parts.get("ema"):
            save_tensors(tmp / "ema.safetensors", parts["ema"])
        if parts.get("crepa"):
            save_tensors(tmp / "crepa.safetensors", parts["crepa"])
        save_state(tmp / "optimizer", parts["optimizer"])
        save_state(tmp / "scheduler", parts["scheduler"])
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        manifest = {
            "schema": CHECKPOINT_SCHEMA,
            **info,
            "files": [{"path": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files],
        }
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if final.exists():
            remove_owned(final)
        if final.exists():
            raise CheckpointError(f"{final} holds files st did not write; move it away and resume with "
                                  "resume_from_checkpoint = \"latest\"")  # fmt: skip
        tmp.rename(final)
        fsync_dir(folder)
    except OSError as exc:
        remove_owned(tmp)
        if exc.errno == errno.ENOSPC:
            raise CheckpointError(
                f"the disk is full while writing checkpoint {final}; the earlier checkpoints are intact. Free space "
                "(or lower checkpoints_total_limit) and resume with resume_from_checkpoint = \"latest\""
            ) from None
        raise
    checkpoint_written(final)  # an output on S3 uploads it now
    return final


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Verify and load a checkpoint folder; returns its manifest info plus the loaded parts."""
    from safetensors.torch import load_file

    from .state_io import load_state

    manifest_path = path / "manifest.json"
    if not path.is_dir() or not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is incomplete (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path} has a damaged manifest.json") from None
    if manifest.get("schema") != CHECKPOINT_SCHEMA:
        raise CheckpointError(f"checkpoint {path} has schema {manifest.get('schema')!r}, not {CHECKPOINT_SCHEMA}")
    for entry in manifest["files"]:
        mismatch = check_entry(path, entry)
        if mismatch is not None:
            raise CheckpointError(f"checkpoint {path} is damaged: {entry['path']} {mismatch.describe()}")
    names = {e["path"] for e in manifest["files"]}
    loaded = {
        "info": manifest,
        "weights": load_file(str(path / "weights.safetensors")),
        "ema": load_file(str(path / "ema.safetensors")) if "ema.safetensors" in names else None,
        "crepa": load_file(str(path / "crepa.safetensors")) if "crepa.safetensors" in names else None,
        "optimizer": load_state(path / "optimizer"),
        "scheduler": load_state(path / "scheduler"),
        "ranks": {},
    }
    for name in sorted(names):
        match = re.match(r"^rank(\d+)\.json$", name)
        if match:
            loaded["ranks"][int(match.group(1))] = load_state(path / f"rank{match.group(1)}")
    return loaded


def resolve_resume(value: str | None, checkpoints_dir: Path, base: Path) -> Path | None:
    """The checkpoint `resume_from_checkpoint` names: a path, or "latest" (None when there is none yet, or for the
    value "none")."""
    if not value or value.lower() == "none":
        return None
    if value == "latest":
        found = list_checkpoints(checkpoints_dir)
        if not found:
            log.info("resume_from_checkpoint = latest: no checkpoint under %s yet; starting at step 0", checkpoints_dir)
            return None
        return max(found)[1]
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_dir():
        alt = checkpoints_dir / value
        if alt.is_dir():
            return alt
        raise InputError(f"resume_from_checkpoint {value!r}: no checkpoint at {path}; a missing checkpoint is never "
                         "replaced by a fresh start (set it to \"none\" to start from step 0)")  # fmt: skip
    return path


def prune(folder: Path, kind: str, limit: int | None, belongs: Callable[[Path], bool] | None = None) -> None:
    """Keep the newest `limit` checkpoints of `kind` (of those for which `belongs` is true: the current run's, so
    that another run's higher-numbered checkpoints never push out this run's)."""
    if not limit or limit < 1:
        return
    found = [(step, path) for step, path in list_checkpoints(folder, kind) if belongs is None or belongs(path)]
    for _, path in found[: max(0, len(found) - limit)]:
        remove_owned(path)
        if path.exists():
            log.info("kept old checkpoint %s: st did not write it (limit %d)", path.name, limit)
        else:
            log.info("removed old checkpoint %s (limit %d)", path.name, limit)
