"""`st train`: a cache manifest -> trained weights, checkpoints, metrics and validation images."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cache_reader import CacheReader
from ..config import TRAIN, LoadedConfig
from ..distributed import rank_and_world
from ..errors import ConfigError, LineageError
from ..families import check_model_family, get_family, wan_i2v, without_source
from ..families.identity import denoiser_identity as trained_denoiser_identity
from ..families.identity import denoiser_source, model_identity, model_sources
from ..hashing import sha256_json
from ..lineage import check_parent_chain, forced_record, verify_outputs
from ..log import get_logger
from ..lycoris_settings import key_content as lycoris_key_content
from ..manifest import MANIFEST_NAME, output_entry, provenance
from ..ownership import OutputClaim, claim_output
from ..precision import default_bf16_on_device
from ..prompts import texts_to_encode, validation_prompts
from ..quantise import check as check_precision
from ..quantise import key_content as quantisation_key_content
from ..runner import StageResult, StageRun
from . import shard_cache
from .assistant import key_content as assistant_key_content
from .validation_adapters import check as check_validation_adapters
from .checkpoint import list_checkpoints
from .control import family_for_run
from .offload import check_config as check_memory
from .remote_resume import fetch_checkpoint
from .resume import TRAINING_LENGTH, ResumePlan, RunRecord, check_target, choose_checkpoint, note_other_runs, other_runs

if TYPE_CHECKING:
    from .trainer import RunState

log = get_logger("train")

SCHEMA = "st.train/1"
SCHEMA_VERSION = 1
FORMAT_VERSION = 1


@dataclass(kw_only=True)
class TrainResult(StageResult):
    interrupted: str | None = None  # the signal that stopped the run (a checkpoint was saved)


def check_lineage(cache: dict[str, Any], family_name: str, model: dict[str, Any], cache_path: Path) -> None:
    """Refuse a cache made with another family, VAE or text encoder than the model given."""
    if cache["family"] != family_name:
        raise LineageError(f"{cache_path} was cached for model_family {cache['family']!r}, but this run trains "
                           f"{family_name!r}; re-run `st cache` with this model")  # fmt: skip
    checks = [("VAE", cache["model"]["vae"], model["vae"])]
    checks += [(f"text encoder {i + 1}", a, b) for i, (a, b) in enumerate(zip(cache["model"]["text_encoders"],
                                                                             model["text_encoders"]))]  # fmt: skip
    # Wan 2.1 i2v / FLF2V caches store CLIP image embeddings (a cache written before they did has no identity of them)
    checks += [(f"CLIP {part.subfolder}", a, b) for part, a, b in zip(wan_i2v.CLIP_PARTS,
                                                                       cache["model"].get("image_encoder") or (),
                                                                       model.get("image_encoder") or ())]  # fmt: skip
    for what, cached, given in checks:
        if without_source(cached) != without_source(given):
            raise LineageError(
                f"the {what} of {cache_path} ({cached.get('source')}, weights {str(cached.get('weights_sha256'))[:12]}) "
                f"differs from the model given ({given.get('source')}, weights {str(given.get('weights_sha256'))[:12]}); "
                "re-run `st cache` with this model, or point pretrained_model_name_or_path at the cached one"
            )


def refiner_defaults(loaded: LoadedConfig, family, source: str) -> LoadedConfig:
    """An SDXL refiner trains the refiner's timestep range: SimpleTuner turns `refiner_training` on when it loads a
    refiner, and so does st (before the key, so the manifest records what trained)."""
    from ..families.sdxl import REFINER_PIPELINE

    config = loaded.config
    if config.refiner_training or family.for_run(config.model_flavour, source).pipeline_class != REFINER_PIPELINE:
        return loaded
    log.info("train: an SDXL refiner: refiner_training set to true, as SimpleTuner sets it for refiner models")
    return dataclasses.replace(loaded, config=dataclasses.replace(config, refiner_training=True))


def run_train(loaded: LoadedConfig, input_path: Path, out_dir: Path, *, force: bool = False,
              resume_strict: bool = False) -> TrainResult:  # fmt: skip
    """Train from a cache output into `out_dir`, or report that it is up to date; the folder is held for the run.

    `resume_strict`: when `resume_from_checkpoint = "latest"` finds only checkpoints of another run, exit 2 instead
    of starting from step 0."""
    with claim_output(out_dir, TRAIN, inputs=[input_path]) as claim:
        return _run_train(claim, loaded, input_path, out_dir, force=force, resume_strict=resume_strict)


def _run_train(claim: OutputClaim, loaded: LoadedConfig, input_path: Path, out_dir: Path, *,
               force: bool, resume_strict: bool = False) -> TrainResult:  # fmt: skip
    started = time.time()
    loaded = default_bf16_on_device(loaded, "mixed_precision", "no")
    config = loaded.config
    check_precision(config, base_dir=loaded.base_dir)  # a preset this machine cannot run stops here, before any work
    check_memory(config)  # so do memory options that cannot work together or on this device
    from .optim import check as check_optimizer  # (imports torch)

    check_optimizer(config)  # and an optimizer this machine or its settings cannot run
    out_dir = Path(out_dir)
    reader = CacheReader(input_path)
    cache = reader.manifest
    # The cache's files (shards only by size here: the loader hash-checks each shard as it reads it), then whether
    # the prepare output the cache was built from, if it is still on disk, has changed since.
    fetched = {s["path"] for s in cache["shards"]} if shard_cache.attached(reader.root) else set()  # from S3, later
    verify_outputs({**cache, "outputs": [o for o in cache["outputs"] if o["path"] not in fetched]}, reader.root,
                   reader.manifest_path, writer="cache", size_only=[s["path"] for s in cache["shards"]])  # fmt: skip
    forced = check_parent_chain(cache, reader.manifest_path, expect_stage="prepare", rerun="st cache", force=force)
    sources = model_sources(loaded)
    family = get_family(config.model_family)
    check_validation_adapters(config, loaded.base_dir, family)  # a missing adapter file stops before any work
    source, vae_source = sources.model, sources.vae
    loaded = refiner_defaults(loaded, family, source)
    config = loaded.config
    model = model_identity(family, sources)
    check_lineage(cache, family.name, model, reader.manifest_path)
    check_model_family(family, source)
    denoiser_identity = trained_denoiser_identity(family, source, denoiser_source(config, family, source, loaded.base_dir),
                                                  config.revision)  # the override's, when one is set

    prompts = [] if config.validation_disable else validation_prompts(
        config.validation_prompt, config.user_prompt_library, loaded.resolve_path)
    if config.validation_using_datasets and not config.validation_disable:  # dataset images replace the prompts
        from .validation_datasets import collect

        prompts = collect(loaded, family, reader.root, cache, reader.shared_embeds())
    own_embeds = config.validation_using_datasets  # dataset inputs bring their captions' cached embeddings
    needed = texts_to_encode([] if own_embeds else prompts, config.validation_negative_prompt) if prompts else []
    cached_texts = set(cache["embeds"]["prompts"].values())
    missing = [t for t in needed if t not in cached_texts]
    if missing:
        raise ConfigError(f"validation prompt {missing[0]!r} has no embeddings in {reader.manifest_path}: st cache "
                          "stores validation_prompt, validation_negative_prompt and user_prompt_library; set them "
                          "before running `st cache` (it re-encodes only the prompts)")  # fmt: skip

    stage_config = config.stage_keys(TRAIN)
    lycoris_settings = lycoris_key_content(config, loaded.base_dir)
    if lycoris_settings is not None:  # the file's settings, not its path: editing the file re-runs training
        stage_config["lycoris_config"] = lycoris_settings
    stage_config.update(quantisation_key_content(config, loaded.base_dir))
    stage_config.update(assistant_key_content(config, family.name, loaded.base_dir))  # flux schnell, z_image turbo
    # A flavour or model that trains another pipeline (Flux Kontext) changes the training: in the key, and only then,
    # so that other runs keep their keys.
    variant = family_for_run(family, config, source)
    if variant.pipeline_class != family.pipeline_class:
        stage_config["pipeline"] = variant.pipeline_class
    if variant.train_key_entries is not None:  # a Wan 2.2 T2V A14B stage: which it trains; Wan 2.1 FLF2V
        stage_config.update(variant.train_key_entries(variant))
    key = sha256_json({"format": FORMAT_VERSION, "parent": cache["digest"], "config": stage_config,
                       "denoiser": without_source(denoiser_identity), "family": family.name})  # fmt: skip
    stage_run = StageRun(TRAIN, SCHEMA_VERSION, out_dir, key, stage_config, force=force)
    run = RunRecord(key=key, config=stage_config, parent_digest=cache["digest"],
                    denoiser=without_source(denoiser_identity), family=family.name, format=FORMAT_VERSION)  # fmt: skip
    if stage_run.up_to_date:
        return TrainResult(out_dir, stage_run.previous.manifest, up_to_date=True)
    reasons = stage_run.reasons()
    fetch_checkpoint(claim, out_dir, config.resume_from_checkpoint)  # an S3 output's, written on another machine
    plan = choose_checkpoint(config.resume_from_checkpoint, out_dir / "checkpoints", loaded.base_dir, run,
                             strict=resume_strict)  # fmt: skip
    resuming = plan.path is not None
    note_other_runs(out_dir / "checkpoints", run)
    claim.will_write(MANIFEST_NAME, "metrics.jsonl", folders=("final", "validation", "logs"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resuming:
        # A fresh run leaves no manifest, images or final weights of an earlier run behind (files st did not write stay).
        claim.remove(out_dir / MANIFEST_NAME)
        for stale in ("validation", "final"):
            claim.remove(out_dir / stale)

    from .. import notify
    from .trainer import Trainer

    notify.check_hooks(config)
    if config.controlnet:
        from .controlnet import check as check_controlnet

        check_controlnet(config, family, cache)
    if config.push_to_hub or config.push_checkpoints_to_hub:
        from ..remote import check_targets

        check_targets(config, loaded.base_dir, storage=False)  # fail now, not after hours of training

    shared = reader.shared_embeds()
    by_text = {text: shared[k] for k, text in cache["embeds"]["prompts"].items()}
    rank, _ = rank_and_world()  # the notifier sends from the main process only
    with notify.Notifier.from_config(config, loaded.base_dir, stage="train", main_process=rank == 0) as notifier:
        trainer = Trainer(config=config, family=family, source=source, vae_source=vae_source, cache_root=reader.root,
                          cache_manifest=cache, shared_embeds=shared, prompts_by_text=by_text, out_dir=out_dir,
                          base_dir=loaded.base_dir, resume_from=plan.path, run_record=run.as_dict(),
                          validation_prompts=prompts, notifier=notifier)  # fmt: skip
        check_target(plan, trainer.total_steps, config.resume_from_checkpoint)
        tracker = _tracker(loaded, out_dir, family.name, stage_config, plan) if trainer.is_main else None
        notifier.start({"family": family.name, "model_type": config.model_type,
                        "max_train_steps": trainer.total_steps, "output": str(out_dir)})  # fmt: skip
        state = _train(trainer, tracker, notifier)
        if state.interrupted:
            notifier.send("interrupted", f"training stopped by {state.interrupted} at step {state.step}",
                          step=state.step)  # fmt: skip
            return TrainResult(out_dir, None, False, interrupted=state.interrupted, reasons=reasons)
        if not trainer.is_main:
            trainer.accelerator.wait_for_everyone()
            return TrainResult(out_dir, None, False, reasons=reasons)
        final = _install_final(claim, trainer, out_dir)
        doc = _document(claim, trainer, state, out_dir, run=run, plan=plan, key=key, stage_config=stage_config,
                        cache=cache, model={"denoiser": denoiser_identity, **model})  # fmt: skip
        doc["provenance"] = provenance(started, time.time(), cache_path=str(reader.manifest_path.absolute()),
                                       processes=trainer.world, device=str(trainer.device),
                                       **forced_record(forced))  # fmt: skip
        for upload in trainer.uploads:
            upload.wait()
        doc = stage_run.write_manifest(doc)
        notifier.finished({"global_step": state.step, "final_loss": state.last_loss, "output": str(final)})
    trainer.accelerator.wait_for_everyone()
    log.debug("train: %d steps, final loss %s -> %s", state.step, f"{state.last_loss:.4f}" if state.last_loss else "-",
             final)  # fmt: skip
    return TrainResult(out_dir, doc, False, reasons=reasons)


def _tracker(loaded: LoadedConfig, out_dir: Path, family: str, stage_config: dict[str, Any], plan: ResumePlan):
    """metrics.jsonl and the tracker `report_to` names (main process only), trimmed to the resumed step."""
    from .tracking import Tracker

    config = loaded.config
    logging_dir = Path(config.logging_dir) if config.logging_dir else out_dir / "logs"
    if not logging_dir.is_absolute() and config.logging_dir:
        logging_dir = loaded.base_dir / logging_dir
    run_name = config.tracker_run_name or f"{family}-{config.model_type}"
    return Tracker(out_dir, report_to=config.report_to, logging_dir=logging_dir, project=config.tracker_project_name,
                   run_name=run_name, config=stage_config,
                   resume_step=plan.step if plan.path is not None else -1)  # fmt: skip


def _train(trainer, tracker, notifier) -> RunState:
    """`trainer.run`; the hooks it started end and the tracker closes however it stops, and an error is reported."""
    from .. import notify

    try:
        return trainer.run(tracker)
    except BaseException as exc:
        notify.wait_for_hooks(kill=isinstance(exc, KeyboardInterrupt))
        notifier.error(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        notify.wait_for_hooks()  # post_checkpoint_script runs in the background; none outlives the run
        if tracker is not None:
            tracker.close()


def _install_final(claim: OutputClaim, trainer, out_dir: Path) -> Path:
    """The trained weights (and EMA weights) written to final.tmp, then installed as `final`."""
    from ..tensorfile import save_tensors
    from .adapters import save_final

    final_tmp = out_dir / "final.tmp"
    claim.remove(final_tmp)
    if trainer.control is not None:
        from .controlnet import save_final as save_controlnet

        final_tmp.mkdir(parents=True)
        save_controlnet(trainer.unwrapped, final_tmp)
    else:
        save_final(trainer.unwrapped, trainer.adapter_options, trainer.family, final_tmp)
    if trainer.ema is not None:
        save_tensors(final_tmp / "ema_weights.safetensors", trainer.ema.state())
    final = out_dir / "final"
    claim.install(final_tmp, final)
    return final


def _document(claim: OutputClaim, trainer, state: RunState, out_dir: Path, *, run: RunRecord, plan: ResumePlan,
              key: str, stage_config: dict[str, Any], cache: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """The train manifest, without provenance: outputs, this run's checkpoints, metrics and what was trained."""
    config = trainer.config
    final = out_dir / "final"
    outputs = [output_entry(out_dir, p) for p in sorted(final.rglob("*")) if p.is_file() and claim.owns(p)]
    outputs.append(output_entry(out_dir, out_dir / "metrics.jsonl"))
    validation = out_dir / "validation"
    if validation.is_dir():
        renders = sorted(p for p in validation.rglob("*") if p.suffix in (".png", ".mp4"))  # MP4: validation videos
        outputs += [output_entry(out_dir, p) for p in renders if claim.owns(p)]
    checkpoints = []
    foreign = set(other_runs(out_dir / "checkpoints", run))
    for step, path in list_checkpoints(out_dir / "checkpoints"):
        if path in foreign:  # another run's weights: never described by this manifest
            continue
        entry = output_entry(out_dir, path / "manifest.json")
        checkpoints.append({"path": path.relative_to(out_dir).as_posix(), "step": step,
                            "manifest_sha256": entry["sha256"]})  # fmt: skip
    return {
        "schema": SCHEMA,
        "stage": TRAIN,
        "key": key,
        "parent": {"stage": "cache", "digest": cache["digest"]},
        "config": _trained_config(stage_config, plan, state.step),
        "family": trainer.family.name,
        "model_type": config.model_type,
        "model": model,
        "final": {"path": "final", "format": _final_format(config),
                  "files": [o for o in outputs if o["path"].startswith("final/")]},  # fmt: skip
        "checkpoints": checkpoints,
        "metrics": {"steps": state.step, "final_loss": state.last_loss, "first_eval_loss": state.first_eval,
                    "final_eval_loss": state.last_eval,
                    **({"final_clip_score": state.last_clip} if state.last_clip is not None else {})},  # fmt: skip
        "validations": state.validations,
        "outputs": outputs,
        "stats": {"steps": state.step, "samples": cache["stats"]["samples"], "batch_size": trainer.samples_per_step,
                  "steps_this_run": state.step - plan.step, "denoiser": _denoiser_record(trainer),
                  "memory": trainer.memory.record(),
                  "tread": trainer.tread.record() if trainer.tread is not None else None,
                  "resumed_from": plan.summary(stage_config) if plan.path is not None else None},  # fmt: skip
    }


def _final_format(config) -> str:
    """What final/ holds: a LoRA file, a diffusers denoiser folder, or a diffusers ControlNet folder."""
    if config.controlnet:
        return "controlnet"
    return "lora" if config.model_type == "lora" else "diffusers"


def _denoiser_record(trainer) -> dict[str, Any]:
    """How the frozen denoiser was held while training: quantisation preset, dtype and parameter bytes."""
    return {**trainer.base_precision.record(), "parameter_bytes": trainer.denoiser_bytes}


def _trained_config(stage_config: dict[str, Any], plan: ResumePlan, final_step: int) -> dict[str, Any]:
    """The options the final weights were trained with. A run that trained 0 steps after resuming hands on the
    checkpoint's weights, so it records how long the checkpoint's run meant to train, not its own target."""
    if plan.path is None or final_step != plan.step:
        return stage_config
    return {**stage_config, **{k: plan.config[k] for k in TRAINING_LENGTH if k in plan.config}}
