"""README.md: a Hugging Face model card with YAML front matter, training settings, the dataset summary, validation
images and a diffusers snippet that loads what was published."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..families import Family
from ..singlora_format import SINGLORA_WEIGHT_NAME
from .options import PublishOptions

LOCAL_FOLDER = "path/to/this/folder"


@dataclass
class Card:
    """Everything the card says, gathered by the stage."""

    family: Family
    train: dict[str, Any]
    step: int
    base_model: str
    options: PublishOptions
    widget: list[dict[str, Any]] = field(default_factory=list)  # {"text", "path", "negative"}
    grid: str | None = None
    datasets: list[dict[str, Any]] | None = None
    dataset_notes: list[str] = field(default_factory=list)
    resolution: str | None = None
    checkpoint: str | None = None
    comfyui: str | None = None
    ema: bool = False


# --------------------------------------------------------------------------------------------------------- YAML


def _scalar(value: Any) -> str:
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid YAML double-quoted scalar


def yaml_lines(value: Any, indent: int = 0) -> list[str]:
    """Block-style YAML for dicts, lists and scalars (keys are plain identifiers)."""
    pad = "  " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{key}:")
                lines += yaml_lines(item, indent + 1)
            else:
                lines.append(f"{pad}{key}: {_scalar(item) if not isinstance(item, (dict, list)) else json.dumps(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)) and item:
                sub = yaml_lines(item, indent + 1)
                sub[0] = f"{pad}- {sub[0].lstrip()}"
                lines += sub
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    else:
        lines.append(f"{pad}{_scalar(value)}")
    return lines


def front_matter(card: Card) -> dict[str, Any]:
    options, train = card.options, card.train
    task = "text-to-video" if card.family.video else "text-to-image"
    if card.family.video and card.family.pipeline_class in IMAGE_ARGUMENTS:  # Wan i2v: a video from a first frame
        task = "image-to-video"
    tags = [card.family.name, train["model_type"], task, "diffusers", "st"]
    if not options.model_card_safe_for_work:
        tags.append("not-for-all-audiences")
    data: dict[str, Any] = {"base_model": card.base_model, "license": options.license, "tags": tags,
                            "pipeline_tag": task, "inference": True}  # fmt: skip
    widget = []
    for item in card.widget:
        entry: dict[str, Any] = {"text": item["text"]}
        if item.get("negative"):
            entry["parameters"] = {"negative_prompt": item["negative"]}
        entry["output"] = {"url": item["path"]}
        widget.append(entry)
    if widget:
        data["widget"] = widget
    return data


# --------------------------------------------------------------------------------------------------------- body


def number(value: Any) -> str:
    """`8.0` -> "8", `0.01` -> "0.01"; anything else as str()."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _py(text: Any) -> str:
    """A Python string literal in double quotes (JSON string syntax is valid Python for these)."""
    return json.dumps(str(text), ensure_ascii=False)


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]


