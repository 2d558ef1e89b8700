"""Caption strategies: filename, textfile, parquet, instanceprompt (SimpleTuner's names and meanings).

- filename: the file's stem with underscores read as spaces.
- textfile: `<stem>.txt` beside the image; each non-empty line is one caption (a sample may have several).
- parquet: a table maps file names (with or without extension) to a caption column, with an optional fallback column;
  a cell may hold one string or a list of strings.
- instanceprompt: every image gets `instance_prompt`.
`prepend_instance_prompt` puts the instance prompt before each caption; `only_instance_prompt` replaces them.

Then, in SimpleTuner's order: `disable_multiline_split` reads a caption file as one caption (its line breaks kept);
`caption_shuffle` adds tag-reordered copies of each caption (before the instance prompt is prepended); the text_embeds
entry's `caption_filter_list` rewrites every caption last (SimpleTuner filters each prompt as it encodes it).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path
from typing import Any

from ..datasets import CaptionShuffle, DatasetSpec, ParquetCaptions, substitution
from ..errors import InputError
from .walk import NotRegularFile, read_regular_file

_SPACES = re.compile(r"\s+")


class MissingCaption(Exception):
    """The image has no usable caption; the message says why."""


def clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def tidy(text: str) -> str:
    """`clean` line by line: a caption's own line breaks (disable_multiline_split) stay, blank lines go."""
    if "\n" not in text and "\r" not in text:
        return clean(text)
    return "\n".join(line for line in (clean(part) for part in text.splitlines()) if line)


