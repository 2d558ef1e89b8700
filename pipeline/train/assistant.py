"""SimpleTuner's assistant LoRA: a frozen LoRA (ostris' training adapter) that sits on a distilled base while a LoRA
trains beside it (Flux `schnell`, Z-Image `turbo` / `turbo-ostris-v2`), and is switched off for validation.

SimpleTuner (helpers/assistant_lora.py, models/common.py) loads it as a second peft adapter, "assistant", through the
family pipeline's `lora_state_dict` / `load_lora_into_transformer`, unfused, frozen, weighted by
`assistant_lora_strength` (1.0) while training and `assistant_lora_inference_strength` (0.0: off) at validation; only
the trainable "default" adapter is saved. st reads the file the same way (the pipeline class's `lora_state_dict`
converts ostris' and kohya's layouts to diffusers keys) and adds the same term, `strength * scale * B(A(x))` with
`scale = alpha / rank` (1 without alphas, as peft), to each target module's output through a forward hook on the
base module. DEVIATION: not a peft adapter, so that the user's LoRA stays peft's only ("default") adapter: its
parameters, checkpoints and published file cannot pick up the assistant's weights, and the base's quantised modules
carry the hook unchanged. The arithmetic is SimpleTuner's; the order of the two LoRA terms in the sum may differ.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, InputError
from ..families import Family
from ..families.hub import hub_errors, hub_problem, looks_like_path
from ..log import get_logger

log = get_logger(__name__)

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' loader looks for in a repository
# SimpleTuner's ASSISTANT_LORA_FLAVOURS / ASSISTANT_LORA_PATH / weight names (models/flux, models/z_image).
# ostris/FLUX.1-schnell-training-adapter ships one file, diffusers' default name (SimpleTuner passes no weight name
# and diffusers picks that file); Z-Image's names one file per flavour.
DEFAULTS: dict[tuple[str, str], tuple[str, str]] = {
    ("flux", "schnell"): ("ostris/FLUX.1-schnell-training-adapter", DIFFUSERS_LORA_FILE),
    ("z_image", "turbo"): ("ostris/zimage_turbo_training_adapter", "zimage_turbo_training_adapter_v1.safetensors"),
    ("z_image", "turbo-ostris-v2"): ("ostris/zimage_turbo_training_adapter",
                                     "zimage_turbo_training_adapter_v2.safetensors"),
}  # fmt: skip
OPTIONS = ("assistant_lora_path", "assistant_lora_weight_name")


@dataclass(frozen=True)
class AssistantFile:
    """The assistant LoRA a run loads: where it was named (`source`, `weight_name`) and the file read."""

    source: str
    weight_name: str
    file: Path
    strength: float
    inference_strength: float


def _flavour(config: Any, family_name: str) -> str | None:
    from pipeline.families import get_family

    flavour = config.model_flavour
    return get_family(family_name).default_flavour if flavour is None else flavour


def check(config: Any, family_name: str) -> None:
    """Refuse, before anything loads, what SimpleTuner refuses or would ignore: Schnell without `flux_fast_schedule`,
    and an assistant LoRA named for a model that takes none."""
    flavour = _flavour(config, family_name)
    if (family_name, flavour) == ("flux", "schnell") and not config.flux_fast_schedule:
        raise ConfigError("model_flavour schnell trains with Schnell's fast schedule: set flux_fast_schedule=true (as "
                          "SimpleTuner requires; st has no i_know_what_i_am_doing override)")  # fmt: skip
    named = [o for o in OPTIONS if getattr(config, o)]
    if named and (family_name, flavour) not in DEFAULTS:
        # DEVIATION: SimpleTuner loads an assistant only for its whitelisted flavours and ignores the path otherwise.
        takes = ", ".join(f"{f} {v}" for f, v in DEFAULTS)
        raise ConfigError(f"{named[0]} is set, but an assistant LoRA is loaded only for {takes} (as in SimpleTuner), "
                          f"not {family_name} {flavour}: remove {' and '.join(named)}")  # fmt: skip


def resolve(config: Any, family_name: str, base_dir: Path | None = None) -> AssistantFile | None:
    """The assistant LoRA this run loads (None: none), its file found locally or in the hub cache / on the hub
    (`hf_hub_download`, which honours HF_HUB_OFFLINE). A LoRA run of a flavour that takes one loads it unless
    `disable_assistant_lora`; a file st cannot find stops the run (exit 2) naming the file and the fixes."""
    check(config, family_name)
    flavour = _flavour(config, family_name)
    if (family_name, flavour) not in DEFAULTS or config.disable_assistant_lora or config.model_type != "lora":
        return None
    if config.fuse_qkv_projections:  # the fused projection would run and the hooked to_q / to_k / to_v would not
        raise ConfigError(f"fuse_qkv_projections cannot be used with the assistant LoRA that {family_name} {flavour} "
                          "trains over (its q/k/v terms target the unfused projections): set "
                          "fuse_qkv_projections=false, or disable_assistant_lora=true")  # fmt: skip
    default_source, default_weight = DEFAULTS[(family_name, flavour)]
    source = config.assistant_lora_path or default_source
    weight = config.assistant_lora_weight_name or (default_weight if source == default_source else DIFFUSERS_LORA_FILE)
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None and not path.exists() and (base_dir / path).exists():
        path = base_dir / path
    fix = ("set assistant_lora_path (and assistant_lora_weight_name) to the adapter's file, or "
           "disable_assistant_lora=true to train without it (SimpleTuner warns of lower quality)")  # fmt: skip
    if path.is_file():
        file = path
    elif path.is_dir():
        file = path / weight
        if not file.is_file():
            raise InputError(f"assistant_lora_path {path}: no {weight} in this folder; {fix}")
    elif looks_like_path(source):
        raise InputError(f"assistant_lora_path {source}: no such file or folder; {fix}")
    else:
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(source, weight))
        except hub_errors() as exc:
            raise InputError(
                f"the assistant LoRA {weight} of {source} ({family_name} {flavour} trains over it, as in "
                f"SimpleTuner) could not be read: {hub_problem(exc)}. Download it where there is network "
                f"(`hf download {source} {weight}`) so that the hub cache holds it, or {fix}"
            ) from None
    if file.suffix != ".safetensors":
        raise InputError(f"assistant LoRA {file}: st reads LoRA weights from .safetensors files only")
    return AssistantFile(source, weight, file, float(config.assistant_lora_strength),
                         float(config.assistant_lora_inference_strength))  # fmt: skip


def _read(spec: AssistantFile, family: Family) -> dict[str, tuple[Any, Any, float]]:
    """module name -> (A, B, alpha / rank) from the file, converted to diffusers keys by the pipeline's loader."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(str(spec.file))
    except (SafetensorError, OSError) as exc:
        raise InputError(f"assistant LoRA {spec.file}: not a readable safetensors file ({exc})") from None
    pipeline_class = family.load_pipeline_class()
    wants_alphas = "return_alphas" in inspect.signature(pipeline_class.lora_state_dict).parameters
    kwargs = {"return_alphas": True} if wants_alphas else {}
    state = pipeline_class.lora_state_dict(raw, **kwargs)
    state, alphas = state if isinstance(state, tuple) else (state, None)
    alphas = dict(alphas or {})
    for key in [k for k in state if k.endswith(".alpha")]:
        alphas[key] = state.pop(key)
    prefix = "transformer."
    if any(k.startswith(prefix) for k in state):
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key and key.endswith(".weight"):
                pairs.setdefault(key.split(marker)[0], {})[part] = value
                break
        else:
            raise InputError(f"assistant LoRA {spec.file}: {key} is not a LoRA weight st can apply (lora_A / lora_B "
                             "pairs only: LoKr, DoRA or text-encoder LoRAs are not assistant LoRAs)")  # fmt: skip
    alpha_of = {}
    for key, value in alphas.items():
        name = key.removeprefix(prefix)
        name = name.removesuffix(".alpha").removesuffix(".lora_A").removesuffix(".lora_down")
        alpha_of[name] = float(value)
    modules = {}
    for name, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise InputError(f"assistant LoRA {spec.file}: {name} has only {', '.join(pair)}")
        rank = pair["lora_A"].shape[0]
        modules[name] = (pair["lora_A"], pair["lora_B"], alpha_of.get(name, rank) / rank)
    if not modules:
        raise InputError(f"assistant LoRA {spec.file}: holds no LoRA weights for the {family.name} transformer")
    return modules