def _settings(card: Card) -> list[list[Any]]:
    config, train = card.train["config"], card.train
    rows: list[list[Any]] = [["family", card.family.name], ["model_type", train["model_type"]]]
    if train["model_type"] == "lora" and config.get("lora_type") == "lycoris":
        rows.append(["lora_type", "lycoris (its settings: the `lycoris_config` header entry of the weight file)"])
    elif train["model_type"] == "lora":
        rank = config.get("lora_rank")
        alpha = config.get("lora_alpha") if config.get("lora_alpha") is not None else rank
        rows.append(["lora_rank / lora_alpha", f"{rank} / {number(alpha)}"])
        if config.get("use_dora"):
            rows.append(["use_dora", True])
        if config.get("train_text_encoder"):
            rate = config.get("text_encoder_lr") or config.get("learning_rate")
            limit = config.get("text_encoder_limit")
            rows.append(["train_text_encoder", f"LoRA of the same rank, learning rate {rate}, first {limit} step(s)"])
        if card.family.name in ("flux", "chroma"):
            rows.append(["flux_lora_target", config.get("flux_lora_target")])
    warmup = config.get("lr_warmup_steps") or 0
    per, accum = config.get("train_batch_size") or 1, config.get("gradient_accumulation_steps") or 1
    total = train.get("stats", {}).get("batch_size", per * accum)
    processes = max(1, total // (per * accum))
    rows += [
        ["learning_rate", config.get("learning_rate")],
        ["lr_scheduler", f"{config.get('lr_scheduler')}" + (f" ({warmup} warmup steps)" if warmup else "")],
        ["optimizer", config.get("optimizer")],
        ["steps", card.step],
        ["batch size", f"{total} ({per} per process x {accum} accumulation step(s) x {processes} process(es))"],
        ["resolution", card.resolution or "unknown"],
        ["prediction_type", config.get("prediction_type") or card.family.prediction_type],
        ["mixed_precision", config.get("mixed_precision")],
        ["base_model_precision", config.get("base_model_precision") or "no_change"],
        ["seed", config.get("seed")],
    ]  # fmt: skip
    if config.get("use_ema"):
        rows.append(["use_ema", f"decay {config.get('ema_decay')}"])
    return rows


def _dataset(card: Card) -> list[str]:
    if not card.datasets:
        reason = "; ".join(card.dataset_notes) or "the cache and prepare manifests were not found"
        return [f"The dataset summary is unavailable: {reason}."]
    rows = []
    for ds in card.datasets:
        buckets = ", ".join(f"{b}: {n}" for b, n in ds["buckets"].items())
        rows.append([ds["id"], ds["samples"], buckets, ds.get("caption_strategy") or "unknown", ds.get("repeats", 0)])
    return _table(["dataset", "samples", "buckets (WxH: samples)", "caption strategy", "repeats"], rows)


def base_model_name(source: str) -> str:
    """How the card names the base model: a hub id as it is; a local folder or checkpoint by its name only (an
    absolute path says where it was on the training machine, which is nobody else's business and no use to them)."""
    path = Path(source)
    return path.name if path.is_absolute() or path.exists() else source


# The snippet runs where it is pasted: on the GPU when there is one, else on the CPU in fp32.
_DEVICE_LINES = ['device = "cuda" if torch.cuda.is_available() else "cpu"',
                 'dtype = torch.bfloat16 if device == "cuda" else torch.float32']


# Pipelines that render from an input image (the run's conditioning images): their keyword for it.
IMAGE_ARGUMENTS = {"FluxKontextPipeline": "image", "FluxControlPipeline": "control_image",
                   "WanImageToVideoPipeline": "image", "IFSuperResolutionPipeline": "image",
                   "QwenImageEditPipeline": "image", "QwenImageEditPlusPipeline": "image"}


def _skip_layers(config: dict) -> str:
    """SD3's skip-layer guidance as validation rendered it (SimpleTuner's card names the layers; st also names a
    start, stop or scale that differs from the pipeline's defaults, which are SimpleTuner's)."""
    layers = config.get("validation_guidance_skip_layers")
    if layers is None:
        return ""
    text = f", skip_guidance_layers={list(layers)}"
    for option, argument, default in (("validation_guidance_skip_layers_start", "skip_layer_guidance_start", 0.01),
                                      ("validation_guidance_skip_layers_stop", "skip_layer_guidance_stop", 0.2),
                                      ("validation_guidance_skip_scale", "skip_layer_guidance_scale", 2.8)):
        if config.get(option, default) != default:
            text += f", {argument}={config[option]}"
    return text


def snippet(card: Card) -> str:
    """A diffusers snippet that loads this publication (local folder, or `hub_model_id` when set)."""
    options, family = card.options, card.family
    config = card.train["config"]
    prompt = card.widget[0]["text"] if card.widget else (config.get("validation_prompt") or "a photo")
    image_argument = IMAGE_ARGUMENTS.get(family.pipeline_class)
    given = "" if image_argument is None else f"{image_argument}=condition, "
    # the run's other input images (Wan 2.1 FLF2V renders between a first and a last frame)
    images = family.snippet_images(card.train) if family.snippet_images is not None else []
    given += "".join(f"{keyword}={variable}, " for keyword, variable, _ in images)
    call = (f"image = pipe({_py(prompt)}, {given}num_inference_steps="
            f"{config.get('validation_num_inference_steps', 30)}, "
            f"guidance_scale={config.get('validation_guidance', 7.5)}{_skip_layers(config)}).images[0]")  # fmt: skip
    hub = options.hub_model_id
    single = Path(card.base_model).suffix == ".safetensors"
    # A pipeline chosen by the run (control: true loads a Flux base into FluxControlPipeline) is named, not guessed.
    named = single or not family.lora_loader or image_argument is not None
    cls = family.pipeline_class if named else "DiffusionPipeline"
    load = "from_single_file" if single else "from_pretrained"
    lines = ["import torch", f"from diffusers import {cls}", "", *_DEVICE_LINES]
    if card.train["model_type"] == "full":
        if hub:
            lines[2:2] = ["from huggingface_hub import snapshot_download"]
            lines += [f"folder = snapshot_download({_py(hub)})",
                      f'pipe = {cls}.from_pretrained(f"{{folder}}/model", torch_dtype=dtype).to(device)']
        else:
            lines += [f'pipe = {cls}.from_pretrained("{LOCAL_FOLDER}/model", torch_dtype=dtype).to(device)']
    elif config.get("lora_type") == "lycoris":
        lines = _lycoris_lines(card, cls, load)
    elif family.lora_loader:
        lines += [f'pipe = {cls}.{load}({_py(card.base_model)}, torch_dtype=dtype).to(device)',
                  f"pipe.load_lora_weights({_py(hub or LOCAL_FOLDER)}{_stage_arguments(card)})"]
    else:
        prefix = family.denoiser.subfolder
        weights = (f'hf_hub_download({_py(hub)}, "pytorch_lora_weights.safetensors")' if hub
                   else f'"{LOCAL_FOLDER}/pytorch_lora_weights.safetensors"')  # fmt: skip
        lines = ["import json", "", "import torch", f"from diffusers import {cls}",
                 "from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict",
                 "from safetensors import safe_open"]  # fmt: skip
        if hub:
            lines.append("from huggingface_hub import hf_hub_download")
        lines += ["", *_DEVICE_LINES, f'pipe = {cls}.{load}({_py(card.base_model)}, torch_dtype=dtype).to(device)',
                  f"with safe_open({weights}, framework=\"pt\") as f:",
                  '    options = json.loads(f.metadata()["lora_adapter_metadata"])',
                  f'    state = {{k.removeprefix("{prefix}."): f.get_tensor(k) for k in f.keys()}}',
                  f'config = LoraConfig(**{{k.removeprefix("{prefix}."): v for k, v in options.items()}})',
                  f"inject_adapter_in_model(config, pipe.{prefix})",
                  f"set_peft_model_state_dict(pipe.{prefix}, state)"]  # fmt: skip
    if image_argument is not None:  # the image the render starts from, like the run's conditioning images
        lines.insert(lines.index(f"from diffusers import {cls}") + 1, "from diffusers.utils import load_image")
        lines.append('condition = load_image("conditioning.png")  # an image like the conditioning images it was '
                     "trained on")  # fmt: skip
        lines += [f'{variable} = load_image("{variable}.png")  # {comment}' for _, variable, comment in images]
    if family.video:  # the frames of one video, saved as MP4
        frames = config.get("validation_num_video_frames") or 81
        lines.insert(lines.index(f"from diffusers import {cls}") + 1, "from diffusers.utils import export_to_video")
        lines += [call.replace("image = ", "video = ").replace(").images[0]", f", num_frames={frames}).frames[0]"),
                  f'export_to_video(video, "video.mp4", fps={_video_fps(config, family)})']  # fmt: skip
        return "\n".join(lines)
    lines += [call, 'image.save("image.png")']
    return "\n".join(lines)


def _stage_arguments(card: Card) -> str:
    """The family's extra `load_lora_weights` arguments for the run (a Wan 2.2 A14B low-noise stage's LoRA goes into
    `transformer_2`)."""
    hook = card.family.lora_load_arguments
    return "" if hook is None else hook(card.train)


def _video_fps(config: dict[str, Any], family: Any) -> str:
    """The frame rate the run's validation videos were written at: `framerate`, else the family's, else 16."""
    from ..video_settings import family_framerate

    return f"{family_framerate(config.get('framerate'), family.name) or 16:g}"


def _lycoris_lines(card: Card, cls: str, load: str) -> list[str]:
    """Loading a LyCORIS file: the lycoris-lora library wraps the pipeline's denoiser with the saved modules."""
    hub, prefix = card.options.hub_model_id, card.family.denoiser.subfolder
    weights = (f'hf_hub_download({_py(hub)}, "pytorch_lora_weights.safetensors")' if hub
               else f'"{LOCAL_FOLDER}/pytorch_lora_weights.safetensors"')  # fmt: skip
    lines = ["import torch", f"from diffusers import {cls}", "from lycoris import create_lycoris_from_weights"]
    if hub:
        lines.append("from huggingface_hub import hf_hub_download")
    return lines + ["", *_DEVICE_LINES, f"pipe = {cls}.{load}({_py(card.base_model)}, torch_dtype=dtype).to(device)",
                    f"network, _ = create_lycoris_from_weights(1.0, {weights}, pipe.{prefix})",
                    "network.apply_to()  # the multiplier (1.0) is the adapter's strength",
                    "network.to(device, dtype=dtype)"]  # fmt: skip


def _quantised_base(train: dict[str, Any]) -> str:
    """How the frozen base was quantised while training ("" when it was not), from the train manifest."""
    denoiser = train.get("stats", {}).get("denoiser") or {}
    preset = denoiser.get("base_model_precision") or train["config"].get("base_model_precision") or "no_change"
    backend = denoiser.get("backend")
    if denoiser.get("gguf"):
        return f"GGUF ({denoiser['gguf']})"
    if preset == "no_change" and not backend:
        return ""
    name = preset if preset != "no_change" else "quantization_config"
    via = ", activations too" if denoiser.get("quantize_activations") else ""
    return f"{name} ({backend or 'optimum-quanto'}{via})"


def _singlora_section(card: Card) -> list[str]:
    """A SingLoRA run: what each of its two files is, and how peft-singlora loads SimpleTuner's layout."""
    prefix = card.family.denoiser.subfolder
    return ["## SingLoRA", "",
            "Trained as SingLoRA (peft-singlora: one matrix A per Linear layer, update u * alpha/rank * A A^T with the "
            "ramp u). `pytorch_lora_weights.safetensors` holds the same update as an ordinary LoRA (B = A[:out], "
            "A' = u A[:in]^T at the ramp the training ended at), so diffusers and ComfyUI load it like any LoRA. "
            f"`{SINGLORA_WEIGHT_NAME}` is the file SimpleTuner saves for SingLoRA (the A matrices and the layers' step "
            "buffers); peft-singlora loads it onto the pipeline's denoiser (instead of `load_lora_weights`):", "",
            "```python", "import json", "",
            "from peft import inject_adapter_in_model, set_peft_model_state_dict",
            "from peft_singlora import SingLoRAConfig", "from safetensors import safe_open", "",
            f'with safe_open("{LOCAL_FOLDER}/{SINGLORA_WEIGHT_NAME}", framework="pt") as f:',
            '    packed = json.loads(f.metadata()["lora_adapter_metadata"])',
            f'    state = {{k.removeprefix("{prefix}."): f.get_tensor(k) for k in f.keys()}}',
            f'options = {{k.removeprefix("{prefix}."): v for k, v in packed.items()}}',
            "inject_adapter_in_model(SingLoRAConfig(**options), pipe." + prefix + ")",
            f"set_peft_model_state_dict(pipe.{prefix}, state)",
            f"for module in pipe.{prefix}.modules():  # peft-singlora 0.2.0 does not pass the ramp length on",
            '    if hasattr(module, "ramp_up_steps"):',
            '        module.ramp_up_steps = options["ramp_up_steps"]', "```", ""]  # fmt: skip


CONTROL_SUFFIX = "-control"  # validation/<label>/<prompt>-<W>x<H>-control.png: the conditioning image of a render


def conditioned_pairs(card: Card) -> list[dict[str, Any]]:
    """The renders of `card.widget` that have a conditioning image beside them (ControlNet, control and edit runs),
    each with the image's path as "control"."""
    controls = {Path(i["path"]).stem.removesuffix(CONTROL_SUFFIX): i["path"] for i in card.widget
                if Path(i["path"]).stem.endswith(CONTROL_SUFFIX)}  # fmt: skip
    pairs = []
    for item in card.widget:
        stem = Path(item["path"]).stem
        if stem.endswith(CONTROL_SUFFIX):
            continue
        control = controls.get(stem.rpartition("-")[0])
        if control is not None:
            pairs.append({**item, "control": control})
    return pairs


def pairs_table(pairs: list[dict[str, Any]]) -> list[str]:
    """The validation section's rows: prompt, conditioning image (input) and render (output)."""
    return _table(["prompt", "conditioning image (input)", "render (output)"],
                  [[p["text"], f"![input]({p['control']})", f"![output]({p['path']})"] for p in pairs])  # fmt: skip


def render(card: Card) -> str:
    """The whole README.md."""
    options, train = card.options, card.train
    pairs = conditioned_pairs(card) if card.family.pipeline_class in IMAGE_ARGUMENTS else []
    if pairs:  # the renders only in the YAML widget; the table shows each beside its conditioning image
        card.widget = [{k: v for k, v in p.items() if k != "control"} for p in pairs]
    kind = "LoRA" if train["model_type"] == "lora" else "full fine-tune"
    title = options.hub_model_id or f"{card.family.name} {kind}"
    out = ["---", *yaml_lines(front_matter(card)), "---", "", f"# {title}", ""]
    if options.model_card_note:
        out += [options.model_card_note, ""]
    if options.model_card_private:
        out += ["> **Private model**: made for a limited audience; do not redistribute these weights or this card.", ""]
    out.append(f"A {kind} of `{card.base_model}` ({card.family.name}), trained with st for {card.step} step{'s' if card.step != 1 else ''}.")
    if card.checkpoint:
        out[-1] += f" These are the weights of the checkpoint `{card.checkpoint}`, not the run's final weights."
    if card.family.card_note is not None:  # a Wan 2.2 A14B stage: which expert
        from .model_folder import base_denoiser_config

        note = card.family.card_note(card.family, train, lambda: base_denoiser_config(train, card.family))
        out[-1] += f" {note}" if note else ""
    base = _quantised_base(train)
    if base:
        out[-1] += (f" The base model was quantised while training: **{base}**; the LoRA itself is full precision "
                    "and loads onto the unquantised base.")  # fmt: skip
    out.append("")
    if card.grid or card.widget:
        out += ["## Validation videos" if card.family.video else "## Validation images", ""]
        if card.grid:
            out += [f"![validation grid]({card.grid})", ""]
        if card.family.video:
            out += ["Each image shows every frame of one validation video, row by row (the MP4 has the same name).",
                    ""]  # fmt: skip
        if pairs:
            out += pairs_table(pairs)
        else:
            out += [f"- `{_md(item['text'])}`: [{Path(item['path']).name}]({item['path']})" for item in card.widget]
        out.append("")
    out += ["## Use with diffusers", "", "```python", snippet(card), "```", ""]
    if train["model_type"] == "lora" and train["config"].get("train_text_encoder"):
        two = len(card.family.text_encoders) > 1
        out += [f"The text encoder{'s were' if two else ' was'} trained too: the weight file holds "
                f"{'their' if two else 'its'} LoRA (`text_encoder.*`{', `text_encoder_2.*`' if two else ''}), which "
                "`load_lora_weights` applies with the denoiser's; prompts encoded without it give other results.", ""]
    if not options.hub_model_id:
        out += [f"Replace `{LOCAL_FOLDER}` with where this folder is (or its Hugging Face repository id).", ""]
    if train["model_type"] == "lora" and train["config"].get("lora_type") == "lycoris":
        out += ["## Use with ComfyUI", "", f"`{card.comfyui or 'pytorch_lora_weights.safetensors'}` is a LyCORIS file "
                "(`lycoris_*` keys, the layout the LyCORIS library saves); ComfyUI's LoRA loader reads it as it is for "
                "SD 1.x, SDXL and Flux: put it in `models/loras` and load it with a LoRA loader node.", ""]  # fmt: skip
    elif card.comfyui:
        out += ["## Use with ComfyUI", "", f"`{card.comfyui}` holds the same LoRA in ComfyUI's layout; put it in "
                "`models/loras` and load it with a LoRA loader node.", ""]  # fmt: skip
    if train["model_type"] == "lora" and train["config"].get("peft_lora_mode") == "singlora":
        out += _singlora_section(card)
    if card.ema:
        out += ["`ema_weights.safetensors` holds the exponential moving average of the trained weights.", ""]
        if train["model_type"] == "lora" and train["config"].get("lora_type") == "lycoris":
            out[-2] += " It is a LyCORIS file like `pytorch_lora_weights.safetensors` and loads the same way."
    out += ["## Training settings", "", *_table(["setting", "value"], _settings(card)), ""]
    out += ["## Dataset", "", *_dataset(card), ""]
    out += ["## Lineage", "", f"`lineage.json` names the train manifest (digest `{train['digest'][:16]}`), the cache "
            "and prepare manifests it descends from, the base model's identity and the sha256 of every weight file.",
            ""]  # fmt: skip
    return "\n".join(out)
