"""`st publish`: a train output (or one of its checkpoints) -> weights, model card, lineage, and uploads.

Order of work: read and verify the train manifest (and checkpoint), find the dataset manifests behind it, compute the
stage key and stop if the output is up to date; build every file in `.publish.tmp/`, move them into place, drop the
previous run's leftovers, write the manifest last; then hand the folder to the upload targets, whose records go into
the manifest's provenance (outside the digest).
"""

from __future__ import annotations

import dataclasses

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import PUBLISH, LoadedConfig
from ..errors import ConfigError, NotSupportedError
from ..families import Family, check_model_family, get_family
from ..families.lora import LORA_WEIGHT_NAME
from ..fsutil import fsync_dir
from ..hashing import sha256_json
from ..lineage import forced_record
from ..log import get_logger
from ..manifest import MANIFEST_NAME, output_entry, provenance
from ..ownership import OutputClaim, claim_output
from ..runner import StageResult, StageRun
from ..prompts import validation_prompts
from . import card as cards
from . import controlnet
from .options import PublishOptions
from .lineage import Inputs, lineage_doc, read_inputs

log = get_logger("publish")

SCHEMA = "st.publish/1"
SCHEMA_VERSION = 1
FORMAT_VERSION = 1
STAGING = ".publish.tmp"
LINEAGE_NAME = "lineage.json"
CARD_NAME = "README.md"
_IMAGE = re.compile(r"(.+)-(\d+)x(\d+)-(\d+)\.png")


@dataclass(kw_only=True)
class PublishResult(StageResult):
    uploads: list[dict[str, Any]] = field(default_factory=list)  # one record per upload target


def _source(inputs: Inputs) -> dict[str, Any]:
    ckpt = inputs.checkpoint
    if ckpt is None:
        return {"kind": "final", "path": "final", "step": inputs.step, "manifest_sha256": None}
    return {"kind": "checkpoint", "path": ckpt.rel, "step": ckpt.step, "manifest_sha256": ckpt.manifest_sha256}


def _prompt_texts(options: PublishOptions, resolve: Callable[[str], Path],
                  train_config: dict[str, Any]) -> dict[str, str]:  # fmt: skip
    """Validation image name -> prompt text (validation_prompt, and user_prompt_library's entries if readable)."""
    library = train_config.get("user_prompt_library") or options.user_prompt_library
    try:
        prompts = validation_prompts(train_config.get("validation_prompt"), library, resolve)
    except ConfigError as exc:
        log.warning("publish: %s; images are captioned by file name", exc)
        prompts = validation_prompts(train_config.get("validation_prompt"), None, resolve)
    return {prompt.name: prompt.text for prompt in prompts}


def _validation_images(inputs: Inputs) -> list[str]:
    """Train output paths of the validation PNGs that show the published weights (the last step's)."""
    labels = [v for v in inputs.train.get("validations") or [] if v != "base"]
    label = f"step-{inputs.step}" if inputs.checkpoint else (labels[-1] if labels else None)
    if label is None or label not in labels:
        return []
    paths = [o["path"] for o in inputs.train["outputs"]]
    for folder in (label, f"{label}-ema"):
        found = sorted(p for p in paths if p.startswith(f"validation/{folder}/") and p.endswith(".png"))
        if found:
            return found
    return []


def _dataset(inputs: Inputs) -> tuple[list[dict[str, Any]] | None, str | None]:
    """Per dataset: samples and buckets (as cached), caption strategy and repeats; and the resolution setting."""
    if inputs.cache is None:
        return None, None
    prepared = {d["id"]: d for d in (inputs.prepare or {}).get("datasets", [])}
    rows = [{**d, "caption_strategy": prepared.get(d["id"], {}).get("caption_strategy")}
            for d in inputs.cache["datasets"]]
    sizes = sorted({f"{cards.number(d['resolution'])} ({d.get('resolution_type')})" for d in prepared.values()
                    if d.get("resolution") is not None})
    return rows, ", ".join(sizes) or None


def _key(inputs: Inputs, stage_config: dict[str, Any], prompts: dict[str, str]) -> str:
    return sha256_json({
        "format": FORMAT_VERSION, "parent": inputs.train["digest"], "source": _source(inputs), "config": stage_config,
        "dataset": [inputs.cache and inputs.cache["digest"], inputs.prepare and inputs.prepare["digest"]],
        "prompts": prompts,
    })  # fmt: skip


