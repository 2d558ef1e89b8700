"""Walking a dataset folder safely: every directory once, nothing outside the folder, no special files opened.

Rules (the README states them for users):
- Each directory is entered once, recognised by (st_dev, st_ino): symlink loops and links back to a folder already
  scanned are reported, never walked again, so a walk is linear in the size of the folder.
- A symlink (to a file or a folder) is followed only when its resolved target lies inside the dataset folder. A link
  that leaves the folder, or points nowhere, is skipped with its reason. Real folders are walked before linked ones,
  so a file reachable both ways is listed under its real path.
- FIFOs, sockets and devices are skipped by their `stat`, never opened (opening a FIFO blocks forever).
- A folder that cannot be listed is reported with the error, not dropped.
- A name that is not valid UTF-8 is skipped (reason `invalid_file_name`), so every path st writes to parquet or JSON
  is valid text; the skip's path shows the undecodable bytes as `\\xNN` escapes.
Hidden entries (names starting with '.') are ignored, as before.
"""

from __future__ import annotations

import os
import stat as statmod
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable


_SPECIAL_KINDS = (
    (statmod.S_ISFIFO, "a FIFO (named pipe)"),
    (statmod.S_ISSOCK, "a socket"),
    (statmod.S_ISCHR, "a character device"),
    (statmod.S_ISBLK, "a block device"),
)


@dataclass(frozen=True)
class FileStat:
    path: str  # absolute
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class WalkSkip:
    """An entry the walk did not list; `path` is absolute, printable, and `reason` a skip reason."""

    path: str
    reason: str
    detail: str


@dataclass
class Listing:
    files: list[FileStat] = field(default_factory=list)
    skips: list[WalkSkip] = field(default_factory=list)


class NotRegularFile(OSError):
    """A path that should be a regular file is a FIFO, socket, device or folder."""


