"""Which checkpoint a run may continue from.

Every checkpoint records the run it belongs to (`run` in its manifest): the train key, the resume key, the options
and the cache digest. The resume key is the train key without `RESUMABLE_OPTIONS`, the options that never change what
the steps already taken computed. A run continues only from a checkpoint whose resume key equals its own, so a resumed
run is the same trajectory as an uninterrupted one, only longer, shorter, or observed differently.

`resume_from_checkpoint = "latest"` takes the newest checkpoint of this run in the output folder; checkpoints of other
runs (other options, another cache) are named in one log line and never resumed from; the run then starts at step 0
(or, with `st train --resume-strict`, stops with exit 2). A checkpoint named explicitly must match, else exit 2.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..hashing import sha256_json
from ..log import get_logger
from .checkpoint import CHECKPOINT_SCHEMA, list_checkpoints, resolve_resume

log = get_logger("train")

# Options that may differ between a checkpoint and the run that continues it. How far to train (with a decaying
# lr_scheduler the remaining schedule follows the new length, as in SimpleTuner); what validation and evaluation
# render or measure (they run with their own random generators and never touch the weights); where the weights are
# pushed. Checkpoint intervals and limits, validation intervals, tracking, logging, hooks and speed options are
# already outside the train key (`output=False` in pipeline/config.py).
TRAINING_LENGTH = ("max_train_steps", "num_train_epochs")
RESUMABLE_OPTIONS = (
    *TRAINING_LENGTH,
    "validation_prompt",
    "validation_negative_prompt",
    "user_prompt_library",
    "num_validation_images",
    "validation_resolution",
    "validation_num_inference_steps",
    "validation_guidance",
    "validation_guidance_rescale",
    "validation_guidance_real",
    "validation_no_cfg_until_timestep",
    "validation_guidance_skip_layers",
    "validation_guidance_skip_layers_start",
    "validation_guidance_skip_layers_stop",
    "validation_guidance_skip_scale",
    "validation_seed",
    "validation_noise_scheduler",
    "ema_validation",
    "validation_lycoris_strength",
    "num_eval_images",
    "eval_dataset_id",
    "eval_dataset_pooling",
    "hub_model_id",
)


class ResumeMismatch(UserError):
    """A checkpoint cannot be continued by this run (other options, another cache, past the target step)."""


@dataclass(frozen=True)
class RunRecord:
    """What identifies a training run; stored in each of its checkpoints."""

    key: str
    config: dict[str, Any]
    parent_digest: str
    denoiser: dict[str, Any]
    family: str
    format: int

    @property
    def resume_key(self) -> str:
        kept = {k: v for k, v in self.config.items() if k not in RESUMABLE_OPTIONS}
        return sha256_json({"format": self.format, "parent": self.parent_digest, "config": kept,
                            "denoiser": self.denoiser, "family": self.family})  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "resume_key": self.resume_key, "config": self.config,
                "parent_digest": self.parent_digest, "denoiser": self.denoiser, "family": self.family,
                "format": self.format}  # fmt: skip


@dataclass
class ResumePlan:
    """The checkpoint this run continues (None: step 0) and what it recorded."""

    path: Path | None = None
    step: int = 0
    recorded: dict[str, Any] = field(default_factory=dict)  # the checkpoint's `run`

    @property
    def config(self) -> dict[str, Any]:
        return self.recorded.get("config", {})

    def summary(self, current: dict[str, Any]) -> dict[str, Any]:
        """For the train manifest: the checkpoint, its step, and the options that changed on resume ([old, new])."""
        changed = {k: [self.config.get(k), current.get(k)] for k in RESUMABLE_OPTIONS
                   if self.config.get(k) != current.get(k)}  # fmt: skip
        return {"checkpoint": self.path.name if self.path else None, "step": self.step, "changed": changed}


def _short(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def differences(recorded: dict[str, Any], run: RunRecord) -> str:
    """Why a checkpoint's run is not this run, in words ("learning_rate changed 0.0001 -> 0.0002")."""
    if not recorded.get("resume_key"):
        return "it records no train key (it was written by an older st)"
    if recorded.get("parent_digest") != run.parent_digest:
        return (f"the cache changed (digest {str(recorded.get('parent_digest'))[:12]} -> {run.parent_digest[:12]}: "
                "captions, images or cache options were edited)")  # fmt: skip
    old, new = recorded.get("config", {}), run.config
    changed = [f"{k} changed {_short(old.get(k))} -> {_short(new.get(k))}" for k in sorted(set(old) | set(new))
               if k not in RESUMABLE_OPTIONS and old.get(k) != new.get(k)]  # fmt: skip
    if changed:
        return ", ".join(changed)
    if recorded.get("family") != run.family or recorded.get("denoiser") != run.denoiser:
        return "the base model's denoiser changed"
    return f"it was written by train format {recorded.get('format')}, this st writes {run.format}"


