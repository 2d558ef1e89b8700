"""`st status` and `st verify` of a stage output on S3: its manifest is read from the bucket (a copy is kept in this
machine's state folder for the manifest checks), and its objects are checked there: listed with their sizes
(status), or read through and re-hashed (verify, and status --verify). Nothing is downloaded to disk but the
manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ManifestError
from ..fsutil import atomic_write_bytes
from ..manifest import MANIFEST_NAME
from .location import S3Prefix, parse_location
from .mirror import state_folder
from .store import store_for


def manifest_copy(value: str | Path) -> tuple[S3Prefix, Path | None]:
    """The prefix of an s3:// argument and a local copy of its manifest (None when the prefix holds none)."""
    where = parse_location(value, "path")
    if not isinstance(where, S3Prefix):
        raise ManifestError(f"{value} is not an s3://bucket/prefix")
    data = store_for(where).get_bytes(MANIFEST_NAME)
    if data is None:
        return where, None
    file = state_folder("manifests", where) / MANIFEST_NAME
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(file, data)
    return where, file


def check_objects(where: S3Prefix, outputs: list[dict[str, Any]], *, rehash: bool) -> list:
    """`verify.check_outputs` for the objects under `where`: each listed output present with its size, and with
    `rehash` its bytes' sha256 equal to the recorded one."""
    from ..verify import Mismatch

    store = store_for(where)
    listing = store.listing()
    found = []
    for entry in outputs:
        size = listing.get(entry["path"])
        if size is None:
            found.append(Mismatch(entry["path"], "missing"))
        elif size != entry["bytes"]:
            found.append(Mismatch(entry["path"], "size differs", f"recorded {entry['bytes']} bytes, found {size}"))
        elif rehash and store.digest(entry["path"])[1] != entry["sha256"]:
            found.append(Mismatch(entry["path"], "sha256 differs", f"recorded {entry['sha256'][:12]}.."))
    return found


def verify_remote(value: str | Path):
    """`st verify` of an s3:// output: the manifest's schema and digest, then every listed object re-hashed."""
    from ..manifest import read_manifest
    from ..verify import Verification, raw_stage, read_raw, short_error

    where, file = manifest_copy(value)
    url = where / MANIFEST_NAME
    if file is None:
        raise ManifestError(f"{where.url} holds no {MANIFEST_NAME} (not run yet, or its upload stopped midway)")
    try:
        doc = read_manifest(file)
    except ManifestError as exc:
        return Verification(url, raw_stage(read_raw(file)), error=short_error(exc, file))
    outputs = doc["outputs"]
    result = Verification(url, doc["stage"], files=len(outputs), bytes=sum(o["bytes"] for o in outputs))
    result.mismatches = check_objects(where, outputs, rehash=True)
    return result
