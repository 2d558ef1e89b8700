"""The one answer to "is this file still the one a manifest recorded?".

`check_file` compares a file with the size and sha256 a manifest lists for it: size first (a stat), the hash only when
asked and the size matched. Callers phrase the result for their context (a stale output, a damaged checkpoint, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hashing import sha256_file

MISSING = "missing"
SIZE = "size"
SHA256 = "sha256"


@dataclass(frozen=True)
class FileMismatch:
    """How a file differs from its record: `kind` is MISSING, SIZE or SHA256."""

    path: Path
    kind: str
    found_bytes: int | None = None
    expected_bytes: int | None = None

    def describe(self) -> str:
        """A short phrase: "is missing", "has 12 bytes, not the 10 recorded", "has another sha256 than recorded"."""
        if self.kind == MISSING:
            return "is missing"
        if self.kind == SIZE:
            return f"has {self.found_bytes} bytes, not the {self.expected_bytes} recorded"
        return "has another sha256 than recorded"


def check_file(path: str | Path, *, size: int, sha256: str | None = None) -> FileMismatch | None:
    """None when `path` is a regular file of `size` bytes whose sha256 (if given) is `sha256`."""
    path = Path(path)
    if not path.is_file():
        return FileMismatch(path, MISSING, expected_bytes=size)
    found = path.stat().st_size
    if found != size:
        return FileMismatch(path, SIZE, found, size)
    if sha256 is not None and sha256_file(path) != sha256:
        return FileMismatch(path, SHA256, found, size)
    return None


def check_entry(root: str | Path, entry: dict[str, Any], *, hash: bool = True) -> FileMismatch | None:
    """`check_file` for a manifest output entry ({"path", "bytes", "sha256"}) under `root`."""
    return check_file(Path(root) / entry["path"], size=entry["bytes"], sha256=entry["sha256"] if hash else None)
