"""What an image dataset's `"conditioning": [{"type": "canny", ...}]` asks for: SimpleTuner's conditioning generators
read into `GeneratorSpec`s (types, aliases, parameters and SimpleTuner's defaults, as its
`helpers/data_generation/sample_generator.py` reads them). Shared by the dataset list and `st prepare`, which draws
the images (`pipeline.prepare.generators.generate`).

Generators that need a downloaded model (depth, segmentation, optical flow) are refused: `st prepare` downloads no
models; make those images yourself and name their folder as a `dataset_type: conditioning` dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .config import suggest
from .errors import ConfigError, NotSupportedError

VERSION = 1  # bump when a generator's output for the same spec and seed key changes

MASK_TYPES = ("rectangle", "circle", "brush", "irregular")  # random_masks shapes, in SimpleTuner's default order
CONDITIONING_TYPES = ("controlnet", "mask", "segmentation", "reference_strict", "reference_loose")
# Keys every generator object may carry besides its parameters.
COMMON_KEYS = ("type", "params", "conditioning_type", "captions", "caption_strategy", "instance_prompt",
               "instance_data_dir")  # fmt: skip

ALIASES = {
    "canny": "canny", "edges": "canny",
    "superresolution": "superresolution", "super_resolution": "superresolution", "lowres": "superresolution",
    "jpeg_artifacts": "jpeg_artifacts", "jpeg": "jpeg_artifacts", "compression": "jpeg_artifacts",
    "random_masks": "random_masks", "masks": "random_masks", "inpainting": "random_masks",
    "sdr": "sdr", "sdr_downsample": "sdr", "logc3_sdr": "sdr", "hdr_to_sdr": "sdr",
}  # fmt: skip
NEEDS_MODEL = {
    "depth": "a DPT depth-estimation model (Intel/dpt-large)",
    "depth_map": "a DPT depth-estimation model (Intel/dpt-large)",
    "depth_midas": "a DPT depth-estimation model (Intel/dpt-large)",
    "segmentation": "a Mask2Former segmentation model",
    "semantic_segmentation": "a Mask2Former segmentation model",
    "optical_flow": "the RAFT optical-flow model",
    "flow": "the RAFT optical-flow model",
}
VIDEO_ONLY = ("i2v_first_frame", "wan_i2v_first_frame")


# Parameter checks: each returns the value to keep or raises TypeError/ValueError saying what is expected. ----------------------


def _number(lo: float | None = None, hi: float | None = None, above: float | None = None, optional=False):
    def check(v):
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError("a number" + (" or null" if optional else ""))
        if (lo is not None and v < lo) or (hi is not None and v > hi) or (above is not None and v <= above):
            raise ValueError(_range_text(lo, hi, above))
        return v

    return check


def _integer(lo: int | None = None, hi: int | None = None, optional=False):
    def check(v):
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError("a whole number" + (" or null" if optional else ""))
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ValueError(_range_text(lo, hi, None))
        return v

    return check


def _range_text(lo, hi, above) -> str:
    if above is not None:
        return f"a number above {above}"
    if lo is not None and hi is not None:
        return f"a number from {lo} to {hi}"
    return f"a number of at least {lo}" if lo is not None else f"a number of at most {hi}"


def _flag(v):
    if not isinstance(v, bool):
        raise TypeError("true or false")
    return v


def _choice(*choices, optional=False):
    def check(v):
        if (v is None and optional) or v in choices:
            return v
        raise ValueError("one of " + ", ".join(repr(c) for c in choices) + (" or null" if optional else ""))

    return check


def _list_of(item: Callable, length: int | None = None, optional=False):
    def check(v):
        if v is None and optional:
            return None
        if not isinstance(v, (list, tuple)) or not v or (length is not None and len(v) != length):
            raise ValueError(f"a list of {length} values" if length else "a non-empty list")
        return [item(x) for x in v]

    return check


# SimpleTuner's defaults (sample_generator.py), by canonical type. ----------------------------------------------------

_Q = _integer(1, 100)
PARAMS: dict[str, dict[str, tuple[Any, Callable]]] = {
    "canny": {
        "low_threshold": (50, _number(above=0)),
        "high_threshold": (100, _number(above=0)),
    },
    "superresolution": {
        "blur_radius": (2.0, _number(lo=0)),
        "blur_type": ("gaussian", _choice("gaussian", "box", "both")),
        "add_noise": (True, _flag),
        "noise_level": (0.02, _number(lo=0)),
        "jpeg_quality": (None, _integer(1, 100, optional=True)),
        "downscale_factor": (None, _number(above=0, optional=True)),
    },
    "jpeg_artifacts": {
        "quality_mode": ("fixed", _choice("fixed", "range", "random")),
        "quality": (25, _Q),
        "quality_range": ([10, 50], _list_of(_Q, length=2)),
        "quality_list": ([10, 20, 30, 40], _list_of(_Q)),
        "compression_rounds": (1, _integer(lo=0)),
        "round_quality_decay": (0.9, _number(lo=0)),
        "subsampling": (None, _choice("4:4:4", "4:2:2", "4:2:0", optional=True)),
        "optimize": (False, _flag),
        "progressive": (False, _flag),
        "pre_blur": (False, _flag),
        "pre_blur_radius": (0.5, _number(lo=0)),
        "add_noise": (False, _flag),
        "noise_level": (0.01, _number(lo=0)),
        "enhance_blocks": (False, _flag),
        "block_noise_level": (0.02, _number(lo=0)),
    },
    "random_masks": {
        "mask_types": (list(MASK_TYPES), _list_of(_choice(*MASK_TYPES))),
        "mask_type_weights": (None, _list_of(_number(lo=0), optional=True)),
        "min_coverage": (0.1, _number(0, 1)),
        "max_coverage": (0.5, _number(0, 1)),
        "min_masks": (1, _integer(lo=1)),
        "max_masks": (5, _integer(lo=1)),
        "rect_min_size": (0.1, _number(0, 1)),
        "rect_max_size": (0.4, _number(0, 1)),
        "circle_min_radius": (0.05, _number(0, 0.5)),
        "circle_max_radius": (0.2, _number(0, 0.5)),
        "brush_min_width": (5, _integer(lo=1)),
        "brush_max_width": (40, _integer(lo=1)),
        "brush_min_length": (0.1, _number(lo=0)),
        "brush_max_length": (0.5, _number(lo=0)),
        "irregular_min_points": (5, _integer(lo=3)),
        "irregular_max_points": (20, _integer(lo=3)),
        "edge_blur": (True, _flag),
        "edge_blur_radius": (2.0, _number(lo=0)),
        "edge_feather": (True, _flag),
        "output_mode": ("mask", _choice("mask", "masked_image")),
        "mask_value": (255, _integer(0, 255)),
        "invert_mask": (False, _flag),
    },
    "sdr": {
        "transform": ("rec709", _choice("rec709", "logc3", "srgb", "identity", "ldr")),
        "input_scale": (1.0, _number(above=0)),
        "exposure": (0.0, _number()),
    },
}
# Pairs that must be ordered (low, high) for SimpleTuner's draws to be defined.
_ORDERED = {
    "canny": [("low_threshold", "high_threshold")],
    "random_masks": [("min_coverage", "max_coverage"), ("min_masks", "max_masks"), ("rect_min_size", "rect_max_size"),
                     ("circle_min_radius", "circle_max_radius"), ("brush_min_width", "brush_max_width"),
                     ("brush_min_length", "brush_max_length"), ("irregular_min_points", "irregular_max_points")],
}  # fmt: skip


@dataclass(frozen=True)
class GeneratorSpec:
    """One conditioning generator. `type` is canonical (`edges` -> `canny`); `name` is the type as written, which
    SimpleTuner puts in the generated dataset's id; `params` holds every parameter, SimpleTuner's defaults filled in."""

    type: str
    name: str
    settings: tuple[tuple[str, Any], ...]  # the parameters, sorted, lists as tuples (so that a spec is hashable)
    conditioning_type: str
    # `captions`: what a sample is captioned with when it trains with this conditioning (one chosen per step, as a
    # sample's several captions are); None: its source's captions.
    captions: tuple[str, ...] | None = None

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.settings)

    def describe(self) -> dict[str, Any]:
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.settings}
        captions = {"captions": list(self.captions)} if self.captions is not None else {}
        return {"type": self.type, "name": self.name, "params": params,
                "conditioning_type": self.conditioning_type, "version": VERSION, **captions}  # fmt: skip


def dataset_id(source_id: str, spec: GeneratorSpec) -> str:
    """SimpleTuner's id for the generated dataset: `{source_id}_conditioning_{type as written}`."""
    return f"{source_id}_conditioning_{spec.name}"


