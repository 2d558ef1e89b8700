"""Model families: the registry, tiny models that the real pipelines load and run, prompt encoding equal to the
pipelines' `encode_prompt`, component loading errors and component identity."""

from __future__ import annotations

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.errors import ConfigError, InputError, NotSupportedError  # noqa: E402
from pipeline.families import FAMILIES, component_identity, get_family, load_components, vae_factors  # noqa: E402
from pipeline.families.pixel_space import is_pixel_space  # noqa: E402

NAMES = sorted(FAMILIES)
T5_FAMILIES = ["flux", "pixart_sigma", "sd3", "auraflow", "lumina2", "chroma", "hidream", "cosmos2image"]
PROMPTS = [
    "a photo of a dog",
    "  A Beautiful PAINTING of mountains at sunset, with clouds over a quiet lake; detailed oil, 4k!  ",
]


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    """Each family's tiny folder loaded with its diffusers pipeline class, once."""
    pipes: dict[str, object] = {}

    def load(name: str):
        if name not in pipes:
            family = get_family(name)
            pipe = family.load_pipeline_class().from_pretrained(tiny_model(name))
            pipe.set_progress_bar_config(disable=True)
            pipes[name] = pipe
        return pipes[name]

    return load


def pipeline_encode(name: str, pipe, prompts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
    """What the family's pipeline hands its denoiser for `prompts` (no classifier-free guidance)."""
    kw = {} if max_length is None else {"max_sequence_length": max_length}
    with torch.no_grad():
        if name in ("sd1x", "sd2x"):
            embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
            return {"prompt_embeds": embeds}
        if name == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if name == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompts, None, None, device="cpu", do_classifier_free_guidance=False, **kw
            )
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if name == "flux":
            embeds, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu", **kw)
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if name == "pixart_sigma":
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu", **kw)
            return {"prompt_embeds": embeds, "attention_mask": mask}
        if name == "auraflow":  # the pipeline returns the mask expanded to the embeddings' shape, then flattened
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                                    max_sequence_length=max_length or 120)  # fmt: skip
            return {"prompt_embeds": embeds, "attention_mask": mask.reshape(embeds.shape)[..., 0]}
        if name == "lumina2":
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu", **kw)
            return {"prompt_embeds": embeds, "attention_mask": mask}
        if name == "qwen_image":
            embeds, mask = pipe.encode_prompt(prompts, device="cpu", **kw)
            return {"prompt_embeds": embeds, "attention_mask": mask}
        if name == "sana":  # st's default instruction is SimpleTuner's sana_complex_human_instruction
            from pipeline.families.sana import COMPLEX_HUMAN_INSTRUCTION

            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                                    complex_human_instruction=list(COMPLEX_HUMAN_INSTRUCTION), **kw)  # fmt: skip
            return {"prompt_embeds": embeds, "attention_mask": mask}
        if name == "kolors":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False, **kw)
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if name == "chroma":  # the mask keeps the real tokens and the first padding token
            embeds, _, mask, *_ = pipe.encode_prompt(prompts, None, device="cpu", do_classifier_free_guidance=False,
                                                     **kw)  # fmt: skip
            return {"prompt_embeds": embeds, "attention_mask": mask}
        if name == "hidream":
            t5, _, llama, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False,
                                                            **kw)  # fmt: skip
            return {"prompt_embeds_t5": t5, "prompt_embeds_llama3": llama, "pooled_prompt_embeds": pooled}
        if name == "cosmos2image":  # padded to max_sequence_length, padded positions zeroed
            embeds, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False, **kw)
            return {"prompt_embeds": embeds}
        if name == "z_image":  # one tensor of real tokens per prompt, padded here with zeros and mask 0
            # (the pipeline writes the chat-templated prompts into the list it is given: pass a copy)
            embeds, _ = pipe.encode_prompt(list(prompts), device="cpu", do_classifier_free_guidance=False, **kw)
            longest = max(e.shape[0] for e in embeds)
            mask = torch.tensor([[1] * e.shape[0] + [0] * (longest - e.shape[0]) for e in embeds])
            padded = torch.stack([torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[0])) for e in embeds])
            return {"prompt_embeds": padded, "attention_mask": mask}
        if name == "deepfloyd":  # always 77 tokens; the UNet sees every position
            embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu")
            return {"prompt_embeds": embeds}
        if name == "flux2":  # padded to max_sequence_length, no mask: the denoiser sees every position
            embeds, _ = pipe.encode_prompt(prompts, device="cpu", **kw)
            return {"prompt_embeds": embeds}
        if name == "wan":  # the call's max_sequence_length (512, not encode_prompt's 226), padded positions zeroed
            length = max_length or 512
            embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu",
                                           max_sequence_length=length)  # fmt: skip
            mask = pipe.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                                  return_tensors="pt").attention_mask  # fmt: skip
            return {"prompt_embeds": embeds, "attention_mask": mask}
        if name == "ltxvideo":  # T5 runs without the mask; the transformer masks padded positions (bool mask here)
            embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device="cpu", **kw)
            return {"prompt_embeds": embeds, "attention_mask": mask.long()}
        if name == "omnigen":  # no embeddings: the processor's token ids, left-padded by its collator
            processor = pipe.multimodal_processor
            ids = [processor.process_multi_modal_prompt(p, None)["input_ids"] for p in prompts]
            padded, mask, _ = processor.collator.pad_input_ids(ids, {})
            return {"input_ids": padded, "attention_mask": mask}
    raise AssertionError(name)


def encode(name: str, pipe, prompts: list[str], **kw) -> list[dict[str, torch.Tensor]]:
    family = get_family(name)
    encoders = tuple(getattr(pipe, spec.model.subfolder) for spec in family.text_encoders)
    tokenizers = tuple(getattr(pipe, spec.tokenizer.subfolder) for spec in family.text_encoders)
    return family.encode_prompts(encoders, tokenizers, prompts, **kw)


def assert_same_batch(name: str, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape, key
        assert ours[key].dtype == theirs[key].dtype, key
    if get_family(name).trims_text:
        # Padded positions are masked in the denoiser; collate_text refills them with zeros.
        mask = theirs["attention_mask"].unsqueeze(-1).bool()
        assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
        assert torch.equal(ours["prompt_embeds"] * mask, theirs["prompt_embeds"] * mask)
        assert not ours["prompt_embeds"].masked_select(~mask).any()
    else:
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), key


# ------------------------------------------------------------------------------------------------------- registry


def test_unknown_family_lists_known_names():
    with pytest.raises(ConfigError) as info:
        get_family("fluxx")
    message = str(info.value)
    assert all(name in message for name in NAMES)
    assert "did you mean 'flux'" in message


def test_registry_is_consistent():
    assert set(NAMES) == {"sd1x", "sd2x", "sdxl", "sd3", "flux", "pixart_sigma", "auraflow", "lumina2", "qwen_image",
                          "sana", "kolors", "z_image", "chroma", "hidream", "cosmos2image", "flux2", "deepfloyd",
                          "wan", "ltxvideo", "omnigen"}  # fmt: skip
    for name, family in FAMILIES.items():
        assert family.name == name
        assert family.bucket_alignment >= 16
        assert family.lora_targets
    assert FAMILIES["sd1x"].bucket_alignment == 64 and FAMILIES["flux"].latent_channels == 16
    assert FAMILIES["sd2x"].prediction_type == "v_prediction"
    assert FAMILIES["pixart_sigma"].trims_text and not FAMILIES["flux"].trims_text


# ---------------------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("name", NAMES)
def test_tiny_folder_runs_in_its_pipeline(name, tiny_model, tiny_pipe):
    family = get_family(name)
    folder = tiny_model(name)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == family.pipeline_class
    assert index[family.denoiser.subfolder] == [family.denoiser.library, family.denoiser.class_name]
    for spec in family.text_encoders:
        library, class_name = index[spec.model.subfolder]
        if spec.model.subfolder == spec.tokenizer.subfolder:  # OmniGen: no text encoder, only a tokenizer
            assert name == "omnigen" and spec.model.class_name == "NoEncoderTokenizer"
        else:  # Kolors' ChatGLM lives in diffusers.pipelines.kolors, which model_index.json names "kolors"
            assert class_name == spec.model.class_name and spec.model.library.split(".")[-1] == library
        # transformers 5 writes its PreTrainedTokenizerFast (HiDream's Llama tokenizer) as TokenizersBackend
        assert index[spec.tokenizer.subfolder][1] in {spec.tokenizer.class_name, "TokenizersBackend"}
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 10 << 20

    pipe = tiny_pipe(name)
    if is_pixel_space(family):  # DeepFloyd IF: no VAE, the UNet denoises RGB pixels
        assert not hasattr(pipe, "vae") and pipe.unet.config.in_channels == family.latent_channels == 3
    else:  # Qwen-Image's 3-D VAE calls its latent channels z_dim
        assert (pipe.vae.config.get("latent_channels") or pipe.vae.config.get("z_dim")) == family.latent_channels
    scheduler_prediction = pipe.scheduler.config.get("prediction_type")
    if family.prediction_type == "flow_matching":
        # Sana samples with DPM-Solver over flow sigmas
        assert type(pipe.scheduler).__name__.startswith("FlowMatch") or scheduler_prediction == "flow_prediction"
    else:
        assert scheduler_prediction == family.prediction_type
    if family.video:  # one short clip: 1 + temporal_compression frames decode to two latent frames
        frames = 1 + family.temporal_compression
        video = pipe(prompt=PROMPTS[0], num_inference_steps=2, height=64, width=64, num_frames=frames,
                     output_type="np").frames  # fmt: skip
        assert video.shape[:2] == (1, frames)
        image = video[:, 0]
    else:
        image = pipe(prompt=PROMPTS[0], num_inference_steps=2, height=64, width=64, output_type="np").images
    side = 256 if name == "hidream" else 64  # HiDream always renders 128 x 128 latents (x the VAE factor 2)
    assert image.shape == (1, side, side, 3)
    assert torch.isfinite(torch.from_numpy(image)).all()


@pytest.mark.parametrize("name", NAMES)
def test_lora_targets_match_the_denoiser(name, tiny_pipe):
    from peft import LoraConfig, inject_adapter_in_model

    family = get_family(name)
    denoiser = getattr(tiny_pipe(name), family.denoiser.subfolder)
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=list(family.lora_targets)), _clone(denoiser))
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    for target in family.lora_targets:
        assert any(n == target or n.endswith("." + target) for n in wrapped), target


def _clone(module):
    import copy

    return copy.deepcopy(module)


# ------------------------------------------------------------------------------------------------ prompt encoding


@pytest.mark.parametrize("name", NAMES)
def test_encode_prompts_equals_pipeline(name, tiny_model, tiny_pipe):
    family = get_family(name)
    pipe = tiny_pipe(name)
    loaded = load_components(family, tiny_model(name), which=("text_encoders",))
    items = family.encode_prompts(loaded["text_encoders"], loaded["tokenizers"], PROMPTS)
    assert len(items) == 2
    for item in items:
        # HiDream's stack of Llama layers is layers x tokens x dim
        assert all(v.ndim == (3 if k == "prompt_embeds_llama3" else 2) for k, v in item.items()
                   if k.startswith("prompt_embeds"))  # fmt: skip
        if "pooled_prompt_embeds" in item:
            assert item["pooled_prompt_embeds"].ndim == 1
        if "attention_mask" in item:
            assert item["attention_mask"].ndim == 1
    if family.trims_text:
        lengths = [int(item["attention_mask"].sum()) for item in items]
        assert [item["prompt_embeds"].shape[0] for item in items] == lengths
        assert lengths[0] < lengths[1]
    elif name == "omnigen":  # each prompt's own token ids, as many as it has
        assert set(items[0]) == {"input_ids"} and items[0]["input_ids"].shape[0] < items[1]["input_ids"].shape[0]
    else:
        assert all(items[0][k].shape == items[1][k].shape for k in items[0])
    assert_same_batch(name, family.collate_text(items), pipeline_encode(name, pipe, PROMPTS))


@pytest.mark.parametrize("name", T5_FAMILIES)
def test_max_length_sets_the_t5_sequence(name, tiny_pipe):
    pipe = tiny_pipe(name)
    items = encode(name, pipe, PROMPTS, max_length=24)
    batch = get_family(name).collate_text(items)
    assert_same_batch(name, batch, pipeline_encode(name, pipe, PROMPTS, max_length=24))


