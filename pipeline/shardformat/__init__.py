"""The cache shard format, in one place: what a sample's members are and how they are encoded and decoded (`codec`),
the checks their bytes must pass (`checks`), the tar files that hold them (`tar`), the index the writer records so
that readers seek instead of scanning (`index`), and the once-per-machine sha256 check (`verified`).

Every reader and writer of shards (`st cache`, its merge and reuse, `st verify`, `CacheReader`, training) goes
through these modules; nothing else opens a shard.
"""

from .checks import CacheChecks, CheckedSample, DecodedSample, member_where
from .codec import (
    COND,
    JSON,
    LATENT,
    MAX_MEMBER_BYTES,
    MEMBERS,
    RECACHE_HINT,
    TEXT,
    decode_json,
    decompress_frame,
    encode_sample,
    frame_content_size,
    group_captions,
    malformed,
    pack_json,
    pack_tensors,
    tensor_specs,
    unpack_tensors,
    webdataset_decoder,
)
from .index import IndexedSample, IndexedShard, load_index, sidecar_path
from .tar import ShardSample, ShardWriter, read_member, read_shard, scan_shard, shard_name, verify_shard

__all__ = [
    "COND", "JSON", "LATENT", "MAX_MEMBER_BYTES", "MEMBERS", "RECACHE_HINT", "TEXT", "CacheChecks", "CheckedSample",
    "DecodedSample", "IndexedSample", "IndexedShard", "ShardSample", "ShardWriter", "decode_json", "decompress_frame",
    "encode_sample", "frame_content_size", "group_captions", "load_index", "malformed", "member_where", "pack_json",
    "pack_tensors", "read_member", "read_shard", "scan_shard", "shard_name", "sidecar_path", "tensor_specs",
    "unpack_tensors", "verify_shard", "webdataset_decoder",
]  # fmt: skip
