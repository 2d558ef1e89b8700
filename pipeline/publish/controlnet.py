"""Publishing a ControlNet run (`controlnet: true`): the folder is itself a diffusers ControlNet (config.json +
diffusion_pytorch_model.safetensors at its root, as ControlNets on the Hub are laid out, so that
`ControlNetModel.from_pretrained(folder)` / `FluxControlNetModel.from_pretrained(folder)` loads it), and the model
card shows the validation renders beside the conditioning images they were made from."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import InputError, NotSupportedError
from ..families.controlnet import ADAPTER_FILE, spec_for
from ..log import get_logger
from ..tensorfile import save_tensors
from . import card as cards
from . import lora
from .lineage import Inputs

log = get_logger("publish")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# ComfyUI's ControlNet loader (comfy/controlnet.py, load_controlnet_state_dict) reads diffusers ControlNet weights
# as they are, telling the kind apart by these keys: the UNet ControlNets (SD 1.x, SDXL) by their conditioning
# embedding, SD3's by its blocks and input patch embedding, Flux's (InstantX layout) by its blocks and input embedder.
COMFYUI_KEYS = {
    "ControlNetModel": ("controlnet_cond_embedding.conv_in.weight",),
    "SD3ControlNetModel": ("controlnet_blocks.0.weight", "pos_embed_input.proj.weight"),
    "FluxControlNetModel": ("controlnet_blocks.0.weight", "controlnet_x_embedder.weight"),
}
TRAINED = "final/controlnet"  # where st train writes the ControlNet folder
PREFIX = "controlnet."  # checkpoint weight names: the trainer model's parameter names


def is_controlnet(inputs: Inputs) -> bool:
    return inputs.train["final"].get("format") == "controlnet"


def write(inputs: Inputs, lora_format: str, stage: Path) -> list[tuple[str, str]]:
    """config.json and the weights (train's final, or the checkpoint's ControlNet weights) into `stage`. The weights
    file is also what ComfyUI loads (`COMFYUI_KEYS`), so lora_format comfyui writes nothing else."""
    if lora_format == "comfyui":
        log.info("publish: %s is in the layout ComfyUI's ControlNet loader reads (see the card)", WEIGHTS_NAME)
    trained = inputs.train_dir / TRAINED
    adapter = inputs.train_dir / "final" / ADAPTER_FILE  # model_type lora: the adapter, merged into the folder's weights
    if inputs.checkpoint is not None and inputs.train["model_type"] == "lora":
        raise NotSupportedError(f"{inputs.checkpoint.rel} holds the ControlNet's adapter only, without the ControlNet "
                                "it was trained on; publish the run's final weights (leave out the checkpoint), "
                                "which hold the ControlNet with the adapter merged")  # fmt: skip
    shutil.copyfile(trained / CONFIG_NAME, stage / CONFIG_NAME)
    if inputs.checkpoint is None:
        shutil.copyfile(trained / WEIGHTS_NAME, stage / WEIGHTS_NAME)
        if adapter.is_file():
            shutil.copyfile(adapter, stage / ADAPTER_FILE)
            return [(CONFIG_NAME, "diffusers-controlnet"), (WEIGHTS_NAME, "diffusers-controlnet"),
                    (ADAPTER_FILE, "controlnet-adapter")]  # fmt: skip
    else:
        tensors = lora.load_tensors(inputs.checkpoint.path / "weights.safetensors")
        stray = [k for k in tensors if not k.startswith(PREFIX)]
        if stray:
            raise InputError(f"{inputs.checkpoint.path} holds weights that are not a ControlNet's (e.g. {stray[0]}); "
                             "was it written by another run?")  # fmt: skip
        save_tensors(stage / WEIGHTS_NAME, {k.removeprefix(PREFIX): v for k, v in tensors.items()},
                     metadata=lora.read_header(trained / WEIGHTS_NAME))  # fmt: skip
    return [(CONFIG_NAME, "diffusers-controlnet"), (WEIGHTS_NAME, "diffusers-controlnet")]


def snippet(card: cards.Card) -> str:
    """diffusers: the ControlNet from this folder in the family's ControlNet pipeline over the base model."""
    spec = spec_for(card.family)
    config = card.train["config"]
    prompt = card.widget[0]["text"] if card.widget else (config.get("validation_prompt") or "a photo")
    hub = card.options.hub_model_id
    return "\n".join([
        "import torch", f"from diffusers import {spec.model_class}, {spec.pipeline_class}",
        "from diffusers.utils import load_image", "", *cards._DEVICE_LINES,
        f"controlnet = {spec.model_class}.from_pretrained({cards._py(hub or cards.LOCAL_FOLDER)}, torch_dtype=dtype)",
        f"pipe = {spec.pipeline_class}.from_pretrained({cards._py(card.base_model)}, controlnet=controlnet, "
        "torch_dtype=dtype).to(device)",
        'condition = load_image("conditioning.png")  # an image like the conditioning images it was trained on',
        f"image = pipe({cards._py(prompt)}, {spec.control_argument}=condition, "
        f"num_inference_steps={config.get('validation_num_inference_steps', 30)}, "
        f"guidance_scale={config.get('validation_guidance', 7.5)}).images[0]",
        'image.save("image.png")',
    ])  # fmt: skip


