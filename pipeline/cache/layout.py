"""Where things live in a cache output folder, and reading the small files a run leaves beside its shards.

Each shard has a sidecar (`<shard>.json`: its shard key, the samples written and those rejected) that lands before
the shard's rename, so a shard under its final name always has one and a re-run can keep it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .plan import CachePlan, ShardPlan

SCHEMA = "st.cache/1"
SCHEMA_VERSION = 1
PART_NAME = "part.json"
INDEX_NAME = "index.parquet"
EMBEDS_PATH = "embeds/shared.safetensors.zst"
SKIPPED_NAME = "skipped.jsonl"


def sidecar_doc(shard: ShardPlan, written: list[str], rejected: dict[str, tuple[str, str]]) -> dict[str, Any]:
    return {"shard_key": shard.shard_key, "samples": written,
            "rejected": {k: {"reason": r, "detail": d} for k, (r, d) in sorted(rejected.items())}}  # fmt: skip


def read_sidecar(out_dir: Path, shard: ShardPlan) -> dict[str, Any]:
    return json.loads((out_dir / shard.sidecar).read_text())


def shard_complete(out_dir: Path, shard: ShardPlan) -> bool:
    """The shard and its sidecar are under their final names, and the sidecar records the planned shard key."""
    if not (out_dir / shard.path).is_file() or not (out_dir / shard.sidecar).is_file():
        return False
    try:
        return read_sidecar(out_dir, shard).get("shard_key") == shard.shard_key
    except (OSError, json.JSONDecodeError):
        return False


def planned_paths(plan: CachePlan, last: str) -> list[str]:
    """Every file a run of `plan` may write (relative to the output folder), `last` being manifest.json or part.json."""
    return [*(p for s in plan.shards for p in (s.path, s.sidecar)), INDEX_NAME, EMBEDS_PATH, SKIPPED_NAME, last]


def recorded_skips(out_dir: Path) -> list[dict[str, str]]:
    """The skipped list of the output (verified with every other output by the stage runner's up-to-date check)."""
    path = out_dir / SKIPPED_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []
