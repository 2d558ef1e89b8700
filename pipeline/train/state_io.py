"""Checkpoint state without pickle: tensors go to `<prefix>.safetensors`, everything else to `<prefix>.json`.

A state is any nesting of dicts, lists, tuples, None, bools, ints, floats, strings and torch tensors (any dtype,
0-dim included). Loading it back is exact: tensors compare `torch.equal` with the same dtype, tuples come back as
tuples, and dict keys keep their type (optimizer state dicts key parameters by int). Only safetensors and JSON are ever
deserialised.

In the JSON, a tensor is `{"__st_tensor__": name}`, a tuple `{"__st_tuple__": [...]}` and a dict whose keys are not
all plain strings `{"__st_dict__": [[key, value], ...]}`. Both files carry the same random id, so a `.json` is never
paired with a `.safetensors` from another save.
"""

from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..fsutil import atomic_path
from ..log import get_logger

log = get_logger("train.state_io")

FORMAT = "st-state"
VERSION = 1
TENSOR = "__st_tensor__"
TUPLE = "__st_tuple__"
DICT = "__st_dict__"
RESERVED_PREFIX = "__st_"


def state_files(path_prefix: str | Path) -> tuple[Path, Path]:
    """The `.safetensors` and `.json` files of a state saved under `path_prefix`."""
    prefix = Path(path_prefix)
    return prefix.with_name(prefix.name + ".safetensors"), prefix.with_name(prefix.name + ".json")


class _Encoder:
    """Turns a state into a JSON-able tree plus a flat dict of CPU tensors ready for safetensors."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._names: dict[int, str] = {}  # id(tensor) -> name: a tensor referenced twice is stored once
        self._storages: set[tuple[str, int]] = set()

    def encode(self, value: Any, path: str) -> Any:
        if value is None or type(value) in (bool, int, float, str):
            return value
        if isinstance(value, torch.Tensor):
            return {TENSOR: self._tensor(value, path)}
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, str):
            return str(value)
        if type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
            return self.encode(value.item(), path)  # numpy scalars become Python numbers
        if isinstance(value, tuple):
            return {TUPLE: [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [self.encode(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(type(k) is str and not k.startswith(RESERVED_PREFIX) for k in value):
                return {k: self.encode(v, f"{path}/{k}") for k, v in value.items()}
            pairs = []
            for k, v in value.items():
                if isinstance(k, torch.Tensor):
                    raise TypeError(f"cannot save a dict keyed by tensors at {path or '/'}")
                pairs.append([self.encode(k, f"{path}/<key>"), self.encode(v, f"{path}/{k}")])
            return {DICT: pairs}
        raise TypeError(
            f"cannot save a {type(value).__module__}.{type(value).__qualname__} at {path or '/'}: a state may only "
            "hold dicts, lists, tuples, None, bools, ints, floats, strings and torch tensors"
        )

    def _tensor(self, tensor: torch.Tensor, path: str) -> str:
        if id(tensor) in self._names:
            return self._names[id(tensor)]
        if tensor.is_sparse or tensor.layout != torch.strided:
            raise TypeError(f"cannot save a {tensor.layout} tensor at {path}; only dense tensors")
        data = tensor.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        data = data.contiguous()
        storage = (str(data.device), data.untyped_storage().data_ptr())
        if storage in self._storages:  # safetensors refuses tensors that share memory
            data = data.clone()
        elif storage[1] != 0:
            self._storages.add(storage)
        name = path.lstrip("/") or "tensor"
        if name in self.tensors:
            n = 1
            while f"{name}#{n}" in self.tensors:
                n += 1
            name = f"{name}#{n}"
        self.tensors[name] = data
        self._names[id(tensor)] = name
        return name


def save_state(path_prefix: str | Path, state: Any) -> None:
    """Save `state` as `<path_prefix>.safetensors` (its tensors) and `<path_prefix>.json` (the rest), atomically."""
    from safetensors.torch import save_file

    encoder = _Encoder()
    tree = encoder.encode(state, "")
    state_id = uuid.uuid4().hex
    tensor_path, json_path = state_files(path_prefix)
    with atomic_path(tensor_path) as tmp:
        save_file(encoder.tensors, str(tmp), metadata={"format": FORMAT, "id": state_id})
    document = {"format": FORMAT, "version": VERSION, "id": state_id, "state": tree}
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(document, ensure_ascii=False, separators=(",", ":")))


def load_state(path_prefix: str | Path, *, device: str | torch.device = "cpu") -> Any:
    """Load a state written by `save_state`; tensors are placed on `device`."""
    from safetensors import safe_open

    tensor_path, json_path = state_files(path_prefix)
    missing = [p.name for p in (tensor_path, json_path) if not p.is_file()]
    if missing:
        raise InputError(f"saved state {path_prefix} is incomplete: {', '.join(missing)} missing")
    try:
        document = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{json_path} is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InputError(f"{json_path} is not an st state file")
    if document.get("version") != VERSION:
        raise InputError(f"{json_path} has state format version {document.get('version')}; this st reads {VERSION}")
    try:
        with safe_open(str(tensor_path), framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise InputError(f"{tensor_path} cannot be read: {exc}") from None
    if metadata.get("id") != document.get("id"):
        raise InputError(f"{tensor_path} and {json_path} come from different saves; the checkpoint is damaged")
    return _decode(document["state"], tensors, json_path)


def _decode(node: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors, where) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        ((key, value),) = node.items()
        if key == TENSOR:
            if value not in tensors:
                raise InputError(f"{where} refers to tensor {value!r}, which its .safetensors file lacks")
            return tensors[value]
        if key == TUPLE:
            return tuple(_decode(v, tensors, where) for v in value)
        if key == DICT:
            return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in value}
    return {k: _decode(v, tensors, where) for k, v in node.items()}


# --------------------------------------------------------------------------------------------------------------------
# Optimizer and RNG helpers.


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's `state_dict` (saveable with `save_state`)."""
    return optimizer.state_dict()


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state from `optimizer_state` into an optimizer built over the same parameters."""
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError) as exc:
        raise InputError(
            f"the saved optimizer state does not fit {type(optimizer).__name__} ({exc}); was it saved with another "
            "optimizer or other trained parameters?"
        ) from None


def generator_state(generator: torch.Generator) -> dict:
    """The state of a `torch.Generator`, as tensors and JSON values."""
    return {"device": str(generator.device), "state": generator.get_state()}


def set_generator_state(generator: torch.Generator, state: dict) -> None:
    """Restore a `torch.Generator` from `generator_state`."""
    if torch.device(state["device"]).type != generator.device.type:
        raise ValueError(f"generator state is for {state['device']}, not {generator.device}")
    generator.set_state(state["state"].cpu())


def rng_state() -> dict:
    """The global random states: Python `random`, numpy's legacy global generator, torch CPU and (if present) CUDA."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the global random states captured by `rng_state`."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "numpy" in state:
        import numpy as np

        saved = state["numpy"]
        keys = saved["keys"].cpu().numpy().astype(np.uint32)
        np.random.set_state((saved["kind"], keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        saved_cuda = list(state["cuda"])
        count = torch.cuda.device_count()
        if len(saved_cuda) != count:
            log.warning("random state saved for %d CUDA devices, restoring it on %d", len(saved_cuda), count)
        for index, device_state in enumerate(saved_cuda[:count]):
            torch.cuda.set_rng_state(device_state.cpu(), index)