def _weights(inputs: Inputs, family: Family, options: PublishOptions,
             stage: Path) -> tuple[list[tuple[str, str]], str | None]:  # fmt: skip
    """Write the weight files into `stage`; returns [(relative path, format)] and the ComfyUI file's name."""
    from .weights import comfyui_name, write_comfyui, write_ema, write_lora, write_singlora

    found: list[tuple[str, str]] = []
    comfy = None
    if controlnet.is_controlnet(inputs):  # the folder is the diffusers ControlNet
        found += controlnet.write(inputs, options.lora_format, stage)
    elif inputs.train["model_type"] == "lora":
        lora_file = write_lora(inputs, family, stage)
        found.append((LORA_WEIGHT_NAME, "diffusers-lora"))
        singlora = write_singlora(inputs, family, stage)
        if singlora is not None:  # peft_lora_mode singlora: the SingLoRA layers' own file, as SimpleTuner saves it
            found.append((singlora.name, "singlora"))
        if options.lora_format == "comfyui":
            from .model_folder import base_denoiser_config, base_denoiser_weights

            comfy = comfyui_name(options.hub_model_id)
            write_comfyui(lora_file, family, stage / comfy, base_denoiser_config(inputs.train, family),
                          base_denoiser_weights(inputs.train, family))  # fmt: skip
            found.append((comfy, "comfyui-lora"))
    else:
        from .model_folder import assemble

        if options.lora_format == "comfyui":
            log.info("publish: lora_format comfyui applies to LoRA runs; the full model is a diffusers folder")
        assemble(inputs, family, stage / "model")
        sub = stage / "model" / family.denoiser.subfolder
        found += [(p.relative_to(stage).as_posix(), "diffusers-model") for p in sorted(sub.glob("*.safetensors"))]
    ema = write_ema(inputs, stage)
    if ema is not None:
        found.append((ema.name, "ema"))
    return found, comfy


def _card(inputs: Inputs, family: Family, options: PublishOptions, stage: Path, prompts: dict[str, str],
          comfy: str | None, ema: bool) -> None:  # fmt: skip
    """Copy the validation images into assets/ and write README.md."""
    train_config = inputs.train["config"]
    widget, grid = [], None
    for rel in _validation_images(inputs):
        name = Path(rel).name
        (stage / "assets").mkdir(exist_ok=True)
        shutil.copyfile(inputs.train_dir / rel, stage / "assets" / name)
        video = inputs.train_dir / Path(rel).with_suffix(".mp4")  # a validation video beside its frame grid
        if video.is_file():
            shutil.copyfile(video, stage / "assets" / video.name)
        if name == "grid.png":
            grid = "assets/grid.png"
            continue
        match = _IMAGE.fullmatch(name)
        text = prompts.get(match[1], match[1]) if match else Path(name).stem
        negative = train_config.get("validation_negative_prompt")
        widget.append({"text": text, "path": f"assets/{name}", "negative": negative})
    datasets, resolution = _dataset(inputs)
    content = cards.Card(family=family, train=inputs.train, step=inputs.step,
                         base_model=cards.base_model_name(inputs.train["model"]["denoiser"]["source"]),
                         options=options, widget=widget,
                         grid=grid, datasets=datasets, dataset_notes=inputs.notes, resolution=resolution,
                         checkpoint=inputs.checkpoint.rel if inputs.checkpoint else None, comfyui=comfy,
                         ema=ema)  # fmt: skip
    render = controlnet.render if controlnet.is_controlnet(inputs) else cards.render
    (stage / CARD_NAME).write_text(render(content), encoding="utf-8")


def _commit(claim: OutputClaim, stage: Path, out_dir: Path, previous: dict[str, Any] | None) -> list[str]:
    """Move every staged file to its final name; remove files of the previous output that are no longer produced."""
    rels = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
    claim.will_write(*rels)  # before any move: a file st did not write at one of these names stops the run here
    for rel in rels:
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(stage / rel, target)
    stale = [o["path"] for o in (previous or {}).get("outputs", []) if o["path"] not in set(rels)]
    for rel in stale:
        claim.remove(out_dir / rel)
        parent = (out_dir / rel).parent
        while parent != out_dir and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    claim.remove(stage)
    fsync_dir(out_dir)
    return rels