class AssistantLora:
    """The frozen assistant terms hooked onto the denoiser's modules; `weight` is what multiplies them now."""

    def __init__(self, spec: AssistantFile, modules: dict[str, tuple[Any, Any, float]]) -> None:
        self.spec = spec
        self.modules = modules
        self.weight = spec.strength
        self.handles: list[Any] = []

    def hook(self, name: str):
        import torch.nn.functional as F

        def add(module, inputs, output):
            if self.weight == 0:
                return output
            down, up, scale = self.modules[name]
            x = inputs[0]
            if down.device != x.device:
                down, up = down.to(x.device), up.to(x.device)
                self.modules[name] = (down, up, scale)
            delta = F.linear(F.linear(x.to(down.dtype), down), up) * (scale * self.weight)
            return output + delta.to(output.dtype)

        return add

    @contextmanager
    def for_validation(self) -> Iterator[None]:
        """Validation renders with `assistant_lora_inference_strength` (SimpleTuner's default 0: the assistant off)."""
        kept, self.weight = self.weight, self.spec.inference_strength
        try:
            yield
        finally:
            self.weight = kept

    @property
    def tensors(self) -> dict[str, Any]:
        """The assistant's weights by module (A and B), as they are now."""
        return {f"{n}.{p}": t for n, (a, b, _) in self.modules.items() for p, t in (("lora_A", a), ("lora_B", b))}