def test_clip_max_length_beyond_positions_is_an_error(tiny_pipe):
    with pytest.raises(ConfigError, match="exceeds"):
        encode("sd1x", tiny_pipe("sd1x"), PROMPTS, max_length=100)
    with pytest.raises(ConfigError, match="t5_padding"):
        encode("flux", tiny_pipe("flux"), PROMPTS, t5_padding="trim")


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_t5_padding_zero_zeroes_only_padded_positions(name, tiny_pipe):
    pipe = tiny_pipe(name)
    plain = get_family(name).collate_text(encode(name, pipe, PROMPTS, max_length=32))["prompt_embeds"]
    zero = get_family(name).collate_text(encode(name, pipe, PROMPTS, max_length=32, t5_padding="zero"))
    zero = zero["prompt_embeds"]
    tokens = pipe.tokenizer_2 if name == "flux" else pipe.tokenizer_3
    mask = tokens(PROMPTS, padding="max_length", max_length=32, truncation=True, return_tensors="pt").attention_mask
    t5_part = slice(plain.shape[1] - 32, None)  # SD3 puts 77 CLIP positions first
    keep = mask.bool().unsqueeze(-1)
    assert torch.equal(zero[:, t5_part] * keep, plain[:, t5_part] * keep)
    assert not zero[:, t5_part].masked_select(~keep).any()
    assert plain[:, t5_part].masked_select(~keep).abs().sum() > 0
    assert torch.equal(zero[:, : plain.shape[1] - 32], plain[:, : plain.shape[1] - 32])


