"""What `st publish` reads: the train manifest (or one of its checkpoints), checked against the files on disk, and,
where they are still on disk and unchanged, the cache and prepare manifests behind it (for the dataset summary)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LineageError, ManifestError
from ..filecheck import check_entry
from ..hashing import sha256_file
from ..lineage import check_parent_chain, locate, verify_outputs
from ..log import get_logger
from ..manifest import MANIFEST_NAME, read_manifest

log = get_logger("publish")

CHECKPOINT_SCHEMA = "st.checkpoint/1"


@dataclass
class Checkpoint:
    """A checkpoint folder of the train run: where, which step, and the sha256 of its manifest."""

    path: Path
    rel: str
    step: int
    manifest_sha256: str
    files: dict[str, dict[str, Any]]
    info: dict[str, Any]


@dataclass
class Inputs:
    """The verified train output (and checkpoint) plus whatever dataset manifests could be found."""

    train: dict[str, Any]
    train_dir: Path
    checkpoint: Checkpoint | None = None
    cache: dict[str, Any] | None = None
    prepare: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    forced: list[str] = field(default_factory=list)  # lineage problems --force went past (for provenance.lineage)

    @property
    def step(self) -> int:
        return self.checkpoint.step if self.checkpoint else int(self.train["metrics"]["steps"])


def _is_checkpoint(folder: Path) -> bool:
    path = folder / MANIFEST_NAME
    if not folder.is_dir() or not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("schema") == CHECKPOINT_SCHEMA
    except (OSError, ValueError, AttributeError):
        return False


def read_inputs(input_path: Path, force: bool = False) -> Inputs:
    """Read and verify `input_path`: a train output (folder or manifest.json) or one of its checkpoint folders.

    The train output's files must match its manifest, and the cache it was trained on, if still on disk, must still
    have the digest the train manifest records (else LineageError, unless `force`: then `Inputs.forced` says why)."""
    input_path = Path(input_path)
    folder = input_path.parent if input_path.name == MANIFEST_NAME else input_path
    if _is_checkpoint(folder):
        train_dir = folder.parent.parent
        train = _read_train(train_dir)
        inputs = Inputs(train, train_dir, checkpoint=_checkpoint(folder, train, train_dir))
    else:
        train = _read_train(folder)
        inputs = Inputs(train, folder)
    inputs.forced = check_parent_chain(train, inputs.train_dir / MANIFEST_NAME, expect_stage="cache", rerun="st train",
                                       force=force)  # fmt: skip
    _find_dataset(inputs)
    return inputs


def _read_train(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path} does not exist; pass the output folder of `st train` (or one of its "
                            "checkpoints/checkpoint-N folders) as --input")  # fmt: skip
    train = read_manifest(path, stage="train")
    verify_outputs(train, folder, path, writer="train")
    return train


def _checkpoint(folder: Path, train: dict[str, Any], train_dir: Path) -> Checkpoint:
    rel = folder.resolve().relative_to(train_dir.resolve()).as_posix()
    recorded = next((c for c in train["checkpoints"] if c["path"] == rel), None)
    if recorded is None:
        raise LineageError(f"checkpoint {folder} is not among the checkpoints {train_dir / MANIFEST_NAME} records "
                           "(it was written after, or by another run); publish a listed checkpoint or re-run "
                           "`st train`")  # fmt: skip
    manifest_path = folder / MANIFEST_NAME
    if sha256_file(manifest_path) != recorded["manifest_sha256"]:
        raise LineageError(f"{manifest_path} changed after `st train` recorded it; re-run `st train`")
    info = json.loads(manifest_path.read_text())
    for entry in info["files"]:
        if (mismatch := check_entry(folder, entry)) is not None:
            raise LineageError(f"{mismatch.path} is missing or changed after the checkpoint was written; re-run "
                               "`st train`")
    if info.get("family") != train["family"] or info.get("model_type") != train["model_type"]:
        raise LineageError(f"checkpoint {folder} is a {info.get('family')} {info.get('model_type')} checkpoint, but "
                           f"{train_dir / MANIFEST_NAME} is a {train['family']} {train['model_type']} run")  # fmt: skip
    files = {e["path"]: e for e in info["files"]}
    return Checkpoint(folder, rel, int(recorded["step"]), recorded["manifest_sha256"], files, info)


def _parent(doc: dict[str, Any], stage: str, recorded: str | None, near: Path,
            notes: list[str]) -> tuple[dict | None, Path | None]:  # fmt: skip
    """The parent manifest `doc` names by digest (and its path), if it is still on disk unchanged."""
    want = (doc.get("parent") or {}).get("digest")
    path = locate(recorded, near)
    if path is None:
        notes.append(f"the {stage} manifest ({recorded or 'path not recorded'}) is not on this machine")
        return None, None
    try:
        found = read_manifest(path, stage=stage)
    except ManifestError as exc:
        notes.append(f"the {stage} manifest {path} cannot be read ({exc})")
        return None, None
    if found["digest"] != want:
        notes.append(f"{path} is now digest {found['digest'][:12]}, not the {want[:12]} this run was made from")
        return None, None
    return found, path


def _find_dataset(inputs: Inputs) -> None:
    train = inputs.train
    inputs.cache, path = _parent(train, "cache", train["provenance"].get("cache_path"), inputs.train_dir,
                                 inputs.notes)  # fmt: skip
    if inputs.cache is not None and path is not None:
        recorded = inputs.cache["provenance"].get("parent_path")
        inputs.prepare, _ = _parent(inputs.cache, "prepare", recorded, path.parent, inputs.notes)
    for note in inputs.notes:
        log.warning("publish: dataset summary: %s", note)


def lineage_doc(inputs: Inputs, weights: list[dict[str, Any]]) -> dict[str, Any]:
    """lineage.json: the manifests this publication descends from, its weight files and the base model."""
    train = inputs.train
    checkpoint = inputs.checkpoint
    return {
        "schema": "st.lineage/1",
        "family": train["family"],
        "model_type": train["model_type"],
        "step": inputs.step,
        "manifests": {
            "prepare": {"digest": inputs.cache["parent"]["digest"] if inputs.cache else None},
            "cache": {"digest": train["parent"]["digest"]},
            "train": {"digest": train["digest"], "key": train["key"]},
        },
        "checkpoint": None if checkpoint is None else {"path": checkpoint.rel, "step": checkpoint.step,
                                                       "manifest_sha256": checkpoint.manifest_sha256},  # fmt: skip
        "weights": weights,
        "base_model": train["model"],
    }
