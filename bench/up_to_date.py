"""Benchmark the stage runner's up-to-date check on a large output: stat record vs hashing every output.

An output folder of `--files` files totalling `--mb` MB is given a manifest through `StageRun.write_manifest` (which
writes this machine's stat record). Timed, in the same process:
- st: `StageRun(...).previous` with the stat record (what every re-run of an up-to-date stage does);
- baseline: the same check with no stat record, which hashes every output (what a check without records must do, and
  what st did before the runner kept records).
The page cache is warm for both (the files were just written), so the baseline is a lower bound for a cold disk.
Run: `.venv/bin/python bench/up_to_date.py [--files 64] [--mb 512]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(out: Path, files: int, megabytes: int) -> tuple:
    from pipeline.manifest import output_entry, provenance
    from pipeline.runner import StageRun

    out.mkdir(parents=True)
    size = megabytes * (1 << 20) // files
    for i in range(files):
        (out / f"shard-{i:05d}.bin").write_bytes(os.urandom(size))
    key = "1" * 64
    run = StageRun("prepare", 1, out, key, {})
    doc = {"schema": "st.prepare/1", "stage": "prepare", "key": key, "parent": None, "config": {},
           "datasets": [{"id": "d", "root": str(out), "caption_strategy": "filename", "files": files, "samples": 0,
                         "skipped": 0, "repeats": 0, "probability": 1.0, "buckets": {}}],
           "buckets": {}, "stats": {"files": files, "samples": 0, "skipped": {}, "deleted": 0, "batch_size": 1},
           "outputs": [output_entry(out, p) for p in sorted(out.iterdir())], "provenance": provenance(0.0, 1.0)}
    run.write_manifest(doc)
    return key


def check(out: Path, key: str) -> float:
    from pipeline.runner import StageRun

    started = time.perf_counter()
    assert StageRun("prepare", 1, out, key, {}).previous.current
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        os.environ["ST_STATE_DIR"] = str(state)
        out = Path(tmp) / "out"
        key = build(out, args.files, args.mb)
        with_record, without = [], []
        for _ in range(args.rounds):  # alternated, so that load changes hit both alike
            with_record.append(check(out, key))
            saved = {p: p.read_bytes() for p in state.iterdir()}
            for p in saved:
                p.unlink()
            without.append(check(out, key))  # hashes everything, then writes the record again
        st, base = statistics.median(with_record), statistics.median(without)
        print(json.dumps({"files": args.files, "megabytes": args.mb, "st_s": round(st, 4), "baseline_s": round(base, 4),
                          "speedup": round(base / st, 1), "cpus": os.cpu_count(), "python": platform.python_version()},
                         indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