def parse_generators(value: Any, where: str) -> tuple[GeneratorSpec, ...]:
    """The `conditioning` value of a dataset entry (an object or a list of objects) as specs, in order."""
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise ConfigError(f"{where}.conditioning: expected a list of generator objects like "
                          f'{{"type": "canny"}}, got {type(value).__name__}')  # fmt: skip
    specs = tuple(_parse_one(item, f"{where}.conditioning[{i}]") for i, item in enumerate(items))
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{where}.conditioning: two generators of type '{name}' would both make the dataset "
                              f"'<id>_conditioning_{name}'; keep one")  # fmt: skip
    return specs


def _parse_one(item: Any, where: str) -> GeneratorSpec:
    if not isinstance(item, dict):
        raise ConfigError(f'{where}: expected an object like {{"type": "canny"}}, got {item!r}')
    name = item.get("type")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: 'type' is required (one of {', '.join(sorted(ALIASES))})")
    if name in NEEDS_MODEL:
        raise NotSupportedError(
            f"{where}: conditioning type '{name}' needs {NEEDS_MODEL[name]}, and st prepare downloads no models; "
            "generate those images yourself and list their folder as a dataset with dataset_type 'conditioning'"
        )
    if name in VIDEO_ONLY:
        raise NotSupportedError(f"{where}: conditioning type '{name}' builds image-to-video conditioning from video "
                                "datasets, which st does not train")  # fmt: skip
    kind = ALIASES.get(name)
    if kind is None:
        raise ConfigError(f"{where}.type: unknown conditioning type '{name}'{suggest(name, [*ALIASES, *NEEDS_MODEL])}")
    captions = _captions(item, where)
    if item.get("instance_data_dir") is not None:
        raise NotSupportedError(f"{where}.instance_data_dir: st prepare writes generated datasets inside its output "
                                "folder (conditioning/<id>); remove 'instance_data_dir'")  # fmt: skip
    nested = item.get("params", {})
    if not isinstance(nested, dict):
        raise ConfigError(f"{where}.params: expected an object of generator parameters, got {nested!r}")
    known = PARAMS[kind]
    for key in [*item, *nested]:
        if key not in known and (key not in COMMON_KEYS or key in nested):
            hint = suggest(key, [*known, *COMMON_KEYS])
            raise ConfigError(f"{where}: unknown key '{key}' for conditioning type '{name}'{hint}")
    given = {k: v for k, v in item.items() if k in known} | nested  # `params` wins, as SimpleTuner merges them
    params = _resolve(kind, name, given, where)
    settings = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))
    return GeneratorSpec(kind, name, settings, _conditioning_type(item, kind, params, where), captions)