def caption_file_for(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + ".txt"


def read_textfile(path: str, multiline_split: bool = True) -> list[str]:
    """Each non-empty line is one caption; with `multiline_split` false the whole file is one caption.
    DEVIATION: SimpleTuner then keeps the file's text as it is; st keeps its line breaks but drops blank lines and
    collapses spaces, as it does in every caption."""
    try:
        text = read_regular_file(path).decode("utf-8", errors="replace")
    except FileNotFoundError:
        reason = "a broken symlink" if os.path.islink(path) else "missing"
        raise MissingCaption(f"caption file {os.path.basename(path)} is {reason}") from None
    except NotRegularFile as exc:
        raise MissingCaption(f"caption file {exc}") from None
    except OSError as exc:
        raise MissingCaption(f"caption file {os.path.basename(path)} cannot be read: {exc.strerror or exc}") from None
    captions = [tidy(text)] if not multiline_split else [clean(line) for line in text.splitlines()]
    captions = [c for c in captions if c]
    if not captions:
        raise MissingCaption(f"caption file {os.path.basename(path)} is empty")
    return captions


class ParquetCaptionTable:
    """Captions looked up by relative path, file name, or stem, as the table's identifiers allow."""

    def __init__(self, spec: ParquetCaptions, dataset_id: str) -> None:
        import pyarrow.parquet as pq

        if not spec.path.is_file():
            raise InputError(f"dataset '{dataset_id}': caption parquet {spec.path} does not exist")
        try:
            table = pq.read_table(spec.path)
        except Exception as exc:  # pyarrow raises several unrelated types for bad files
            raise InputError(f"dataset '{dataset_id}': cannot read caption parquet {spec.path}: {exc}") from None
        columns = set(table.column_names)
        for role, name in (
            ("filename_column", spec.filename_column),
            ("caption_column", spec.caption_column),
            ("fallback_caption_column", spec.fallback_caption_column),
        ):
            if name is not None and name not in columns:
                source = f"parquet.{role}" + (f", else the global parquet_{role}" if role != "fallback_caption_column"
                                              else "")  # fmt: skip
                raise InputError(
                    f"dataset '{dataset_id}': {spec.path} has no column '{name}' ({source}); "
                    f"its columns are: {', '.join(sorted(columns))}"
                )
        names = table.column(spec.filename_column).to_pylist()
        captions = table.column(spec.caption_column).to_pylist()
        fallback = (
            table.column(spec.fallback_caption_column).to_pylist()
            if spec.fallback_caption_column
            else [None] * len(names)
        )
        self.spec = spec
        self._rows: dict[str, tuple[Any, Any]] = {}
        for name, caption, alt in zip(names, captions, fallback):
            if name is None:
                continue
            key = str(name).replace("\\", "/").lstrip("./")
            self._rows.setdefault(key, (caption, alt))

    def lookup(self, rel_path: str) -> list[str]:
        """Captions of the image at `rel_path` (relative to the dataset root, '/' separated)."""
        stem_path = os.path.splitext(rel_path)[0]
        name = rel_path.rsplit("/", 1)[-1]
        candidates = (rel_path, name) if self.spec.identifier_includes_extension else (stem_path, name.rsplit(".", 1)[0])
        # Tables that carry extensions while the flag says otherwise (and vice versa) are common; try both forms.
        candidates += (rel_path, name, stem_path, name.rsplit(".", 1)[0])
        for key in candidates:
            if key in self._rows:
                caption, alt = self._rows[key]
                found = _as_list(caption) or _as_list(alt)
                if not found:
                    raise MissingCaption(f"the parquet row for {name} has an empty caption")
                return found
        raise MissingCaption(f"{name} has no row in {self.spec.path.name}")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [c for c in (clean(str(v)) for v in value if v is not None) if c]
    text = clean(str(value))
    return [text] if text else []


def captions_for(spec: DatasetSpec, rel_path: str, abs_path: str, table: ParquetCaptionTable | None) -> list[str]:
    """The captions of one image under the dataset's strategy; raises MissingCaption."""
    strategy = spec.caption_strategy
    if spec.only_instance_prompt or strategy == "instanceprompt":
        return [clean(spec.instance_prompt or "")]
    if strategy == "filename":
        stem = Path(rel_path).stem
        captions = [clean(stem.replace("_", " "))]
    elif strategy == "textfile":
        captions = read_textfile(caption_file_for(abs_path), multiline_split=not spec.disable_multiline_split)
    elif strategy == "parquet":
        if table is None:
            raise MissingCaption("no caption table")
        captions = table.lookup(rel_path)
    else:  # pragma: no cover - config validation rejects other values
        raise MissingCaption(f"unknown caption_strategy {strategy}")
    if spec.caption_shuffle is not None:
        captions = [variant for caption in captions for variant in shuffled(caption, spec.caption_shuffle)]
    if spec.prepend_instance_prompt and spec.instance_prompt:
        captions = [tidy(f"{spec.instance_prompt} {c}") for c in captions]
    if spec.caption_filters:
        captions = [filtered(c, spec.caption_filters) for c in captions]
    return captions


_SPLIT = {"comma": (",", ", "), "space": (" ", " "), "period": (".", ". ")}


def shuffled(caption: str, shuffle: CaptionShuffle) -> list[str]:
    """SimpleTuner's CaptionShuffler.expand_with_shuffles: the caption (unless include_original is false) and
    `count` copies with the tags after the first `position_start` reordered, each seeded by seed + the caption's
    md5 + its index; copies equal to one already listed are dropped. Fewer than two tags to move: the caption
    alone. `st train` then picks one of a sample's captions at random each time, as SimpleTuner does."""
    split_char, delimiter = _SPLIT[shuffle.split_on]
    parts = [p.strip() for p in caption.split(split_char) if p.strip()]
    fixed, movable = parts[: shuffle.position_start], parts[shuffle.position_start :]
    if len(movable) <= 1:
        return [caption]
    results = [caption] if shuffle.include_original else []
    caption_hash = int(hashlib.md5(caption.encode("utf-8")).hexdigest(), 16) & 0xFFFFFFFF
    for i in range(shuffle.count):
        order = movable.copy()
        random.Random((shuffle.seed or 0) + caption_hash + i).shuffle(order)
        result = delimiter.join(fixed + order)
        if result not in results:
            results.append(result)
    return results or [caption]


def filtered(caption: str, filters: tuple[str, ...]) -> str:
    """SimpleTuner's PromptHandler.filter_captions, filter by filter in order: a substitution (`s/search/replace`)
    replaces every match of `search`; any other filter's text is removed wherever it occurs; then every filter is
    also used as a regular expression whose matches are removed (a filter that is no regular expression skips
    that). The result has its spaces collapsed, as every st caption; it may be empty (the empty prompt)."""
    for item in filters:
        sub = substitution(item)
        if sub is not None:
            caption = re.sub(sub[0], sub[1], caption)
        else:
            caption = caption.replace(item, "")
        try:
            caption = re.sub(item, "", caption)
        except re.error:
            pass
    return tidy(caption)
