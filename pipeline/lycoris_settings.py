"""The settings of a LyCORIS network (`lycoris_config`), read and checked as SimpleTuner reads them.

Shared by `st train` (which builds the network from them and keys the run on them) and `st check` (which reports a
bad file before any work). The library itself is imported only to check names against it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import resolve_relative_path
from .errors import ConfigError

# create_lycoris's keywords (deprecated spellings included); anything else in the file is a typo or another tool's.
NETWORK_KEYS = frozenset(
    "algo multiplier linear_dim linear_alpha conv_dim conv_alpha dropout rank_dropout module_dropout use_tucker "
    "use_scalar block_size train_norm constraint rescaled dora_wd wd_on_output full_matrix bypass_mode "
    "unbalanced_factorization factor decompose_both preset train_llm_adapter disable_conv_cp use_cp use_conv_cp "
    "constrain".split()
)
INTEGER_KEYS = ("multiplier", "linear_dim", "linear_alpha")


def resolve_config_path(value: str | None, base_dir: Path | None) -> Path:
    """Where `lycoris_config` (or a LyCORIS `init_lora`) points: read like every other path of the config (from the
    working folder first, else beside the config; exit 2 when both exist and differ)."""
    if not value:
        raise ConfigError("lora_type lycoris needs lycoris_config: the path of a LyCORIS JSON file (see "
                          "SimpleTuner's config/lycoris_config.json.example)")  # fmt: skip
    return resolve_relative_path(value, base_dir or Path.cwd())


def read_config(path: Path) -> dict[str, Any]:
    """The LyCORIS settings in `path`, checked key by key (exit 2 naming the file and the key)."""
    from lycoris.config import PRESET
    from lycoris.config_sdk import VALID_PRESET_KEYS
    from lycoris.wrapper import network_module_dict

    try:
        settings = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"lycoris_config {path}: cannot be read ({exc.strerror}); set lycoris_config to the path "
                          "of a LyCORIS JSON file") from None  # fmt: skip
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"lycoris_config {path}: not valid JSON ({exc})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"lycoris_config {path}: must be a JSON object of LyCORIS settings")

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"lycoris_config {path}: key {key!r} {why}")

    for key in settings:
        if key != "apply_preset" and key not in NETWORK_KEYS:
            raise bad(key, f"is not a LyCORIS setting (known: apply_preset, {', '.join(sorted(NETWORK_KEYS))})")
    algo = str(settings.get("algo", "lora")).lower()
    if algo == "tlora":
        raise bad("algo", "tlora (timestep-dependent rank) is not implemented by st; use lokr, loha, locon, ...")
    if algo not in network_module_dict:
        raise bad("algo", f"{algo!r} is not one of {', '.join(sorted(set(network_module_dict) - {'tlora'}))}")
    for key in INTEGER_KEYS:
        if key in settings and (isinstance(settings[key], bool) or not isinstance(settings[key], (int, float))):
            raise bad(key, f"must be a number, not {settings[key]!r}")
    if int(settings.get("linear_dim", 4)) < 1:
        raise bad("linear_dim", "must be at least 1")
    if "preset" in settings and settings["preset"] not in PRESET:
        raise bad("preset", f"{settings['preset']!r} is not one of the library's presets ({', '.join(PRESET)})")
    preset = settings.get("apply_preset")
    if preset is not None:
        if not isinstance(preset, dict):
            raise bad("apply_preset", "must be an object (target_module, target_name, module_algo_map, ...)")
        for key in preset:
            if key not in VALID_PRESET_KEYS:
                raise bad(f"apply_preset.{key}", f"is not a preset key (known: {', '.join(VALID_PRESET_KEYS)})")
        for map_key in ("module_algo_map", "name_algo_map"):
            for target, overrides in (preset.get(map_key) or {}).items():
                if not isinstance(overrides, dict):
                    raise bad(f"apply_preset.{map_key}.{target}", "must be an object of LyCORIS settings")
                for key in overrides:
                    if key not in NETWORK_KEYS and key not in ("dim", "alpha"):
                        raise bad(f"apply_preset.{map_key}.{target}.{key}", "is not a LyCORIS setting")
    return settings


def key_content(config, base_dir: Path | None) -> dict[str, Any] | None:
    """What a LyCORIS run adds to the train stage key: the settings in the lycoris_config file (the option holds only
    its path, and editing the file must re-run training); None for other runs."""
    if config.model_type != "lora" or config.lora_type != "lycoris":
        return None
    return read_config(resolve_config_path(config.lycoris_config, base_dir))