def _upload(run: StageRun, loaded: LoadedConfig, doc: dict[str, Any]) -> tuple[dict[str, Any], list[dict]]:
    """Send the folder to the configured targets unless this exact target set already received this output."""
    out_dir = run.out_dir
    fingerprint = PublishOptions.from_config(loaded.config).targets_fingerprint()
    recorded = doc.get("provenance", {}).get("uploads") or {}
    if fingerprint is None:
        return doc, []
    if recorded.get("targets") == fingerprint:
        log.info("publish: already uploaded to these targets")
        return doc, recorded.get("records", [])
    try:
        from ..remote import publish_to_targets
    except ImportError as exc:
        log.warning("publish: uploading is not available in this build (%s); the folder %s is complete", exc, out_dir)
        return doc, []
    records = list(publish_to_targets(loaded.config, out_dir, loaded.base_dir) or [])
    doc = dict(doc)
    doc["provenance"] = {**doc["provenance"], "uploads": {"targets": fingerprint, "records": records}}
    return run.write_manifest(doc), records


def run_publish(loaded: LoadedConfig, input_path: Path, out_dir: Path, *, force: bool = False) -> PublishResult:
    """Publish a train output (or checkpoint) into `out_dir`, or report that it is up to date; then upload. The folder
    is held for the whole run."""
    with claim_output(out_dir, PUBLISH, inputs=[input_path]) as claim:
        return _run_publish(claim, loaded, input_path, out_dir, force=force)


def _run_publish(claim: OutputClaim, loaded: LoadedConfig, input_path: Path, out_dir: Path, *,
                 force: bool) -> PublishResult:  # fmt: skip
    started = time.time()
    config = loaded.config
    options = PublishOptions.from_config(config)
    out_dir = Path(out_dir)
    inputs = read_inputs(Path(input_path), force=force)
    family = get_family(inputs.train["family"])
    trained_pipeline = inputs.train["config"].get("pipeline")  # a flavour that trains another pipeline (Kontext)
    if trained_pipeline:
        family = dataclasses.replace(family, pipeline_class=trained_pipeline)
    if options.lora_format == "comfyui" and trained_pipeline == "FluxControlPipeline":
        raise NotSupportedError("lora_format comfyui for a `control: true` LoRA: its input layer takes twice the "
                                "channels, which ComfyUI applies only with a reshape entry st does not write; set "
                                "lora_format diffusers (FluxControlPipeline.load_lora_weights reads it)")  # fmt: skip
    # The base model, where it is still on disk (a LoRA publish does not need it; a full fine-tune does).
    check_model_family(family, inputs.train["model"]["denoiser"].get("source"))
    stage_config = config.stage_keys(PUBLISH)
    prompts = _prompt_texts(options, loaded.resolve_path, inputs.train["config"])
    key = _key(inputs, stage_config, prompts)
    run = StageRun(PUBLISH, SCHEMA_VERSION, out_dir, key, stage_config, force=force)
    if run.up_to_date:
        doc, records = _upload(run, loaded, run.previous.manifest)
        return PublishResult(out_dir, doc, True, uploads=records)
    previous = run.previous
    reasons = run.reasons()
    claim.will_write(MANIFEST_NAME, CARD_NAME, LINEAGE_NAME, folders=(STAGING,))
    out_dir.mkdir(parents=True, exist_ok=True)
    claim.remove(out_dir / MANIFEST_NAME)
    stage = out_dir / STAGING
    claim.remove(stage)
    stage.mkdir()

    weights, comfy = _weights(inputs, family, options, stage)
    _card(inputs, family, options, stage, prompts, comfy, any(f == "ema" for _, f in weights))
    described = [{**output_entry(stage, stage / rel), "format": fmt} for rel, fmt in weights]
    lineage = lineage_doc(inputs, described)
    (stage / LINEAGE_NAME).write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    rels = _commit(claim, stage, out_dir, previous.manifest)

    outputs = [output_entry(out_dir, out_dir / rel) for rel in rels]
    doc = {
        "schema": SCHEMA,
        "stage": PUBLISH,
        "key": key,
        "parent": {"stage": "train", "digest": inputs.train["digest"]},
        "config": stage_config,
        "family": family.name,
        "model_type": inputs.train["model_type"],
        "source": _source(inputs),
        "weights": described,
        "dataset": {"cache": lineage["manifests"]["cache"]["digest"],
                    "prepare": lineage["manifests"]["prepare"]["digest"], "summary": inputs.cache is not None},
        "outputs": outputs,
        "stats": {"files": len(outputs), "bytes": sum(o["bytes"] for o in outputs), "step": inputs.step},
    }
    doc["provenance"] = provenance(started, time.time(), train_path=str(inputs.train_dir),
                                   **forced_record(inputs.forced))  # fmt: skip
    doc = run.write_manifest(doc)
    log.info("publish: %d file(s) from %s -> %s", len(outputs), _source(inputs)["path"], out_dir)
    doc, records = _upload(run, loaded, doc)
    return PublishResult(out_dir, doc, False, reasons=reasons, uploads=records)