def test_pixart_trimmed_embeddings_give_the_same_denoiser_output(tiny_pipe):
    pipe = tiny_pipe("pixart_sigma")
    ours = get_family("pixart_sigma").collate_text(encode("pixart_sigma", pipe, PROMPTS))
    theirs = pipeline_encode("pixart_sigma", pipe, PROMPTS)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    timestep = torch.tensor([500, 500])
    added = {"resolution": None, "aspect_ratio": None}
    with torch.no_grad():
        out = [
            pipe.transformer(
                latents,
                encoder_hidden_states=batch["prompt_embeds"],
                encoder_attention_mask=batch["attention_mask"],
                timestep=timestep,
                added_cond_kwargs=added,
            ).sample
            for batch in (ours, theirs)
        ]
    torch.testing.assert_close(out[0], out[1], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------- loading and identity


@pytest.mark.parametrize("name", NAMES)
def test_vae_factors_come_from_the_config(name, tiny_model):
    vae = load_components(get_family(name), tiny_model(name), which=("vae",))["vae"]
    scale, shift = vae_factors(vae)
    if name in ("qwen_image", "cosmos2image", "wan"):  # normalised per channel by latents_mean / latents_std instead
        assert (scale, shift) == (1.0, None) and len(vae.config.latents_mean) == 16
        return
    if name == "flux2":  # normalised over 2x2 patches by its BatchNorm's running statistics instead
        assert (scale, shift) == (1.0, None) and vae.bn.num_features == 4 * vae.config.latent_channels
        return
    assert scale == vae.config.scaling_factor
    assert shift == vae.config.get("shift_factor")  # Sana's AutoencoderDC has none
    assert (shift is not None) == (name in ("sd3", "flux", "lumina2", "z_image", "chroma", "hidream"))


@pytest.mark.parametrize("name", NAMES)
def test_every_tiny_folder_is_recognised_as_its_own_family_only(name, tiny_model):
    from pipeline.families import check_model_family
    from pipeline.families.detect import detect_folder

    folder = tiny_model(name)
    assert detect_folder(folder, FAMILIES).families == (name,)
    check_model_family(get_family(name), str(folder))
    for other in NAMES:
        if other != name:
            with pytest.raises(InputError, match=f"looks like {name} "):
                check_model_family(get_family(other), str(folder))


def test_load_components_returns_what_is_asked(tiny_model):
    family = get_family("sd3")
    loaded = load_components(family, tiny_model("sd3"), which=("vae", "denoiser", "scheduler", "text_encoders"))
    assert type(loaded["denoiser"]).__name__ == "SD3Transformer2DModel"
    assert type(loaded["scheduler"]).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert [type(m).__name__ for m in loaded["text_encoders"]] == [
        "CLIPTextModelWithProjection",
        "CLIPTextModelWithProjection",
        "T5EncoderModel",
    ]
    assert len(loaded["tokenizers"]) == 3
    half = load_components(family, tiny_model("sd3"), which=("vae",), dtype=torch.bfloat16)
    assert set(half) == {"vae"} and half["vae"].dtype == torch.bfloat16


def test_vae_and_t5_sources_replace_components(tiny_model):
    family = get_family("pixart_sigma")
    loaded = load_components(
        family,
        tiny_model("pixart_sigma"),
        vae_source=tiny_model("sd1x") / "vae",
        t5_source=tiny_model("flux"),
    )
    assert loaded["vae"].config.scaling_factor == 0.18215
    flux_t5 = load_components(get_family("flux"), tiny_model("flux"))["text_encoders"][1]
    ours = loaded["text_encoders"][0]
    assert torch.equal(ours.shared.weight, flux_t5.shared.weight)
    assert type(loaded["tokenizers"][0]).__name__ == "T5Tokenizer"

    # A bare T5 folder (no tokenizer) keeps the model's own tokenizer.
    bare = load_components(family, tiny_model("pixart_sigma"), t5_source=tiny_model("flux") / "text_encoder_2")
    assert torch.equal(bare["text_encoders"][0].shared.weight, flux_t5.shared.weight)
    assert bare["tokenizers"][0] is not None
    with pytest.raises(NotSupportedError):
        load_components(get_family("sdxl"), tiny_model("sdxl"), t5_source=tiny_model("flux"))
    with pytest.raises(InputError, match="holds no"):
        load_components(family, tiny_model("pixart_sigma"), vae_source=tiny_model("sd1x") / "tokenizer")


def test_missing_component_is_named(tiny_model, tmp_path):
    folder = tmp_path / "sdxl"
    shutil.copytree(tiny_model("sdxl"), folder)
    shutil.rmtree(folder / "text_encoder_2")
    shutil.rmtree(folder / "vae")
    with pytest.raises(InputError) as info:
        load_components(get_family("sdxl"), folder)
    assert "text_encoder_2" in str(info.value) and "vae" in str(info.value)
    assert load_components(get_family("sdxl"), folder, which=("denoiser",))["denoiser"] is not None


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument is deprecated")
def test_hub_id_offline_points_to_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError) as info:
        load_components(get_family("sdxl"), "no-such-org/no-such-model-for-st-tests")
    message = str(info.value)
    assert "hub could not be reached" in message
    assert "pretrained_model_name_or_path" in message and "local diffusers folder" in message
    with pytest.raises(InputError, match="does not exist"):
        load_components(get_family("sdxl"), "./no/such/folder")
    with pytest.raises(InputError, match="local diffusers folder"):
        component_identity("no-such-org/no-such-model-for-st-tests", "vae")


def test_single_file_unsupported_family(tmp_path):
    checkpoint = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(checkpoint))
    with pytest.raises(NotSupportedError):
        load_components(get_family("pixart_sigma"), checkpoint)


def test_component_identity_follows_weights_and_config(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(tiny_model("sd1x"), folder)
    before = component_identity(folder, "vae")
    assert before == component_identity(folder, "vae")
    assert before["subfolder"] == "vae" and before["revision"] is None
    assert set(before["files"]) == {"diffusion_pytorch_model.safetensors"}

    weights_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights_file))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1.0
    save_file(tensors, str(weights_file), metadata={"format": "pt"})
    after = component_identity(folder, "vae")
    assert after["weights_sha256"] != before["weights_sha256"]
    assert after["config_sha256"] == before["config_sha256"]

    config_file = folder / "vae" / "config.json"
    config = json.loads(config_file.read_text())
    config["_diffusers_version"] = "0.0.1"  # who wrote it does not matter
    config_file.write_text(json.dumps(config, indent=4))
    assert component_identity(folder, "vae")["config_sha256"] == after["config_sha256"]
    config["scaling_factor"] = 0.5
    config_file.write_text(json.dumps(config))
    assert component_identity(folder, "vae")["config_sha256"] != after["config_sha256"]

    tokenizer = component_identity(folder, "tokenizer")
    assert "tokenizer.json" in tokenizer["files"] and tokenizer["config_sha256"]