def attach(spec: AssistantFile | None, family: Family, denoiser: Any, dtype: str = "float32") -> AssistantLora | None:
    """Hook the assistant LoRA `spec` onto `denoiser` (after quantisation, before the trained adapter), frozen, in the
    adapters' dtype."""
    if spec is None:
        return None
    import torch

    dtype_ = getattr(torch, dtype)
    modules = {n: (a.to(dtype_).requires_grad_(False), b.to(dtype_).requires_grad_(False), s)
               for n, (a, b, s) in _read(spec, family).items()}  # fmt: skip
    named = dict(denoiser.named_modules())
    missing = [n for n in modules if n not in named]
    if missing:
        raise InputError(f"assistant LoRA {spec.file} targets {len(missing)} module(s) the {family.name} transformer "
                         f"lacks (e.g. {missing[0]}); it is not an adapter for this model")  # fmt: skip
    assistant = AssistantLora(spec, modules)
    for name, (down, up, _) in modules.items():
        layer = named[name]
        features = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        if None not in features and features != (down.shape[1], up.shape[0]):
            raise InputError(f"assistant LoRA {spec.file}: {name} is {down.shape[1]} -> {up.shape[0]}, the model's "
                             f"is {features[0]} -> {features[1]}; it is not an adapter for this model")  # fmt: skip
        assistant.handles.append(layer.register_forward_hook(assistant.hook(name)))
    log.info("assistant LoRA %s (%s): %d modules, weight %s in training, %s at validation", spec.source,
             spec.file.name, len(modules), spec.strength, spec.inference_strength)  # fmt: skip
    return assistant


def key_content(config: Any, family_name: str, base_dir: Path | None = None) -> dict[str, Any]:
    """What the assistant LoRA adds to the train key: its file's sha256 and weights (model_flavour stays out of the
    key, so a schnell run and a dev run of the same model folder would otherwise share it); {} without one."""
    from ..hashing import sha256_file

    found = resolve(config, family_name, base_dir)
    if found is None:
        return {}
    return {"assistant_lora": {"sha256": sha256_file(found.file), "strength": found.strength,
                               "inference_strength": found.inference_strength}}  # fmt: skip
