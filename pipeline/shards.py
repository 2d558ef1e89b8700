"""Cache shards: kept importable for existing callers; the format lives in `pipeline.shardformat`."""

from .shardformat import *  # noqa: F403
from .shardformat.codec import TENSOR_SUFFIX  # noqa: F401
