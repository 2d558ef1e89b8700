"""Ownership and locking of a stage output on S3, as `pipeline.ownership` does for folders.

- The lock is the object `.st-lock` under the prefix: who holds it (`ownership.Holder`) and when its lease ends. A
  holder renews the lease while it runs and deletes the object at the end. A lock whose lease ran out, or whose holder
  was a process of this host that no longer runs (it was killed), is taken over with a warning; any other is refused.
- The ownership record is the object `.st-owned.json`: the stage and every path st wrote under the prefix. It is
  written BEFORE the objects it lists, so a killed upload's objects are st's at the next run. st deletes or
  overwrites only objects it lists; a prefix holding objects without a record (or of another stage) is refused.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import threading
from typing import Any

from ..log import get_logger
from ..ownership import LOCK_NAME, RECORD_NAME, RECORD_SCHEMA, Holder, OwnershipError
from .store import ArtifactStore

log = get_logger("ownership")

LEASE_SECONDS = 600  # a lock not renewed for this long is abandoned
RENEW_SECONDS = 60
_LISTED = 3


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class RemoteClaim:
    """The lock and the ownership record of one prefix, held by one stage run (`with RemoteClaim(...)`)."""

    def __init__(self, store: ArtifactStore, stage: str) -> None:
        self.store, self.stage = store, stage
        self.holder = Holder.me(stage)
        self.owned: set[str] = set()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # --- lock -------------------------------------------------------------------------------------------------------

    def _lock_doc(self) -> bytes:
        expires = (_now() + _dt.timedelta(seconds=LEASE_SECONDS)).isoformat(timespec="seconds")
        return json.dumps({**dataclasses.asdict(self.holder), "expires": expires}, sort_keys=True).encode()

    def _check_lock(self) -> None:
        data = self.store.get_bytes(LOCK_NAME)
        if data is None:
            return
        other = Holder.parse(data.decode("utf-8", "replace"))
        try:
            expires = _dt.datetime.fromisoformat(json.loads(data)["expires"])
        except (ValueError, KeyError, TypeError):
            expires = _now()
        if other is not None and other.gone():
            log.warning("%s: taking over the lock left by %s, which no longer runs (it was killed)",
                        self.store.where.url, other.describe())  # fmt: skip
        elif expires <= _now():
            log.warning("%s: taking over the lock left by %s, whose lease ended at %s", self.store.where.url,
                        other.describe() if other else "an st run", expires.isoformat())  # fmt: skip
        elif other != self.holder:
            raise OwnershipError(f"{other.describe() if other else 'another st run'} is writing "
                                 f"{self.store.where.url} (its lock lasts until {expires.isoformat()} unless "
                                 "renewed); wait for it to finish or choose another --output")  # fmt: skip

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            try:
                self.store.put_bytes(LOCK_NAME, self._lock_doc())
            except Exception as exc:  # noqa: BLE001 - the next renewal tries again; the lease is long
                log.warning("%s: could not renew the lock: %s", self.store.where.url, exc)

    # --- ownership --------------------------------------------------------------------------------------------------

    def _read_record(self) -> dict[str, Any] | None:
        data = self.store.get_bytes(RECORD_NAME)
        if data is None:
            return None
        try:
            record = json.loads(data)
        except ValueError:
            return None
        return record if isinstance(record, dict) and isinstance(record.get("paths"), list) else None

    def _check_owner(self) -> None:
        listed = {rel for rel in self.store.listing() if rel not in (LOCK_NAME, RECORD_NAME)}
        record = self._read_record()
        if record is not None and record.get("stage") != self.stage:
            raise OwnershipError(f"{self.store.where.url} holds a {record.get('stage')} output, not a {self.stage} "
                                 "output; choose another --output prefix")  # fmt: skip
        self.owned = {str(p) for p in (record or {}).get("paths", [])}
        foreign = sorted(listed - self.owned)
        if foreign:
            named = ", ".join(foreign[:_LISTED]) + (f" and {len(foreign) - _LISTED} more" if len(foreign) > _LISTED
                                                     else "")  # fmt: skip
            raise OwnershipError(f"{self.store.where.url} holds {len(foreign)} object(s) st did not write ({named}); "
                                 "st never overwrites or deletes them: choose an empty prefix for --output")

    def record(self, paths: set[str]) -> None:
        """Write the ownership record listing `paths` (before writing them) and remember them as owned."""
        self.owned = set(paths)
        doc = {"schema": RECORD_SCHEMA, "stage": self.stage, "paths": sorted(self.owned)}
        self.store.put_bytes(RECORD_NAME, json.dumps(doc, sort_keys=True).encode())

    # --- the run ----------------------------------------------------------------------------------------------------

    def __enter__(self):
        self._check_lock()
        self.store.put_bytes(LOCK_NAME, self._lock_doc())
        try:
            self._check_owner()
        except BaseException:
            self.store.delete(LOCK_NAME)
            raise
        self._renewer = threading.Thread(target=self._renew, name="st-lock-lease", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        try:
            self.store.delete(LOCK_NAME)
        except Exception as error:  # noqa: BLE001 - the lease ends on its own
            log.warning("%s: could not remove the lock (%s); it expires by itself", self.store.where.url, error)
