"""Ownership and locking of stage output folders: a stage run touches only what st wrote, and only one run at a time.

`claim_output` is entered by every stage before its first write. It refuses (exit 2, before anything is written) an
output path that is a file, cannot be created or written, holds another stage's output, or is the stage's input or an
ancestor of it (for prepare: a dataset folder, an ancestor of one, or a folder inside one). It then takes a lock for
the whole run and reads what st owns in the folder:

- the paths listed by the folder's previous manifest of the same stage, and
- the ownership record (`.st-owned.json`), which a run updates atomically BEFORE it writes the paths it lists, so that
  the partial files of a killed run are known to be st's at the next run. An entry ending in "/" is a folder whose
  whole content st writes; files that were already inside it when st took it over are recorded as foreign.

A stage deletes or overwrites only owned paths (and their `.tmp` twins); foreign files are left alone and reported in
one log line; a foreign file at a path the run must write is refused. The lock is `.st-lock`: an `fcntl.flock` held by
the run's rank 0 (other ranks of a multi-process run do not lock), the file naming the holder. The kernel drops a flock
when its process dies, so a killed run's lock is taken over with a log line. flock on network filesystems (NFS, SMB)
may not exclude a run on another host: give runs on different machines different output folders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .distributed import rank_and_world
from .errors import UserError
from .fsutil import TMP_SUFFIX, atomic_write_text
from .log import get_logger
from .manifest import MANIFEST_NAME, parse_schema_id, read_manifest

log = get_logger("ownership")

LOCK_NAME = ".st-lock"
RECORD_NAME = ".st-owned.json"
RECORD_SCHEMA = "st.owned/1"
BOOKKEEPING = frozenset({LOCK_NAME, RECORD_NAME, RECORD_NAME + TMP_SUFFIX})
_LISTED = 3  # foreign paths named in the one report line


class OwnershipError(UserError):
    """The output folder cannot be used by this run: wrong kind of path, busy, or holding files st did not write."""


def is_bookkeeping(rel: str) -> bool:
    """The lock file and the ownership record: never outputs, never foreign."""
    return rel in BOOKKEEPING


# ------------------------------------------------------------------------------------------------------- lock


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds (or held) an output folder's lock."""

    stage: str
    host: str
    pid: int
    since: str

    @classmethod
    def me(cls, stage: str) -> Holder:
        since = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")

        return cls(stage, socket.gethostname(), os.getpid(), since)

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            raw = json.loads(text)
            return cls(str(raw["stage"]), str(raw["host"]), int(raw["pid"]), str(raw["since"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        return f"st {self.stage} (pid {self.pid} on host {self.host}, since {self.since})"

    def gone(self) -> bool:
        """Whether this holder is a process of this host that no longer exists."""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class FolderLock:
    """An exclusive, non-blocking flock on `folder/.st-lock`, held from `acquire` to `release`."""

    def __init__(self, folder: Path, stage: str) -> None:
        self.path = folder / LOCK_NAME
        self.folder = folder
        self.holder = Holder.me(stage)
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = Holder.parse(_read_fd(fd))
                os.close(fd)
                who = other.describe() if other else "another st run"
                raise OwnershipError(f"{who} is writing {self.folder}; wait for it to finish or choose another "
                                     "--output") from None  # fmt: skip
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the previous holder removed the file while we waited for it: lock the new one
        self._note_previous(Holder.parse(_read_fd(fd)))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dataclasses.asdict(self.holder), sort_keys=True).encode() + b"\n", 0)
        os.fsync(fd)
        self._fd = fd

    def _note_previous(self, left: Holder | None) -> None:
        """A lock file still naming a holder is what a killed run leaves behind (a clean end removes it)."""
        if left is None:
            return
        if left.gone():
            log.warning("%s: taking over the lock left by %s, which no longer runs (it was killed)", self.folder,
                        left.describe())  # fmt: skip
        elif left.host != self.holder.host:
            log.warning("%s: taking over the lock left by %s; if that run is still going, stop this one: flock may "
                        "not exclude other hosts on a network filesystem", self.folder, left.describe())  # fmt: skip

    def release(self) -> None:
        """Remove the lock file (a clean end leaves no trace), then drop the lock."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OwnershipError(f"cannot write to the output folder {self.folder} ({exc.strerror}); fix its "
                                 "permissions or choose another --output") from None  # fmt: skip


def _read_fd(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode("utf-8", "replace")


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


# -------------------------------------------------------------------------------------------------- ownership


def _manifest_stage(path: Path) -> str | None:
    """The stage named by an st manifest's schema, or None when the file is not one."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    parsed = parse_schema_id(doc.get("schema")) if isinstance(doc, dict) else None
    return parsed[0] if parsed else None


def _manifest_paths(out_dir: Path, stage: str) -> set[str]:
    """What the folder's previous manifest of `stage` lists as written (itself, outputs and checkpoint folders)."""
    path = out_dir / MANIFEST_NAME
    if _manifest_stage(path) != stage:
        return set()
    owned = {MANIFEST_NAME}
    try:
        doc = read_manifest(path, stage=stage)
    except UserError:  # edited or damaged: the file itself is still st's, its list is not trusted
        return owned
    owned |= {o["path"] for o in doc.get("outputs", [])}
    owned |= {c["path"].rstrip("/") + "/" for c in doc.get("checkpoints", []) if isinstance(c, dict) and "path" in c}
    return owned


def _read_record(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / RECORD_NAME
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("schema") == RECORD_SCHEMA and isinstance(raw.get("paths"), list):
            return raw
    except (OSError, ValueError, AttributeError):
        pass
    log.warning("%s is damaged; ignoring it (files it listed count as foreign and are left alone)", path)
    return None


def _rel_of(out_dir: Path, path: Path | str) -> str:
    """A str is already relative to the output folder; a Path is a filesystem path (relative to the working folder)."""
    if isinstance(path, str):
        return path.rstrip("/")
    absolute = path.absolute()
    return "." if absolute == out_dir else absolute.relative_to(out_dir).as_posix()


def _named(rel: str, owned: set[str]) -> bool:
    """`rel` is in `owned`, or is the temporary twin (`name.tmp`) of something in it."""
    return rel in owned or (rel.endswith(TMP_SUFFIX) and rel[: -len(TMP_SUFFIX)] in owned)


class OutputClaim:
    """A stage run's hold on its output folder: what st owns there, and the only way the run removes anything.

    Paths given as `str` are relative to the output folder ("shards/a.tar"); `Path`s are filesystem paths."""

    def __init__(self, out_dir: Path, stage: str, primary: bool) -> None:
        self.out_dir = out_dir
        self.stage = stage
        self.primary = primary  # rank 0: keeps the ownership record
        record = _read_record(out_dir) or {}
        self.files: set[str] = set()
        self.folders: set[str] = set()
        self.foreign: set[str] = set(record.get("foreign", []))
        for rel in [*_manifest_paths(out_dir, stage), *record.get("paths", [])]:
            (self.folders if rel.endswith("/") else self.files).add(rel.rstrip("/"))
        self._recorded: set[str] = set()  # entries this run added: kept in the record even before they exist
        self._reported = False
        self._saved = False

    # -- questions

    def owns(self, path: Path | str) -> bool:
        """Whether st wrote `path` (a file or folder inside the output folder), by the manifest or the record."""
        rel = _rel_of(self.out_dir, path)
        if rel in self.foreign or is_bookkeeping(rel):
            return False
        if _named(rel, self.files | self.folders):
            return True
        parts = rel.split("/")
        return any(_named("/".join(parts[:depth]), self.folders) for depth in range(1, len(parts)))

    def foreign_files(self) -> list[str]:
        """Files in the output folder that st did not write (relative paths, sorted)."""
        found = []
        for root, dirs, names in os.walk(self.out_dir):
            dirs.sort()
            here = Path(root)
            links = [d for d in dirs if (here / d).is_symlink()]
            for name in sorted([*names, *links]):
                rel = _rel_of(self.out_dir, here / name)
                if not is_bookkeeping(rel) and not self.owns(rel):
                    found.append(rel)
        return found

    # -- recording

    def will_write(self, *paths: Path | str, folders: Iterable[Path | str] = ()) -> None:
        """Record `paths` (files) and `folders` (whose whole content st writes) as st's before the first of them is
        written; refuse a file st did not write at any of those paths. Files already inside a folder that st did not
        own are recorded as foreign. Rank 0 keeps the record (and checks); on other ranks this does nothing."""
        if not self.primary:
            return
        new_files = {_rel_of(self.out_dir, p) for p in paths}
        new_folders = {_rel_of(self.out_dir, p) for p in folders}
        clashes = [rel for rel in sorted(new_files) if (self.out_dir / rel).exists() and not self.owns(rel)]
        if clashes:
            more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
            raise OwnershipError(f"{self.out_dir / clashes[0]}{more} was not written by st {self.stage}, and this run "
                                 "would overwrite it; move it away or choose another --output")  # fmt: skip
        for rel in sorted(new_folders):
            if (self.out_dir / rel).is_dir() and not self.owns(rel):
                self.foreign |= {_rel_of(self.out_dir, p) for p in (self.out_dir / rel).rglob("*")
                                 if not p.is_dir() or p.is_symlink()}  # fmt: skip
        if not self._reported:
            self._report_foreign(new_files)
        self._recorded |= new_files | new_folders
        if new_files - self.files or new_folders - self.folders:
            self.files |= new_files
            self.folders |= new_folders
            self._save()

    def _report_foreign(self, planned: set[str]) -> None:
        self._reported = True
        found = [rel for rel in self.foreign_files() if rel not in planned]
        if found:
            listed = ", ".join(found[:_LISTED]) + (", ..." if len(found) > _LISTED else "")
            log.warning("%s: leaving %d file(s) that st %s did not write untouched: %s", self.out_dir, len(found),
                        self.stage, listed)  # fmt: skip

    def _save(self) -> None:
        """Rewrite the record: this run's entries, and earlier entries whose files still exist."""

        def kept(rel: str) -> bool:
            return rel in self._recorded or self._present(rel)

        paths = {f for f in self.files if kept(f)} | {f + "/" for f in self.folders if kept(f)}
        doc = {"schema": RECORD_SCHEMA, "stage": self.stage, "paths": sorted(paths),
               "foreign": sorted(f for f in self.foreign if (self.out_dir / f).exists())}  # fmt: skip
        atomic_write_text(self.out_dir / RECORD_NAME, json.dumps(doc, indent=1, sort_keys=True) + "\n")
        self._saved = True

    def settle(self) -> None:
        """After a clean run that wrote the record: drop it when the new manifest lists everything it names, so that
        an output made only of listed files (cache, publish) carries no bookkeeping."""
        record = _read_record(self.out_dir) if self._saved else None
        listed = _manifest_paths(self.out_dir, self.stage)
        if record is None or not listed:
            return
        if all(p in listed or not self._present(p.rstrip("/")) for p in record["paths"]):
            (self.out_dir / RECORD_NAME).unlink()

    def _present(self, rel: str) -> bool:
        return any((self.out_dir / (rel + suffix)).exists() for suffix in ("", TMP_SUFFIX))

    # -- removing

    def remove(self, path: Path | str) -> None:
        """Remove `path` if st wrote it; for a folder, every file in it that st wrote (emptied folders go too).
        Files st did not write stay where they are."""
        target = self.out_dir / _rel_of(self.out_dir, path)
        if target == self.out_dir:
            raise ValueError("an output folder is never removed as a whole")
        if target.is_symlink() or target.is_file():
            self._unlink(target)
        elif target.is_dir():
            self._remove_in(target, keep=set())

    def remove_unlisted(self, folder: Path | str, keep: Iterable[str]) -> None:
        """Remove the files under `folder` that st wrote and `keep` (paths relative to the output folder) does not
        list: what an earlier run wrote and this one no longer produces."""
        target = self.out_dir / _rel_of(self.out_dir, folder)
        if target.is_dir() and not target.is_symlink():
            self._remove_in(target, keep=set(keep))

    def _remove_in(self, folder: Path, keep: set[str]) -> None:
        for root, dirs, names in os.walk(folder, topdown=False):
            here = Path(root)
            removed = False
            for name in [*names, *(d for d in dirs if (here / d).is_symlink())]:
                path = here / name
                if _rel_of(self.out_dir, path) not in keep:
                    removed |= self._unlink(path)
            if (removed or self.owns(here)) and not any(here.iterdir()):
                here.rmdir()

    def _unlink(self, path: Path) -> bool:
        rel = _rel_of(self.out_dir, path)
        if not self.owns(rel):
            if not self._reported:
                self._report_foreign(set())
            return False
        path.unlink()
        return True

    def install(self, staged: Path, final: Path) -> None:
        """Move a folder st built under a temporary name into place: into `final` file by file where `final` still
        holds files st did not write, else as one rename."""
        self.remove(final)
        if not final.exists():
            os.replace(staged, final)
            return
        moves = [(p, final / p.relative_to(staged)) for p in sorted(staged.rglob("*")) if p.is_file()]
        clashes = [str(t) for _, t in moves if t.exists() and not self.owns(t)]
        if clashes:
            raise OwnershipError(f"{clashes[0]} was not written by st {self.stage}; move it away and re-run (this "
                                 f"run's files are kept in {staged})")  # fmt: skip
        for source, target in moves:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        shutil.rmtree(staged)


# ------------------------------------------------------------------------------------------------------ claim

_ACTIVE: dict[Path, OutputClaim] = {}


def active_claim(path: Path) -> OutputClaim | None:
    """The claim of this process whose output folder holds `path`."""
    path = Path(path).absolute()
    for folder, claim in _ACTIVE.items():
        if path == folder or folder in path.parents:
            return claim
    return None


def note_writing(path: Path, folder: bool = False) -> None:
    """Record `path` as st's in the claim that covers it, before writing it (a no-op outside a claimed folder)."""
    claim = active_claim(path)
    if claim is not None:
        claim.will_write(*(() if folder else (path,)), folders=(path,) if folder else ())


def remove_owned(path: Path) -> None:
    """Remove `path` (file or folder) through the claim that covers it; outside any claim nothing is removed."""
    claim = active_claim(path)
    if claim is None:
        log.warning("not removing %s: no st run holds the folder it is in", path)
        return
    claim.remove(path.absolute())


def _folder_of(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def _refuse_overlap(stage: str, out: Path, inputs: Iterable[Path], data_roots: Iterable[Path]) -> None:
    for given in inputs:
        folder = _folder_of(Path(given).resolve())
        if out == folder:
            raise OwnershipError(f"--output {out} is an input of st {stage} ({given}): writing there would overwrite "
                                 "it; choose another --output")  # fmt: skip
        if out in folder.parents:
            raise OwnershipError(f"--output {out} contains an input of st {stage} ({folder}); choose an --output "
                                 "outside it")  # fmt: skip
    for root in data_roots:
        root = Path(root).resolve()
        if out == root or out in root.parents:
            raise OwnershipError(f"--output {out} is or contains the dataset folder {root}; choose an --output "
                                 "outside your images")  # fmt: skip
        if root in out.parents:
            raise OwnershipError(f"--output {out} is inside the dataset folder {root}, so its files would be "
                                 "scanned as data; choose an --output outside it")  # fmt: skip


def _make_folder(out: Path) -> bool:
    """Create the output folder; True when this run created it."""
    if out.exists() and not out.is_dir():
        raise OwnershipError(f"--output {out} is a file, not a folder; give a folder path (it is created if needed)")
    if out.is_dir():
        return False
    try:
        out.mkdir(parents=True)
    except FileExistsError:
        return False
    except OSError as exc:
        reason = "a part of the path is a file" if exc.errno == errno.ENOTDIR else exc.strerror
        raise OwnershipError(f"cannot create the output folder {out} ({reason}); choose another --output") from None
    return True


def _refuse_other_stage(out: Path, stage: str) -> None:
    manifest = out / MANIFEST_NAME
    if manifest.exists():
        found = _manifest_stage(manifest)
        if found is None:
            raise OwnershipError(f"{manifest} was not written by st; move it away or choose another --output")
        if found != stage:
            raise OwnershipError(f"{out} holds the output of st {found} ({manifest}); choose another --output for "
                                 f"st {stage}")  # fmt: skip
    record = _read_record(out)
    if record is not None and record.get("stage") != stage:
        raise OwnershipError(f"{out} holds files written by st {record.get('stage')} (see {out / RECORD_NAME}); "
                             f"choose another --output for st {stage}")  # fmt: skip


@contextlib.contextmanager
def claim_output(out_dir: Path | str, stage: str, *, inputs: Iterable[Path] = (),
                 data_roots: Iterable[Path] = ()) -> Iterator[OutputClaim]:  # fmt: skip
    """Check and lock `out_dir` for one run of `stage` (see the module docstring); yields the run's claim."""
    out = Path(out_dir).absolute()
    _refuse_overlap(stage, out.resolve(), inputs, data_roots)
    created = _make_folder(out)
    lock = None
    try:
        _refuse_other_stage(out, stage)
        primary = rank_and_world()[0] == 0
        if primary:
            lock = FolderLock(out, stage)
            lock.acquire()
        claim = OutputClaim(out, stage, primary)
        _ACTIVE[out] = claim
        try:
            yield claim
            claim.settle()
        finally:
            _ACTIVE.pop(out, None)

    finally:
        if lock is not None:
            lock.release()
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only succeeds when the run wrote nothing
