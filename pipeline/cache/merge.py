"""Parts: `st cache --part i/n` writes shards i, i+n, ... and a part.json instead of the manifest (for machines that
share no filesystem); `st cache merge` copies the parts' shards into one folder, which then closes like a single run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError, LineageError
from ..fsutil import atomic_path, atomic_write_text
from ..log import get_logger
from .context import CacheContext
from .layout import EMBEDS_PATH, PART_NAME

log = get_logger("cache")
PART_SCHEMA = "st.cache-part/1"


def parse_part(part: str | None) -> tuple[int, int] | None:
    """`--part i/n` as (i, n); None without --part."""
    if part is None:
        return None
    try:
        index, count = (int(x) for x in part.split("/"))
    except ValueError:
        raise ConfigError(f"--part expects i/n (e.g. 0/2), got {part!r}") from None
    if not (count >= 1 and 0 <= index < count):
        raise ConfigError(f"--part {part}: i must be in 0..n-1")
    return index, count


def write_part(ctx: CacheContext, out_dir: Path, rank: int, world: int, stats: dict[str, Any]) -> None:
    doc = {"schema": PART_SCHEMA, "key": ctx.key, "part": [rank, world],
           "shards": [s.path for i, s in enumerate(ctx.plan.shards) if i % world == rank], "stats": stats}  # fmt: skip
    atomic_write_text(out_dir / PART_NAME, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    log.info("cache: part %d/%d written to %s; combine the parts with `st cache merge`", rank, world, out_dir)


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def _read_part(folder: Path, key: str) -> dict[str, Any]:
    part_file = folder / PART_NAME
    if not part_file.is_file():
        raise InputError(f"{folder} is not the output of `st cache --part i/n` (no {PART_NAME})")
    doc = json.loads(part_file.read_text())
    if doc.get("key") != key:
        raise LineageError(f"{part_file} was made from other inputs or options than this merge (key "
                           f"{str(doc.get('key'))[:12]} vs {key[:12]}); run every part with the same config")
    return doc


def copy_parts(ctx: CacheContext, parts: list[Path], out_dir: Path) -> None:
    """Copy every part's shards and sidecars (and part 0's shared embeddings) into `out_dir`, after checking that the
    parts were made with this key and that together they are all parts of one split."""
    seen: set[int] = set()
    world = None
    for folder in map(Path, parts):
        doc = _read_part(folder, ctx.key)
        rank, count = doc["part"]
        world = world or count
        if count != world:
            raise InputError(f"{folder / PART_NAME} is part {rank}/{count}, but other parts are of {world}")
        seen.add(rank)
        for shard in ctx.plan.shards:
            if shard.path in doc["shards"]:
                for rel in (shard.path, shard.sidecar):
                    _copy(folder / rel, out_dir / rel)
        if rank == 0:
            _copy(folder / EMBEDS_PATH, out_dir / EMBEDS_PATH)
    absent = sorted(set(range(world or 0)) - seen)
    if absent:
        raise InputError(f"parts {', '.join(map(str, absent))} of {world} are missing from the merge")
