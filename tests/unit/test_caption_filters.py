"""Caption filters and caption shuffling against SimpleTuner's own results (PromptHandler.filter_captions and
CaptionShuffler.expand_with_shuffles, run on the same inputs; st then collapses spaces as in every caption)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.datasets import CaptionShuffle, load_caption_filters
from pipeline.errors import ConfigError, InputError
from pipeline.prepare.captions import filtered, shuffled

FILTERS = ("arafed ", "this .* has a", "^there is ", "s/cat/dog", "[unclosed", "a+b")


@pytest.mark.parametrize(
    ("caption", "simpletuner"),
    [
        ("arafed cat sitting", "dog sitting"),
        ("there is a cat, this photo has a cat", "a dog,  dog"),
        ("a+b and aab, a cat [unclosed", " and , a dog "),
        ("cats and cat", "dogs and dog"),
    ],
)
def test_filters_match_simpletuner(caption, simpletuner):
    assert filtered(caption, FILTERS) == " ".join(simpletuner.split())


def test_substitution_forms():
    assert filtered("a cat and a cat", ("s/cat/dog",)) == "a dog and a dog"  # every match, as re.sub
    assert filtered("a cat", ("s/c(a)t/b\\1t/",)) == "a bat"  # DEVIATION: the documented trailing-slash form
    assert filtered("a/b/c/d", ("s/b/c/d",)) == "a/b/c/d"  # more slashes: text to remove, not found here
    assert filtered("arafed", ("arafed",)) == ""  # an emptied caption is the empty prompt


@pytest.mark.parametrize(
    ("caption", "block", "simpletuner"),
    [
        ("dog, running, park, sunny day", CaptionShuffle(count=2, seed=42, position_start=1),
         ["dog, running, park, sunny day", "dog, park, running, sunny day", "dog, sunny day, running, park"]),
        ("a b c d e f", CaptionShuffle(count=3, seed=7, split_on="space"),
         ["a b c d e f", "b f e d c a", "c d a e b f", "d c f a e b"]),
        ("one. two. three", CaptionShuffle(count=5, split_on="period", include_original=False),
         ["three. two. one", "one. three. two", "one. two. three", "two. one. three"]),
        ("solo", CaptionShuffle(count=2, include_original=False), ["solo"]),
        ("x, y", CaptionShuffle(count=4, seed=1), ["x, y", "y, x"]),
    ],
)  # fmt: skip
def test_shuffle_matches_simpletuner(caption, block, simpletuner):
    assert shuffled(caption, block) == simpletuner


@pytest.fixture
def loaded(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"data_backend_config": "multidatabackend.json"}))
    return load_config(tmp_path / "config.json")


def test_filter_files_load_as_simpletuner_reads_them(tmp_path: Path, loaded):
    listing = tmp_path / "multidatabackend.json"
    (tmp_path / "f.txt").write_bytes(b"arafed \r\n^there is\r\n\r\ns/a/b/\n")
    assert load_caption_filters("f.txt", loaded, listing, "d", "e") == ("arafed ", "^there is", "s/a/b/")
    (tmp_path / "f.json").write_text(json.dumps(["x", "s/y/z"]))
    assert load_caption_filters("f.json", loaded, listing, "d", "e") == ("x", "s/y/z")
    assert load_caption_filters(["a", ""], loaded, listing, "d", "e") == ("a",)
    assert load_caption_filters([], loaded, listing, "d", "e") == ()
    (tmp_path / "bad.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(ConfigError, match="must hold a JSON list of filters"):
        load_caption_filters("bad.json", loaded, listing, "d", "e")
    with pytest.raises(InputError, match=r"dataset 'd': caption_filter_list of text_embeds dataset 'e'.*nope\.txt"):
        load_caption_filters("nope.txt", loaded, listing, "d", "e")
    with pytest.raises(ConfigError, match="must be a list of strings"):
        load_caption_filters([1, 2], loaded, listing, "d", "e")
