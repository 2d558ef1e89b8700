"""The settings of TREAD token routing (`tread_config`), read and checked as SimpleTuner reads them.

`tread_config` is a dict, or a string holding one (JSON, or a Python literal as SimpleTuner's `ast.literal_eval`
reads it when the string starts with "{"), with `routes`: a list of {selection_ratio, start_layer_idx, end_layer_idx}.
A route drops a `selection_ratio` share of the image / video tokens before block `start_layer_idx` and puts them back
after block `end_layer_idx` (both inclusive, counted over the transformer's blocks in execution order; negative
indices count from the end, -1 is the last block). Unset, null or `{}` means off. The routing itself is in
`pipeline.train.tread`; this module has no torch import, so `st check` and config loading stay instant.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

OPTION = "tread_config"
# The families whose transformer st routes (pipeline.train.tread.LAYOUTS). SimpleTuner also routes cosmos, ltxvideo2
# and more; st refuses those for now (NOT_ROUTED says why, where known).
SUPPORTED_FAMILIES = ("auraflow", "chroma", "flux", "flux2", "flux_kontext", "hidream", "ltxvideo", "pixart_sigma",
                      "qwen_image", "sana", "sd3", "wan", "wan_i2v", "z_image")
NOT_ROUTED: dict[str, str] = {}
_ROUTE_KEYS = ("selection_ratio", "start_layer_idx", "end_layer_idx")


@dataclass(frozen=True)
class Route:
    """One routing window, as written (indices may be negative until `resolve`)."""

    selection_ratio: float
    start_layer_idx: int
    end_layer_idx: int

    def as_dict(self) -> dict[str, Any]:
        return {"selection_ratio": self.selection_ratio, "start_layer_idx": self.start_layer_idx,
                "end_layer_idx": self.end_layer_idx}  # fmt: skip


def _as_dict(value: Any) -> dict[str, Any] | None:
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("{"):
            raise ConfigError(f"{OPTION} must be a dict with `routes` (or a JSON string of one), got {value!r}")
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            try:
                parsed = ast.literal_eval(text)  # SimpleTuner's reading of a string that starts with "{"
            except (ValueError, SyntaxError) as exc:
                raise ConfigError(f"{OPTION} is not valid JSON or a Python dict literal ({exc}): {value!r}") from exc
        value = parsed
    if not isinstance(value, dict):
        raise ConfigError(f"{OPTION} must be a dict with `routes`, got {type(value).__name__} {value!r}")
    return value or None


def parse_routes(value: Any) -> list[Route] | None:
    """The routes of a `tread_config` value (None when TREAD is off); structure and ranges are checked here, the
    block indices against the model's depth in `resolve`."""
    settings = _as_dict(value)
    if settings is None:
        return None
    unknown = sorted(set(settings) - {"routes"})
    if unknown:
        raise ConfigError(f"{OPTION} has unknown key(s) {', '.join(unknown)}: it takes only `routes`")
    routes = settings.get("routes")
    if not isinstance(routes, list) or not routes:
        raise ConfigError(f"{OPTION} needs `routes`: a non-empty list of {{selection_ratio, start_layer_idx, "
                          f"end_layer_idx}} (SimpleTuner's documentation/TREAD.md), got {routes!r}")  # fmt: skip
    return [_route(i, entry) for i, entry in enumerate(routes)]


def _route(i: int, entry: Any) -> Route:
    where = f"{OPTION} routes[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a dict of {', '.join(_ROUTE_KEYS)}, got {entry!r}")
    missing = [k for k in _ROUTE_KEYS if k not in entry]
    extra = sorted(set(entry) - set(_ROUTE_KEYS))
    if missing or extra:
        raise ConfigError(f"{where} must have exactly {', '.join(_ROUTE_KEYS)}"
                          + (f"; missing {', '.join(missing)}" if missing else "")
                          + (f"; unknown {', '.join(extra)}" if extra else ""))  # fmt: skip
    ratio = entry["selection_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ConfigError(f"{where} selection_ratio must be a number in [0, 1) (the share of tokens that skip the "
                          f"route), got {ratio!r}")  # fmt: skip
    for key in ("start_layer_idx", "end_layer_idx"):
        if isinstance(entry[key], bool) or not isinstance(entry[key], int):
            raise ConfigError(f"{where} {key} must be an integer block index (negative counts from the end), got "
                              f"{entry[key]!r}")  # fmt: skip
    return Route(float(ratio), entry["start_layer_idx"], entry["end_layer_idx"])


def resolve(routes: list[Route], depth: int) -> list[Route]:
    """The routes with negative indices counted from the end of the `depth` blocks, checked: each inside the model,
    start <= end, and the routes in order without overlap (SimpleTuner runs them one after another, in the order
    given; a route that starts before the previous one ends would never run there)."""
    resolved = []
    for i, route in enumerate(routes):
        start, end = (idx if idx >= 0 else depth + idx for idx in (route.start_layer_idx, route.end_layer_idx))
        where = f"{OPTION} routes[{i}] ({route.start_layer_idx}..{route.end_layer_idx})"
        if not (0 <= start < depth and 0 <= end < depth):
            raise ConfigError(f"{where} is outside the model's {depth} transformer blocks: indices run from 0 to "
                              f"{depth - 1} (or -{depth} to -1)")  # fmt: skip
        if start > end:
            raise ConfigError(f"{where} starts after it ends (blocks {start}..{end} of {depth}): start_layer_idx must "
                              "be <= end_layer_idx")  # fmt: skip
        if resolved and start <= resolved[-1].end_layer_idx:
            raise ConfigError(f"{where} (blocks {start}..{end}) starts before the previous route ends (block "
                              f"{resolved[-1].end_layer_idx}): list routes in block order without overlap")
        resolved.append(Route(route.selection_ratio, start, end))
    return resolved


def check_family(value: Any, family_name: str, flavour: str | None = None) -> None:  # noqa: ARG001
    """Refuse TREAD for a family st does not route (every flavour of a routed family is routed: Wan 2.2 TI2V's
    per-token timesteps and Qwen-Image Edit 2511's per-token modulation index go with the kept tokens)."""
    if parse_routes(value) is None:
        return
    if family_name not in SUPPORTED_FAMILIES:
        why = f" ({NOT_ROUTED[family_name]})" if family_name in NOT_ROUTED else ""
        named = [f for f in SUPPORTED_FAMILIES if f not in ("flux_kontext", "wan_i2v")]  # variants, not families
        raise ConfigError(f"{OPTION} (TREAD token routing) is supported for model_family "
                          f"{', '.join(named)} in st; model_family {family_name} is not routed yet"
                          f"{why}: remove {OPTION}")  # fmt: skip