def recorded_run(path: Path) -> dict[str, Any]:
    """The `run` a checkpoint's manifest records ({} when unreadable; the full check happens when it is loaded)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(manifest, dict) or manifest.get("schema") != CHECKPOINT_SCHEMA:
        return {}
    run = manifest.get("run")
    return run if isinstance(run, dict) else {}


def _step_of(path: Path) -> int:
    try:
        return int(json.loads((path / "manifest.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ResumeMismatch(f"checkpoint {path} has no readable step in its manifest.json") from None


def choose_checkpoint(value: str | None, checkpoints_dir: Path, base_dir: Path, run: RunRecord, *,
                      strict: bool = False) -> ResumePlan:  # fmt: skip
    """The checkpoint `resume_from_checkpoint` lets this run continue, or an empty plan (start at step 0)."""
    if not value:
        return ResumePlan()
    if value != "latest":
        path = resolve_resume(value, checkpoints_dir, base_dir)
        recorded = recorded_run(path)
        if recorded.get("resume_key") != run.resume_key:
            raise ResumeMismatch(f"resume_from_checkpoint {value!r}: {path} belongs to another run: "
                                 f"{differences(recorded, run)}; restore those options, or remove "
                                 "resume_from_checkpoint to start from step 0")  # fmt: skip
        return ResumePlan(path, _step_of(path), recorded)
    found = list_checkpoints(checkpoints_dir)
    if not found:
        log.info("resume_from_checkpoint = latest: no checkpoint under %s yet; starting at step 0", checkpoints_dir)
        return ResumePlan()
    runs = {path: recorded_run(path) for _, path in found}
    mine = [(step, path) for step, path in found if runs[path].get("resume_key") == run.resume_key]
    if mine:
        step, path = mine[-1]
        return ResumePlan(path, step, runs[path])
    newest = found[-1][1]
    reason = f"not resuming from {newest.name}: {differences(runs[newest], run)}"
    if strict:
        raise ResumeMismatch(f"{reason} (--resume-strict); restore those options to continue that run, or drop "
                             "--resume-strict to start from step 0")  # fmt: skip
    log.info("train: %s; starting from step 0", reason)
    return ResumePlan()


def other_runs(checkpoints_dir: Path, run: RunRecord) -> list[Path]:
    """Checkpoints in this output folder that another run wrote (never resumed from, never listed as this run's)."""
    return [path for _, path in list_checkpoints(checkpoints_dir)
            if recorded_run(path).get("resume_key") != run.resume_key]  # fmt: skip


def note_other_runs(checkpoints_dir: Path, run: RunRecord) -> None:
    """One log line about the checkpoints of other runs in the output folder, saying what happens to them."""
    foreign = other_runs(checkpoints_dir, run)
    if foreign:
        log.info("train: %s in %s %s from another run (other options or cache): never resumed from, left in place "
                 "until a checkpoint of this run at the same step replaces it", ", ".join(p.name for p in foreign),
                 checkpoints_dir, "is" if len(foreign) == 1 else "are")  # fmt: skip


def check_target(plan: ResumePlan, total_steps: int, value: str | None) -> None:
    """Refuse a checkpoint past this run's last step; say so when it is exactly at it (nothing left to train)."""
    if plan.path is None:
        return
    if plan.step > total_steps:
        raise ResumeMismatch(
            f"{plan.path.name} is at step {plan.step}, past this run's target of {total_steps} steps; raise "
            f"max_train_steps to {plan.step} or more, name an earlier checkpoint (resume_from_checkpoint = "
            '"checkpoint-N"), or remove resume_from_checkpoint to start from step 0'
        )
    if plan.step == total_steps:
        log.info("train: %s is already at the target step %d (resume_from_checkpoint = %s): its weights become the "
                 "final weights; this run trains 0 steps", plan.path.name, total_steps, value)  # fmt: skip