def _captions(item: dict[str, Any], where: str) -> tuple[str, ...] | None:
    """`captions`: a string or a list of strings the generated dataset's samples are captioned with; false / null:
    the source's captions (as SimpleTuner reads it)."""
    for key in ("caption_strategy", "instance_prompt"):
        if item.get(key) not in (None, False):
            raise NotSupportedError(f"{where}.{key}: a generated conditioning dataset takes its source's captions, "
                                    f"or those listed in 'captions'; remove '{key}'")  # fmt: skip
    value = item.get("captions")
    if value is None or value is False:
        return None
    listed = [value] if isinstance(value, str) else value
    if not isinstance(listed, list) or not listed or not all(isinstance(c, str) for c in listed):
        raise ConfigError(f"{where}.captions: expected a caption or a non-empty list of captions, got {value!r}")
    return tuple(listed)


def _resolve(kind: str, name: str, given: dict[str, Any], where: str) -> dict[str, Any]:
    params = {}
    for key, (default, check) in PARAMS[kind].items():
        if kind == "sdr" and key == "transform" and name == "logc3_sdr":
            default = "logc3"
        value = given.get(key, default)
        try:
            params[key] = check(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}.{key}: expected {exc}, got {value!r}") from None
    if kind == "sdr" and params["transform"] in ("identity", "ldr"):
        params["transform"] = "rec709"
    for low, high in _ORDERED.get(kind, ()):
        if params[low] > params[high]:
            raise ConfigError(f"{where}: {low} ({params[low]}) must not exceed {high} ({params[high]})")
    weights = params.get("mask_type_weights")
    if weights is not None and len(weights) != len(params["mask_types"]):
        raise ConfigError(f"{where}.mask_type_weights: give one weight per entry of mask_types "
                          f"({len(params['mask_types'])}), got {len(weights)}")  # fmt: skip
    return params


def _conditioning_type(item: dict[str, Any], kind: str, params: dict[str, Any], where: str) -> str:
    explicit = item.get("conditioning_type")
    if explicit is not None:
        if explicit not in CONDITIONING_TYPES:
            raise ConfigError(f"{where}.conditioning_type: expected one of {', '.join(CONDITIONING_TYPES)}, "
                              f"got {explicit!r}")  # fmt: skip
        return explicit
    return "mask" if kind == "random_masks" and params["output_mode"] == "mask" else "controlnet"
