"""Benchmark `st prepare`: a cold scan of N generated JPEGs and an up-to-date re-run.

Baseline, in the same process: a plain single-process loop that reads each file, hashes it and opens its header
with PIL (the least work any scanner must do). Run: `.venv/bin/python bench/prepare.py [--images 10000]`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def generate(folder: Path, count: int, seed: int = 0) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(256, 192), (192, 256), (224, 224), (320, 180)]
    base = {s: Image.effect_noise(s, 40).convert("RGB") for s in sizes}
    for i in range(count):
        size = sizes[i % len(sizes)]
        img = base[size].copy()
        # The image number written as a row of black/white 8x8 blocks makes every file (and sample id) unique.
        for bit in range(20):
            shade = 255 if (i >> bit) & 1 else 0
            img.paste((shade, shade, shade), (8 * bit, 0, 8 * bit + 8, 8))
        img.save(folder / f"{i:06d}.jpg", quality=85)


def plain_scan(folder: Path) -> int:
    from PIL import Image

    n = 0
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        data = open(entry.path, "rb").read()
        hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as img:
            img.size
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.prepare.stage import run_prepare

    work = Path(tempfile.mkdtemp(prefix="st-bench-prepare-"))
    try:
        data = work / "data"
        t = time.perf_counter()
        generate(data, args.images)
        gen_s = time.perf_counter() - t
        (work / "datasets.json").write_text(json.dumps([{"id": "bench", "instance_data_dir": "data"}]))
        config = work / "config.json"
        config.write_text(json.dumps({"data_backend_config": "datasets.json", "resolution": 256}))
        loaded = load_config(config)

        t = time.perf_counter()
        plain_scan(data)
        plain_s = time.perf_counter() - t

        t = time.perf_counter()
        cold = run_prepare(loaded, work / "out")
        cold_s = time.perf_counter() - t
        assert cold.manifest["stats"]["samples"] == args.images, cold.manifest["stats"]

        t = time.perf_counter()
        warm = run_prepare(load_config(config), work / "out")
        warm_s = time.perf_counter() - t
        assert warm.up_to_date

        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "-q", "prepare", "-c", str(config), "-o",
                               str(work / "out")], capture_output=True, text=True)  # fmt: skip
        cli_s = time.perf_counter() - t
        assert proc.returncode == 0 and "up to date" in proc.stdout, proc.stderr

        figures = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
            f"{platform.python_version()}",
            "images": args.images,
            "generate_s": round(gen_s, 2),
            "plain_scan_s": round(plain_s, 3),
            "plain_files_per_s": round(args.images / plain_s),
            "st_cold_scan_s": round(cold_s, 3),
            "st_files_per_s": round(args.images / cold_s),
            "ratio_st_over_plain": round(plain_s / cold_s, 2),
            "st_up_to_date_rerun_s": round(warm_s, 3),
            "st_up_to_date_rerun_cli_process_s": round(cli_s, 3),
        }
        width = max(map(len, figures))
        for key, value in figures.items():
            print(f"{key.ljust(width)}  {value}")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
