"""A text encoder the model does not ship (HiDream's Llama) comes from its hub repository, as SimpleTuner loads it:
`st cache` reads it there, its identity names that repository, `st check` says where it comes from, and without it
anywhere the run stops with exit 2 naming the missing subfolder and where st looked. The hub repository is a
snapshot in a temporary hub cache, read with HF_HUB_OFFLINE=1 (no network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.families import get_family
from pipeline.families.hidream import LLAMA_REPO
from pipeline.families.identity import ModelSources, model_identity

LLAMA_PARTS = ("text_encoder_4", "tokenizer_4")
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, model: Path) -> Path:
    """A hub cache holding LLAMA_REPO as one snapshot with `model`'s text_encoder_4/ and tokenizer_4/."""
    repo = root / ("models--" + LLAMA_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    for part in LLAMA_PARTS:
        shutil.copytree(model / part, repo / "snapshots" / SNAPSHOT / part)
    return root


@pytest.fixture(scope="module")
def split(tmp_path_factory, tiny_model) -> dict[str, Path]:
    """The tiny HiDream model without the Llama (as HiDream-ai ships it: not in model_index.json either), a hub cache
    holding the same model's Llama, one holding another model's and an empty one."""
    root = tmp_path_factory.mktemp("component-sources")
    full = tiny_model("hidream")
    lacking = root / "lacking"
    shutil.copytree(full, lacking, ignore=shutil.ignore_patterns(*LLAMA_PARTS))
    index = json.loads((lacking / "model_index.json").read_text())
    (lacking / "model_index.json").write_text(json.dumps({k: v for k, v in index.items() if k not in LLAMA_PARTS}))
    (root / "empty").mkdir()
    return {"full": full, "lacking": lacking, "hub": hub_cache(root / "hub", full),
            "other": other_llama(hub_cache(root / "other", full)), "empty": root / "empty"}  # fmt: skip


def other_llama(cache: Path) -> Path:
    """`cache` with its Llama's weights changed (another fine-tune of the same architecture)."""
    from safetensors.torch import load_file, save_file

    weights = next(cache.glob("models--*/snapshots/*/text_encoder_4/model.safetensors"))
    tensors = load_file(weights)
    tensors = {name: t + 0.01 if t.is_floating_point() else t for name, t in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    return cache


@pytest.fixture
def offline_hub(monkeypatch):
    """`use(cache)`: this process reads the hub only from the hub cache `cache`."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def use(cache: Path) -> None:
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    return use


def model_option(model: Path) -> tuple[str, str]:
    """The `--set` that points the run at `model`."""
    return "--set", f'pretrained_model_name_or_path="{model}"'


def test_cache_loads_the_missing_llama_from_its_hub_repository(cli, cached, split, offline_hub, tmp_path):
    setup = cached("hidream")
    offline_hub(split["hub"])
    result = cli("cache", "-c", setup[1], "-i", setup[0] / "prepare", "-o", tmp_path / "cache",
                 *model_option(split["lacking"]))  # fmt: skip
    assert result.exit_code == 0, result.stdout + result.stderr
    complete, lacking = (json.loads((c / "cache" / "manifest.json").read_text()) for c in (setup[0], tmp_path))
    assert lacking["model"]["text_encoders"][3]["source"] == LLAMA_REPO
    assert lacking["model"]["tokenizers"][3]["source"] == LLAMA_REPO
    assert lacking["model"]["text_encoders"][0]["source"] == str(split["lacking"])
    # The same Llama, read from elsewhere: the same cache key, embeddings and shards as the complete folder's.
    assert lacking["key"] == complete["key"]
    shared = Path(complete["embeds"]["path"])
    assert (tmp_path / "cache" / shared).read_bytes() == (setup[0] / "cache" / shared).read_bytes()
    assert sorted(p.name for p in (tmp_path / "cache" / "shards").iterdir()) == sorted(
        p.name for p in (setup[0] / "cache" / "shards").iterdir()
    )


def test_cache_without_the_llama_anywhere_exits_2_naming_where_it_looked(cli, cached, split, offline_hub, tmp_path):
    root, config = cached("hidream")
    offline_hub(split["empty"])
    result = cli("cache", "-c", config, "-i", root / "prepare", "-o", tmp_path / "cache",
                 *model_option(split["lacking"]))  # fmt: skip
    assert result.exit_code == 2, result.stdout + result.stderr
    message = " ".join((result.stdout + result.stderr).split())
    assert f"{split['lacking']}' has no text_encoder_4/" in message
    assert f"hub repository {LLAMA_REPO} (text_encoder_4/)" in message
    assert "not cached" in message


def test_identity_names_the_repository_and_changes_with_its_llama(split, offline_hub):
    family = get_family("hidream")
    sources = ModelSources(str(split["lacking"]), None, None, None)
    offline_hub(split["hub"])
    same = model_identity(family, sources)
    complete = model_identity(family, ModelSources(str(split["full"]), None, None, None))
    assert same["text_encoders"][3]["source"] == LLAMA_REPO
    assert same["text_encoders"][3]["weights_sha256"] == complete["text_encoders"][3]["weights_sha256"]
    assert same["text_encoders"][0] == {**complete["text_encoders"][0], "source": str(split["lacking"])}
    offline_hub(split["other"])
    other = model_identity(family, sources)
    assert other["text_encoders"][3]["weights_sha256"] != same["text_encoders"][3]["weights_sha256"]


@pytest.mark.parametrize(
    ("model", "hub", "says"),
    [
        ("full", "empty", "text_encoder_4/, tokenizer_4/: from the model folder"),
        ("lacking", "hub", f"not in the model folder; from the hub repository {LLAMA_REPO}"),
    ],
)
def test_check_says_where_the_llama_comes_from(cli, cached, split, offline_hub, model, hub, says):
    offline_hub(split[hub])
    result = cli("check", "-c", cached("hidream")[1], *model_option(split[model]))
    assert result.exit_code == 0, result.stdout
    assert says in " ".join(result.stdout.split())


def test_check_offline_without_the_llama_is_a_problem(cli, cached, split, offline_hub):
    offline_hub(split["empty"])
    result = cli("check", "-c", cached("hidream")[1], *model_option(split["lacking"]))
    assert result.exit_code == 2
    output = " ".join((result.stdout + result.stderr).split())
    assert "has no text_encoder_4/, tokenizer_4/" in output and f"lacks the hub repository {LLAMA_REPO}" in output