def render(card: cards.Card) -> str:
    """README.md of a ControlNet: what it is for, input/output pairs, loading code, settings, dataset, lineage."""
    options, train, family = card.options, card.train, card.family
    pairs = cards.conditioned_pairs(card)
    card.widget = [{k: v for k, v in p.items() if k != "control"} for p in pairs]  # the renders only, in the YAML
    matter = cards.front_matter(card)
    matter["tags"] = [family.name, "controlnet", "text-to-image", "diffusers", "st",
                      *(["not-for-all-audiences"] if not options.model_card_safe_for_work else [])]  # fmt: skip
    title = options.hub_model_id or f"{family.name} ControlNet"
    step = f"{card.step} step{'s' if card.step != 1 else ''}"
    out = ["---", *cards.yaml_lines(matter), "---", "", f"# {title}", ""]
    if options.model_card_note:
        out += [options.model_card_note, ""]
    if options.model_card_private:
        out += ["> **Private model**: made for a limited audience; do not redistribute these weights or this card.", ""]
    out.append(f"A ControlNet for `{card.base_model}` ({family.name}), trained with st for {step}: "
               f"`{spec_for(family).model_class}` weights that steer the base model with a conditioning image. "
               "The base model itself is unchanged.")  # fmt: skip
    if card.checkpoint:
        out[-1] += f" These are the weights of the checkpoint `{card.checkpoint}`, not the run's final weights."
    out.append("")
    if pairs:
        out += ["## Validation images", "", *cards.pairs_table(pairs), ""]
    out += ["## Use with diffusers", "", "```python", snippet(card), "```", ""]
    if not options.hub_model_id:
        out += [f"Replace `{cards.LOCAL_FOLDER}` with where this folder is (or its Hugging Face repository id).", ""]
    if card.ema:
        out += ["`ema_weights.safetensors` holds the exponential moving average of the ControlNet's weights "
                "(names prefixed `controlnet.`).", ""]  # fmt: skip
    out += ["## Use with ComfyUI", "", f"`{WEIGHTS_NAME}` is in the layout ComfyUI's ControlNet loader reads (diffusers "
            "keys, detected as they are): put it (renamed as you like) in `models/controlnet`, load it with a Load "
            "ControlNet Model node and apply it to the base model's conditioning with Apply ControlNet.", ""]  # fmt: skip
    rows = cards._settings(card)  # family, model_type, then the run's settings
    spec = spec_for(family)
    trained = f"{spec.model_class}, trained whole" if train["model_type"] != "lora" else (
        f"{spec.model_class} with a {'LoHa' if spec.adapter == 'loha' else 'LoRA'} on it, merged into these weights "
        f"(the adapter alone: `{ADAPTER_FILE}`)")  # fmt: skip
    settings = [rows[0], ["controlnet", trained], *rows[2:]]
    out += ["## Training settings", "", *cards._table(["setting", "value"], settings), ""]
    out += ["## Dataset", "", *cards._dataset(card), ""]
    out += ["## Lineage", "", f"`lineage.json` names the train manifest (digest `{train['digest'][:16]}`), the cache "
            "and prepare manifests it descends from, the base model's identity and the sha256 of every weight file.",
            ""]  # fmt: skip
    return "\n".join(out)
