"""Wan 2.2 T2V A14B and SimpleTuner's AnimeGen stage flavours (`wan22.T2V_STAGES`) on `st tiny-model wan DIR --flavour
t2v-2.2`: the folder, the flavours' routing and refusals, each expert's call replayed against WanPipeline's own
around the boundary, the stage files (Wan's original keys or diffusers' layout) read through an offline hub cache,
and validation's slots with the other stage's file."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.errors import ConfigError, InputError
from pipeline.families import get_family, wan22

FRAMES, SIZE = 5, 32  # two latent frames of 8 x 8 with the tiny VAE
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"

# diffusers' WanTransformer3DModel names -> Wan's original ones (the inverse of diffusers'
# convert_wan_transformer_to_diffusers for the text-to-video keys)
_TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"), ("attn2", "cross_attn"), (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."),
    (".to_v.", ".v."), ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), (".norm2.", ".norm3."),
    ("scale_shift_table", "modulation"), ("proj_out", "head.head"),
)  # fmt: skip


def original_state_dict(transformer) -> dict[str, torch.Tensor]:
    """`transformer`'s weights under Wan's original names, with ComfyUI's `model.diffusion_model.` prefix."""
    out = {}
    for name, tensor in transformer.state_dict().items():
        new = "head.modulation" if name == "scale_shift_table" else name
        for old, replacement in _TO_ORIGINAL:
            new = new.replace(old, replacement)
        out[f"model.diffusion_model.{new}"] = tensor.contiguous()
    return out


