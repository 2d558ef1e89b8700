"""Progress bars on a terminal, silence elsewhere (CI logs, pipes, tests)."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", **kwargs: Any):
    """A tqdm bar on stderr; disabled when stderr is not a terminal, or when there is nothing to count (total 0)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=total == 0 or not sys.stderr.isatty(), dynamic_ncols=True,
                file=sys.stderr, **kwargs)  # fmt: skip
