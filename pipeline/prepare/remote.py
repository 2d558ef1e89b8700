"""Remote datasets in `st prepare`: each `type: aws|huggingface|csv` dataset is synced into the output's download
store (`OUT/.st/downloads/`, see `pipeline.sources.store`) before the walk, and from then on is a local folder: its
spec's `root` becomes the download view (which `st cache` reads), and a caption column becomes its parquet table.
Objects that could not be downloaded are skipped with their reason, like unreadable images. A `dataset_type: video`
dataset downloads its videos (a Hugging Face dataset's video column), which the video prepare path then probes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..datasets import DatasetList
from ..ownership import OutputClaim
from ..errors import InputError
from ..sources import SyncResult, sync_source
from ..sources.s3 import KEYS_FOLDER
from .discover import CAPTION_SUFFIX
from .scan import IMAGE_EXTENSIONS
from .video_probe import VIDEO_EXTENSIONS
from .walk import WalkSkip

DOWNLOADS = ".st/downloads"


@dataclasses.dataclass
class RemoteSync:
    lists: DatasetList  # with the remote datasets' roots (and caption tables) filled in
    skips: dict[str, list[WalkSkip]]  # dataset id -> objects that could not be downloaded
    facts: dict[str, dict[str, Any]]  # dataset id -> what the manifest records about its source


def sync_remote(claim: OutputClaim, lists: DatasetList, out_dir: Path) -> RemoteSync:
    remote = [s for s in lists.images if s.source is not None]
    if not remote:
        return RemoteSync(lists, {}, {})
    claim.will_write(folders=[DOWNLOADS])
    store = out_dir.resolve() / DOWNLOADS
    replaced, skips, facts = {}, {}, {}
    for spec in remote:
        textfile = spec.caption_strategy == "textfile" and not spec.only_instance_prompt
        parquet = spec.caption_strategy == "parquet" and spec.parquet is not None and not spec.only_instance_prompt
        table = parquet and spec.source.kind != "aws"  # the source's caption column
        in_bucket = [spec.parquet.path.as_posix()] if parquet and not table else []
        media = VIDEO_EXTENSIONS if spec.dataset_type == "video" else IMAGE_EXTENSIONS
        extensions = media | {CAPTION_SUFFIX} if textfile else media
        result, facts[spec.id] = sync_source(spec.source, spec.id, store, extensions, with_captions=table,
                                             extra_keys=in_bucket)  # fmt: skip
        changes: dict[str, Any] = {"root": result.root}
        if table:
            changes["parquet"] = dataclasses.replace(spec.parquet, path=result.captions or result.root / "none")
        for key in in_bucket:
            changes["parquet"] = dataclasses.replace(spec.parquet, path=_downloaded_key(spec.id, key, result))
        replaced[spec.id] = dataclasses.replace(spec, **changes)
        skips[spec.id] = [WalkSkip(str(result.root / f.rel), f.reason, f.detail) for f in result.failures
                          if not f.rel.startswith(KEYS_FOLDER + "/")]  # fmt: skip
    images = [replaced.get(s.id, s) for s in lists.images]
    return RemoteSync(DatasetList(images, lists.conditioning), skips, facts)


def _downloaded_key(dataset_id: str, key: str, result: SyncResult) -> Path:
    """The local copy of a caption parquet kept in the dataset's bucket (where SimpleTuner reads it)."""
    failed = next((f for f in result.failures if f.rel == f"{KEYS_FOLDER}/{key}"), None)
    if failed is not None:
        raise InputError(f"dataset '{dataset_id}': cannot download its caption parquet ({failed.detail}); parquet.path "
                         "of a `type: aws` dataset is a key in its bucket, as SimpleTuner reads it")
    return result.root / KEYS_FOLDER / key