def animegen_cache(root: Path, high, low, *, original: bool = True) -> Path:
    """A hub cache holding aidealab/AnimeGen-T2V's high_noise.safetensors / low_noise.safetensors: `high` and `low`'s
    weights in Wan's original format (or diffusers' layout)."""
    from safetensors.torch import save_file

    repo = root / ("models--" + wan22.ANIMEGEN_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    (repo / "snapshots" / SNAPSHOT).mkdir(parents=True)
    for name, model in (("high_noise.safetensors", high), ("low_noise.safetensors", low)):
        tensors = original_state_dict(model) if original else {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, repo / "snapshots" / SNAPSHOT / name)
    return root


def shifted(transformer, by: float):
    """A copy of `transformer` with every weight moved by `by` (another fine-tune of the same expert)."""
    import copy

    other = copy.deepcopy(transformer)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(by)
    return other


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path_factory.mktemp("wan22-t2v") / "model"
    result = CliRunner().invoke(app, ["tiny-model", "wan", str(out), "--flavour", "t2v-2.2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import WanPipeline

    loaded = WanPipeline.from_pretrained(str(folder))
    loaded.set_progress_bar_config(disable=True)
    return loaded


@pytest.fixture(scope="module")
def experts(pipe):
    """AnimeGen's stand-ins: the folder's experts, each moved (so that a stage file is told from the folder's)."""
    return shifted(pipe.transformer, 0.01), shifted(pipe.transformer_2, -0.01)


@pytest.fixture
def offline(monkeypatch):
    """`use(cache)`: this process reads the hub only from the hub cache `cache` (HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def use(cache: Path) -> None:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    return use


def _text(pipe, prompt: str):
    family = get_family("wan")
    return family.collate_text(family.encode_prompts([pipe.text_encoder], [pipe.tokenizer], [prompt]))


def _config(flavour: str, **extra) -> SimpleNamespace:
    return SimpleNamespace(model_flavour=flavour, pretrained_transformer_model_name_or_path=None,
                           pretrained_transformer_subfolder="transformer", pretrained_unet_model_name_or_path=None,
                           pretrained_unet_subfolder="unet", **extra)  # fmt: skip


def _assert_same_weights(ours, theirs) -> None:
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_tiny_model_is_a_two_expert_t2v_folder(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["boundary_ratio"] == 0.875
    assert index["transformer"][1] == index["transformer_2"][1] == "WanTransformer3DModel"
    for sub in ("transformer", "transformer_2"):
        config = json.loads((folder / sub / "config.json").read_text())
        assert config["in_channels"] == 16 and config["image_dim"] is None
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() != \
        (folder / "transformer_2" / "diffusion_pytorch_model.safetensors").read_bytes()  # fmt: skip


def test_the_animegen_flavours_train_their_stage_and_a_two_expert_folder_needs_one(folder, tmp_path):
    wan = get_family("wan")
    assert wan.flavour_hub_id("animegen-t2v-high") == wan.flavour_hub_id("animegen-t2v-low") == wan22.T2V_HUB_ID
    high, low = wan.for_run("animegen-t2v-high", str(folder)), wan.for_run("animegen-t2v-low", str(folder))
    assert high is wan22.T2V_HIGH and low is wan22.T2V_LOW
    assert wan.for_run("animegen-t2v-low", wan22.T2V_HUB_ID) is wan22.T2V_LOW  # a hub id not in the cache
    assert (wan22.stage_of(high).subfolder, wan22.stage_of(low).subfolder) == ("transformer", "transformer_2")
    stage = wan22.stage_of(low)  # SimpleTuner's WAN_STAGE_OVERRIDES values
    assert (stage.boundary_ratio, stage.flow_shift, stage.sample_steps, stage.guidance) == (0.875, 3.0, 8, 1.0)
    assert high.default_flow_shift == low.default_flow_shift == 3.0 and high.pipeline_class == "WanPipeline"
    assert high.latent_channels == 16 and wan22.weights_subfolder(low) is None  # its weights are the stage file's
    with pytest.raises(ConfigError, match="two transformers.*animegen-t2v-high.*animegen-t2v-low"):
        wan.for_run(None, str(folder))
    with pytest.raises(ConfigError, match="i2v-14b-2.2-low trains one expert of Wan 2.2 I2V A14B.*WanPipeline"):
        wan.for_run("i2v-14b-2.2-low", str(folder))
    one = tmp_path / "one"
    one.mkdir()
    (one / "model_index.json").write_text('{"_class_name": "WanPipeline", "transformer": '
                                          '["diffusers", "WanTransformer3DModel"]}')  # fmt: skip
    with pytest.raises(ConfigError, match="animegen-t2v-low.*without transformer_2"):
        wan.for_run("animegen-t2v-low", str(one))


def test_each_expert_call_of_the_pipeline_is_the_stage_familys_denoiser_call(pipe):
    """WanPipeline runs `transformer` at t >= 875 and `transformer_2` below; each call, replayed through the stage
    family's `denoiser_forward`, gives the same output, bit for bit."""
    calls = []

    def recorder(name):
        def record(module, args, kwargs, output):
            calls.append((name, module, dict(kwargs), output[0]))
        return record

    text = _text(pipe, "a red circle")
    handles = [pipe.transformer.register_forward_hook(recorder("transformer"), with_kwargs=True),
               pipe.transformer_2.register_forward_hook(recorder("transformer_2"), with_kwargs=True)]  # fmt: skip
    with torch.no_grad():
        pipe(prompt_embeds=text["prompt_embeds"], height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=6,
             guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(0))  # fmt: skip
    for handle in handles:
        handle.remove()
    steps = [(name, float(kw["timestep"][0])) for name, _, kw, _ in calls]
    assert {(name, t >= 875) for name, t in steps} == {("transformer", True), ("transformer_2", False)}
    assert any(875 <= t < 950 for _, t in steps) and any(800 < t < 875 for _, t in steps)  # around the boundary
    for name, module, kwargs, output in calls:
        family = wan22.T2V_HIGH if name == "transformer" else wan22.T2V_LOW
        hidden = kwargs["hidden_states"]
        assert hidden.shape == (1, 16, 2, 8, 8)
        with torch.no_grad():
            ours = family.denoiser_forward(module, hidden, kwargs["timestep"], text)
        torch.testing.assert_close(ours, output, rtol=0, atol=0)


@pytest.mark.parametrize("original", [True, False], ids=["original-keys", "diffusers-layout"])
def test_stage_files_come_from_the_hub_cache_in_either_format(folder, experts, offline, tmp_path, original):
    """The stage's file is read through the (offline) hub cache and loaded as SimpleTuner does (from_single_file) with
    the base folder's slot config: the same weights whichever key format the file uses."""
    from pipeline.families.identity import denoiser_source

    offline(animegen_cache(tmp_path / "hub", *experts, original=original))
    wan = get_family("wan")
    for flavour, expert in zip(("animegen-t2v-high", "animegen-t2v-low"), experts, strict=True):
        source = denoiser_source(_config(flavour), wan, str(folder), folder)
        name = wan22.stage_of(wan.for_run(flavour, str(folder))).file
        assert Path(source.source).name == name and Path(source.source).is_file() and source.subfolder is None
        assert source.single_file_config == (str(folder), "transformer" if "high" in flavour else "transformer_2")
        assert wan22.single_file_format(source.source) == ("original" if original else "diffusers")
        loaded = wan22.load_single_file(wan, source.source, *source.single_file_config)
        _assert_same_weights(loaded, expert)


def test_a_missing_or_foreign_stage_file_is_refused(folder, offline, tmp_path):
    from safetensors.torch import save_file

    from pipeline.families.identity import denoiser_source

    offline(tmp_path / "empty")
    with pytest.raises(InputError, match="low_noise.safetensors.*aidealab/AnimeGen-T2V.*hub cache"):
        denoiser_source(_config("animegen-t2v-low"), get_family("wan"), str(folder), folder)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(InputError, match="holds no Wan transformer"):
        wan22.single_file_format(foreign)
    # pretrained_transformer_model_name_or_path replaces the stage file (a file, or the folder's own expert)
    config = _config("animegen-t2v-high")
    config.pretrained_transformer_model_name_or_path = str(foreign)
    source = denoiser_source(config, get_family("wan"), str(folder), folder)
    assert (source.source, source.single_file_config) == (str(foreign), (str(folder), "transformer"))
    config = _config("animegen-t2v-low")
    config.pretrained_transformer_model_name_or_path, config.pretrained_transformer_subfolder = str(folder), \
        "transformer_2"  # fmt: skip
    source = denoiser_source(config, get_family("wan"), str(folder), folder)
    assert (source.source, source.subfolder, source.single_file_config) == (str(folder), "transformer_2", None)
    config.pretrained_transformer_subfolder = "transformer"  # the high-noise expert under the low stage's flavour
    with pytest.raises(ConfigError, match="animegen-t2v-low trains the low-noise expert.*set it to transformer_2"):
        denoiser_source(config, get_family("wan"), str(folder), folder)


def test_validation_loads_the_other_stages_file_beside_the_trained_one(folder, experts, offline, tmp_path):
    offline(animegen_cache(tmp_path / "hub", *experts))
    trained = experts[1]
    alone = wan22.pipeline_components(wan22.T2V_LOW, str(folder), trained, False, "cpu")
    assert alone == {"transformer": trained, "transformer_2": None, "boundary_ratio": None}
    both = wan22.pipeline_components(wan22.T2V_LOW, str(folder), trained, True, "cpu")
    assert both["transformer_2"] is trained and both["boundary_ratio"] == 0.875
    assert not any(p.requires_grad for p in both["transformer"].parameters())
    _assert_same_weights(both["transformer"], experts[0])  # AnimeGen's high-noise file, not the folder's expert