def printable(path: str) -> str:
    """`path` as valid text: bytes that are not UTF-8 (held as surrogates by os) become `\\xNN` escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _valid_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def special_kind(mode: int) -> str | None:
    """'a FIFO (named pipe)', 'a socket', ... for a non-regular, non-directory mode; None otherwise."""
    return next((label for test, label in _SPECIAL_KINDS if test(mode)), None)


def inside(path: str, root: str) -> bool:
    """Whether the resolved `path` is `root` or lies under it (both already resolved)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def read_regular_file(path: str) -> bytes:
    """The bytes of a regular file. A FIFO or device is refused without blocking (opened non-blocking, checked by
    fstat before any read), so a special file swapped in after the walk cannot hang the run."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not statmod.S_ISREG(info.st_mode):
            kind = special_kind(info.st_mode) or "a folder"
            raise NotRegularFile(f"{printable(path)} is {kind}, not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class _Walker:
    def __init__(self, root: Path, extensions: Iterable[str]) -> None:
        self.root = os.path.realpath(root)
        self.wanted = {e.lower() for e in extensions}
        self.listing = Listing()
        self.visited: set[tuple[int, int]] = set()
        self.real_dirs: deque[str] = deque()
        self.linked_dirs: deque[tuple[str, str]] = deque()  # (link path, resolved target)

    def skip(self, path: str, reason: str, detail: str) -> None:
        self.listing.skips.append(WalkSkip(printable(path), reason, detail))

    def wants(self, name: str) -> bool:
        return os.path.splitext(name)[1].lower() in self.wanted

    def run(self) -> Listing:
        self.enter(self.root, self.root)
        # Real folders first, then linked ones: a folder reachable both ways is listed under its real path.
        while self.real_dirs or self.linked_dirs:
            if self.real_dirs:
                self.scan(self.real_dirs.popleft())
            else:
                link, target = self.linked_dirs.popleft()
                if self.enter(link, target, via_link=True):
                    self.scan(link)
        self.listing.files.sort(key=lambda f: f.path)
        self.listing.skips.sort(key=lambda s: s.path)
        return self.listing

    def enter(self, path: str, target: str, via_link: bool = False) -> bool:
        """Mark a folder as visited; False (with a skip) when it was walked already."""
        try:
            info = os.stat(target)
        except OSError as exc:
            self.skip(path, "unreadable_folder", f"cannot stat the folder: {exc.strerror or exc}")
            return False
        ident = (info.st_dev, info.st_ino)
        if ident in self.visited:
            how = f"symlink to {printable(target)}" if via_link else "a second path to a folder"
            self.skip(path, "folder_already_scanned", f"{how}, a folder already scanned (a loop or a second path to it)")
            return False
        self.visited.add(ident)
        if not via_link:
            self.real_dirs.append(path)
        return True

    def scan(self, folder: str) -> None:
        try:
            with os.scandir(folder) as entries:
                items = sorted(entries, key=lambda e: e.name)
        except OSError as exc:
            self.skip(folder, "unreadable_folder", f"cannot list the folder: {exc.strerror or exc}")
            return
        for entry in items:
            if entry.name.startswith("."):
                continue
            if not _valid_name(entry.name):
                if self.wants(entry.name) or entry.is_dir(follow_symlinks=False):
                    self.skip(entry.path, "invalid_file_name",
                              "the name is not valid UTF-8; rename it (for example with `convmv`) to include it")
                continue
            try:
                self.visit(entry)
            except OSError as exc:
                if self.wants(entry.name):
                    self.skip(entry.path, "unreadable", f"cannot stat the file: {exc.strerror or exc}")

    def visit(self, entry: os.DirEntry) -> None:
        if entry.is_symlink():
            self.visit_link(entry)
            return
        info = entry.stat(follow_symlinks=False)
        if statmod.S_ISDIR(info.st_mode):
            self.enter(entry.path, entry.path)
        else:
            self.add_file(entry.path, entry.name, info)

    def visit_link(self, entry: os.DirEntry) -> None:
        try:
            target = os.path.realpath(entry.path, strict=True)
        except OSError as exc:
            if self.wants(entry.name):
                self.skip(entry.path, "broken_symlink", f"a symlink that cannot be resolved ({exc.strerror or exc})")
            return
        if not inside(target, self.root):
            if self.wants(entry.name) or os.path.isdir(target):
                self.skip(entry.path, "symlink_outside_dataset",
                          f"symlink to {printable(target)}, outside the dataset folder {printable(self.root)}; st "
                          "follows links only inside it (copy or move the files in)")
            return
        info = os.stat(target)
        if statmod.S_ISDIR(info.st_mode):
            self.linked_dirs.append((entry.path, target))
        else:
            self.add_file(entry.path, entry.name, info)

    def add_file(self, path: str, name: str, info: os.stat_result) -> None:
        if not self.wants(name):
            return
        kind = special_kind(info.st_mode)
        if kind is not None:
            self.skip(path, "special_file", f"{kind}, not a regular file; st never opens these")
            return
        self.listing.files.append(FileStat(path, info.st_size, info.st_mtime_ns))


def walk(root: Path, extensions: Iterable[str]) -> Listing:
    """Files under `root` whose suffix is in `extensions`, and what was left out and why (see the module rules)."""
    return _Walker(root, extensions).run()


def delete_inside(root: Path, rel_path: str) -> Path:
    """Delete the regular file `root/rel_path` and return its path, only when it is a regular file (not a link)
    whose folder resolves inside `root`; otherwise raise OSError saying why it was left alone."""
    real_root = os.path.realpath(root)
    path = Path(real_root, rel_path)
    folder = os.path.realpath(path.parent)
    if not inside(folder, real_root):
        raise OSError(f"{path} resolves to {folder}, outside the dataset folder {real_root}")
    target = Path(folder, path.name)
    info = os.lstat(target)
    if not statmod.S_ISREG(info.st_mode):
        raise OSError(f"{target} is not a regular file (a link, folder or special file)")
    target.unlink()
    return target
