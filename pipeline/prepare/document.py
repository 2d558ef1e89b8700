"""What `st prepare` writes besides its manifest: samples.parquet (one row per sample, with its bucket plan),
skipped.jsonl (one line per skipped file, with its reason) and the manifest's per-dataset entries."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..fsutil import atomic_path, atomic_write_text
from .discover import DatasetFiles
from .select import Sample, Skip

SAMPLES_NAME = "samples.parquet"
SKIPPED_NAME = "skipped.jsonl"


def write_samples(path: Path, samples: list[Sample]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    int32 = pa.int32()
    schema = pa.schema(
        [
            ("sample_id", pa.string()), ("dataset_id", pa.string()), ("path", pa.string()),
            ("captions", pa.list_(pa.string())), ("width", int32), ("height", int32), ("target_width", int32),
            ("target_height", int32), ("intermediate_width", int32), ("intermediate_height", int32),
            ("crop_top", int32), ("crop_left", int32), ("bucket", pa.string()), ("repeats", int32),
            ("orientation", pa.int8()), ("format", pa.string()), ("bytes", pa.int64()),
        ]
    )  # fmt: skip
    # Video samples: frames in the file, frames per second, seconds, and the frames trained on (window_frames from
    # window_start).
    VIDEO_COLUMNS = (("frames", int32), ("fps", pa.float64()), ("duration", pa.float64()), ("window_start", int32),
                     ("window_frames", int32))  # fmt: skip
    paired = any(s.conditioning for s in samples)
    if paired:  # the column only when there is paired data: outputs without it stay byte-identical
        partner = pa.struct([("dataset_id", pa.string()), ("path", pa.string()), ("sha256", pa.string()),
                             ("width", int32), ("height", int32), ("kind", pa.string()),
                             ("captions", pa.list_(int32))])  # fmt: skip
        schema = schema.append(pa.field("conditioning", pa.list_(partner)))
    rows = {
        "sample_id": [s.sample_id for s in samples],
        "dataset_id": [s.dataset_id for s in samples],
        "path": [s.path for s in samples],
        "captions": [s.captions for s in samples],
        "width": [s.width for s in samples],
        "height": [s.height for s in samples],
        "target_width": [s.plan.target_width for s in samples],
        "target_height": [s.plan.target_height for s in samples],
        "intermediate_width": [s.plan.intermediate_width for s in samples],
        "intermediate_height": [s.plan.intermediate_height for s in samples],
        "crop_top": [s.plan.crop_top for s in samples],
        "crop_left": [s.plan.crop_left for s in samples],
        "bucket": [s.plan.bucket for s in samples],
        "repeats": [s.repeats for s in samples],
        "orientation": [s.orientation for s in samples],
        "format": [s.format for s in samples],
        "bytes": [s.bytes for s in samples],
    }
    if paired:
        rows["conditioning"] = [[p.as_row() for p in s.conditioning] for s in samples]
    if any(s.video for s in samples):  # the columns only with video: image outputs stay byte-identical
        for name, kind in VIDEO_COLUMNS:
            schema = schema.append(pa.field(name, kind))
            rows[name] = [getattr(s.video, name) if s.video else None for s in samples]
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(rows, schema=schema), tmp, compression="zstd")


def write_skipped(path: Path, skips: list[Skip]) -> None:
    atomic_write_text(path, "".join(json.dumps(k.as_json(), sort_keys=True) + "\n" for k in skips))


def dataset_entries(datasets: list[DatasetFiles], samples: list[Sample], skips: list[Skip], raised: dict) -> list:
    entries = []
    for files in datasets:
        spec = files.spec
        mine = [s for s in samples if s.dataset_id == spec.id]
        entries.append(
            {
                "id": spec.id,
                "root": str(spec.root),
                "caption_strategy": spec.caption_strategy,
                "files": len(files.images) + files.capped,  # found in the folder, max_num_samples's too
                "samples": len(mine),
                "skipped": sum(1 for k in skips if k.dataset_id == spec.id),
                "repeats": spec.repeats,
                "probability": spec.probability,
                "buckets": dict(sorted(Counter(s.plan.bucket for s in mine).items())),
                "repeats_raised": raised.get(spec.id, {}),
                "resolution": spec.resolution,
                "resolution_type": spec.resolution_type,
                # Paired data: only when set, as in the dataset's stage key.
                **({"dataset_type": spec.dataset_type} if spec.dataset_type != "image" else {}),
                **({"conditioning_data": list(spec.conditioning_data)} if spec.conditioning_data else {}),
                **({"is_regularisation_data": True} if spec.is_regularisation_data else {}),
                **({"video": spec.video.describe()} if spec.video is not None else {}),
                # max_num_samples: only when set; `capped`: files it left out (in no other count).
                **({"max_num_samples": spec.max_num_samples, "capped": files.capped}
                   if spec.max_num_samples is not None else {}),
                # start_epoch / start_step / end_epoch / end_step: only those set, for st train's data plan.
                **spec.schedule.describe(),
                # timestep_sampling_offset / train_batch_size: only those set, likewise.
                **spec.training_keys(),
            }
        )
    return entries


def conditioning_entries(listed: list[DatasetFiles], generated: list, samples: list[Sample]) -> dict:
    """The manifest's `conditioning_datasets` (absent without paired data): each conditioning dataset's folder, its
    conditioning_type, generator, and how many samples it pairs."""
    specs = [files.spec for files in listed] + list(generated)
    if not specs:
        return {}
    used = Counter(p.dataset_id for s in samples for p in s.conditioning)
    files = {f.spec.id: len(f.images) for f in listed}
    return {"conditioning_datasets": [{**spec.describe(), "files": files.get(spec.id), "paired": used[spec.id]}
                                      for spec in specs]}  # fmt: skip
