"""Checks of a cache run's inputs and surroundings that stop it with advice: missing source images, images an
earlier run skipped as undecodable (under --strict), a full disk."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import InputError
from .context import CacheContext
from .layout import shard_complete
from .plan import ShardPlan
from .reuse import PreviousEntries
from .videos import UNDECODABLE


def check_sources(ctx: CacheContext, out_dir: Path, previous: PreviousEntries) -> None:
    """Source images of samples that must be encoded exist (else exit 2, or skip with ignore_missing_files). Entries
    the previous output already holds need no source: a cache can be extended where the old images are gone."""
    if ctx.options.ignore_missing_files:
        return
    missing = []
    for shard in ctx.plan.shards:
        if shard_complete(out_dir, shard):
            continue
        for entry in shard.entries:
            if entry.entry_key in previous.where:
                continue
            path = Path(ctx.roots[entry.row["dataset_id"]]) / entry.row["path"]
            if not path.is_file():
                missing.append(str(path))
    if missing:
        raise InputError(f"{len(missing)} source image(s) listed by {ctx.parent_path} are missing, e.g. {missing[0]}; "
                         "re-run `st prepare`, or set ignore_missing_files = true to skip them")  # fmt: skip


def refuse_corrupt(roots: dict[str, str], records: list[dict[str, str]]) -> None:
    """--strict: samples an earlier run skipped as undecodable (kept shards, an up-to-date output) fail it too."""
    for record in records:
        if record["reason"] in UNDECODABLE:
            source = Path(roots[record["dataset_id"]]) / record["path"]
            raise InputError(f"--strict: {source} (dataset {record['dataset_id']}) {record['detail']} (an earlier "
                             "run skipped it); replace or remove it and re-run `st prepare`, or run `st cache` "
                             "without --strict to skip it")  # fmt: skip


def disk_full_message(out_dir: Path, shards: list[ShardPlan], todo: list[ShardPlan]) -> str:
    """What to do when the disk filled up: how much more the `todo` shards need, judged from the shards written."""
    free = shutil.disk_usage(out_dir).free
    done = [out_dir / s.path for s in shards if (out_dir / s.path).is_file()]
    per_shard = sum(p.stat().st_size for p in done) / len(done) if done else 0
    need = int(per_shard * len(todo))
    need_text = f"about {need / 1e6:.0f} MB more" if need else "more space"
    return (f"the disk holding {out_dir} is full ({free / 1e6:.0f} MB free; the unfinished shard was discarded); "
            f"the remaining {len(todo)} shard(s) need {need_text}. Free space and re-run: completed shards are kept")
