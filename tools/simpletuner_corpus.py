"""Run SimpleTuner's own configs and documentation blocks through `st check` (and, with --prepare, `st prepare`).

Usage: python tools/simpletuner_corpus.py SIMPLETUNER_DIR [--prepare] [--json]

SIMPLETUNER_DIR is a SimpleTuner work tree (config/, simpletuner/examples/, documentation/). Each item runs in its own
temporary working folder laid out like SimpleTuner's repository root, because SimpleTuner resolves relative paths from
there: config/ holds config/'s files (each `X.example` also as `X`, as the quickstarts tell users to copy them) and
config/examples/ holds simpletuner/examples/ (the examples name `config/examples/...`). `st check --config ...` runs
as a separate process from that folder.

Items:
- every simpletuner/examples/*/config.json whose model_family is one st supports, or SimpleTuner's name of one;
- config/config.json.example;
- the ```json blocks of documentation/quickstart/{FLUX,SDXL,SD3,SIGMA}.md and documentation/DATALOADER.md. A
  quickstart's first dataset list is also written to config/multidatabackend.json in that quickstart's folders, where
  the quickstart tells users to put it.

Which blocks are checked (the fragment rule):
- a JSON object (trailing commas allowed, as st and SimpleTuner read them) that sets `model_family` (with or without
  `--`) is a config, checked as it is;
- a JSON array whose items are all objects with an `id` is a dataset list; a single object with both `id` and `type`
  is one dataset entry, checked as a one-entry list (unless it is a text_embeds / image_embeds cache entry, which holds
  no training data on its own). Each goes through `st check` with a minimal config for the
  document's family (DATALOADER.md: sdxl) that points `data_backend_config` at it;
- anything else is a "fragment": a partial config explaining one key, an option snippet that is not a JSON document,
  sample data. Fragments are counted and listed, never checked.

Each checked item is "ok" (exit 0), "refused" (every problem `st check` lists is a "does not implement" / "not
supported yet" refusal naming the feature) or "failed" (anything else; the first other problem is shown).

--prepare: for each checked item whose dataset entries are all local, create their folders with a few small generated images (plus .txt captions for caption_strategy textfile)
and run `st prepare`; the prepare column reports ok or the failure. A document's absolute placeholder folders
(/home/user/..., /path/to/...) are first moved under the working folder: that one string of the dataset list is
rewritten (the row's message says so), nothing else. Items whose check refused or failed, or whose
datasets are not all local, are reported as "-".
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import strip_trailing_commas
from pipeline.families import FAMILIES

# SimpleTuner's names for the families st supports, where they differ from st's.
FAMILY_NAMES = {**{name: name for name in FAMILIES}, "pixart": "pixart_sigma", "cosmos": "cosmos2image"}
QUICKSTARTS = {"FLUX": "flux", "SDXL": "sdxl", "SD3": "sd3", "SIGMA": "pixart_sigma", "QWEN_IMAGE": "qwen_image",
               "AURAFLOW": "auraflow", "LUMINA2": "lumina2", "SANA": "sana", "KOLORS": "kolors", "CHROMA": "chroma",
               "ZIMAGE": "z_image", "HIDREAM": "hidream", "COSMOS2IMAGE": "cosmos2image",
               "FLUX2": "flux2"}
DATALOADER_FAMILY = "sdxl"
REFUSAL = re.compile(r"does not implement|not supported yet")
MISSING_FOLDER = re.compile(r"instance_data_dir (/\S*) does not exist")
JSON_BLOCK = re.compile(r"^```json[ \t]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
EMBED_CACHES = ("text_embeds", "image_embeds")  # entries that hold no training data on their own
ABSOLUTE = "- (absolute dataset folder)"
IMAGES_PER_DATASET = 8  # a batch of SimpleTuner's default train_batch_size (4), twice


@dataclass
class Item:
    """One config or dataset list, with the files its working folder needs (relative path -> text)."""

    name: str
    kind: str  # "config", "dataset list" or "fragment"
    config: str = ""  # the --config path, relative to the working folder
    files: dict[str, str] = field(default_factory=dict)
    status: str = ""  # ok, refused, failed, fragment
    message: str = ""
    prepare: str = "-"
    relocated: list[str] = field(default_factory=list)  # absolute dataset folders moved under the working folder


def collect(source: Path) -> list[Item]:
    """Every item of the corpus, in a stable order."""
    items = []
    for path in sorted((source / "simpletuner/examples").glob("*/config.json")):
        family = _family_of(path.read_text())
        if family in FAMILY_NAMES:
            name = path.parent.name
            items.append(Item(f"examples/{name}", "config", f"config/examples/{name}/config.json"))
    example = source / "config/config.json.example"
    if example.is_file():
        items.append(Item("config/config.json.example", "config", "config/config.json.example"))
    for doc, family in QUICKSTARTS.items():
        items += _doc_items(source / f"documentation/quickstart/{doc}.md", f"quickstart/{doc}", family, quickstart=True)
    items += _doc_items(source / "documentation/DATALOADER.md", "DATALOADER", DATALOADER_FAMILY, quickstart=False)
    return items


def _family_of(text: str) -> str | None:
    try:
        data = json.loads(strip_trailing_commas(text))
    except json.JSONDecodeError:
        return None
    return _option(data, "model_family") if isinstance(data, dict) else None


def _option(data: dict[str, Any], name: str) -> Any:
    return data.get(name, data.get(f"--{name}"))


def _doc_items(path: Path, label: str, family: str, quickstart: bool) -> list[Item]:
    if not path.is_file():
        return []
    items, first_list = [], None
    for number, block in enumerate(JSON_BLOCK.findall(path.read_text()), 1):
        name = f"{label}#{number}"
        data, kind = _block_kind(block)
        if kind == "config":
            items.append(Item(name, kind, f"corpus/{number}.json", {f"corpus/{number}.json": block}))
        elif kind == "dataset list":
            entries = data if isinstance(data, list) else [data]
            listing = json.dumps(entries, indent=2)
            first_list = first_list or listing
            config = {"model_family": family, "model_type": "lora", "data_backend_config": f"corpus/{number}.json"}
            items.append(Item(name, kind, f"corpus/{number}.config.json",
                              {f"corpus/{number}.json": listing, f"corpus/{number}.config.json": json.dumps(config)}))
        else:
            items.append(Item(name, "fragment", status="fragment", message=_first_line(block)))
    if quickstart and first_list:
        for item in items:
            if item.kind == "config":
                item.files.setdefault("config/multidatabackend.json", first_list)
    return items


def _block_kind(block: str) -> tuple[Any, str]:
    try:
        data = json.loads(strip_trailing_commas(block))
    except json.JSONDecodeError:
        return None, "fragment"
    if isinstance(data, dict) and _option(data, "model_family") is not None:
        return data, "config"
    if isinstance(data, list) and data and all(isinstance(entry, dict) and "id" in entry for entry in data):
        return data, "dataset list"
    if isinstance(data, dict) and "id" in data and "type" in data and data.get("dataset_type") not in EMBED_CACHES:
        return data, "dataset list"
    return data, "fragment"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() not in ("", "{", "[")]
    return lines[0][:80] if lines else ""


def build_layout(source: Path, base: Path) -> None:
    """SimpleTuner's repository root as its configs expect it: config/ (with copies of the .example files under
    their plain names) and config/examples/."""
    config = base / "config"
    shutil.copytree(source / "config", config)
    for example in config.glob("*.example"):
        shutil.copyfile(example, example.with_suffix(""))
    shutil.copytree(source / "simpletuner/examples", config / "examples")


def st_command() -> list[str]:
    beside = Path(sys.executable).parent / "st"
    found = str(beside) if beside.exists() else shutil.which("st")
    if found is None:
        raise SystemExit("the `st` command is not on the PATH; install st (`make setup`) or activate its venv")
    return [found]


def run_item(item: Item, base: Path, workdir: Path, prepare: bool) -> None:
    shutil.copytree(base, workdir, symlinks=True)
    for relative, text in item.files.items():
        (workdir / relative).parent.mkdir(parents=True, exist_ok=True)
        (workdir / relative).write_text(text)
    datasets = local_datasets(item, workdir)
    if prepare and datasets == ABSOLUTE:
        relocate_absolute_folders(item, workdir)
        datasets = local_datasets(item, workdir)
    if isinstance(datasets, list):
        for entry in datasets:
            make_dataset(workdir / str(entry["instance_data_dir"]), entry)
    result = subprocess.run([*st_command(), "check", "--config", item.config], cwd=workdir, check=False,
                            capture_output=True, text=True)  # fmt: skip
    item.status, item.message = classify(result.returncode, result.stdout + result.stderr)
    if item.status == "ok" and item.relocated:
        item.message = "absolute dataset folders placed under the working folder: " + ", ".join(item.relocated)
    if prepare and item.status == "ok":
        item.prepare = run_prepare(item, workdir) if isinstance(datasets, list) else datasets


def classify(returncode: int, output: str) -> tuple[str, str]:
    """ok / refused / no data / failed, and the message a reader needs: the refused features, the missing folders, or
    the first other problem. "no data": the only problems are dataset folders at absolute paths (a document's
    placeholders such as /path/to/data), which the tool does not create outside its working folder."""
    problems = [line[4:] for line in output.splitlines() if line.startswith("  - ")]
    if returncode == 0:
        return "ok", ""
    if not problems:
        return "failed", output.strip().splitlines()[-1] if output.strip() else f"exit {returncode}"
    missing = [found.group(1) for found in map(MISSING_FOLDER.search, problems) if found]
    others = [problem for problem in problems if not REFUSAL.search(problem) and not MISSING_FOLDER.search(problem)]
    if returncode != 2 or others:
        return "failed", (others or problems)[0]
    refusals = [_feature(problem) for problem in problems if REFUSAL.search(problem)]
    if refusals:
        return "refused", " | ".join(refusals)
    return "no data", "dataset folder(s) " + ", ".join(missing)


def _feature(problem: str) -> str:
    """The short form of a refusal: `option` and feature, or the unsupported thing."""
    found = re.search(r"st does not implement (.*?) yet(?:: ([^;]*))?", problem)
    if found:
        return f"{found.group(1)}: {found.group(2)}" if found.group(2) else found.group(1)
    found = re.search(r"([^:;]*not supported yet)", problem)
    return found.group(1).strip() if found else problem


def _dataset_list(item: Item, workdir: Path) -> tuple[Path | None, Any]:
    """The item's dataset list file and its entries (None when unreadable)."""
    try:
        config = json.loads(strip_trailing_commas((workdir / item.config).read_text()))
        listing = _option(config, "data_backend_config")
        path = workdir / listing if listing else None
        return path, json.loads(strip_trailing_commas(path.read_text())) if path else None
    except (OSError, json.JSONDecodeError, TypeError):
        return None, None


def relocate_absolute_folders(item: Item, workdir: Path) -> None:
    """Rewrite each absolute `instance_data_dir` of the item's dataset list to the same path under the working folder."""
    path, entries = _dataset_list(item, workdir)
    for entry in entries:
        folder = entry.get("instance_data_dir") if isinstance(entry, dict) else None
        if isinstance(folder, str) and Path(folder).is_absolute():
            entry["instance_data_dir"] = str(Path("absolute") / Path(folder).relative_to("/"))
            item.relocated.append(folder)
    path.write_text(json.dumps(entries, indent=2))


def local_datasets(item: Item, workdir: Path) -> list[dict[str, Any]] | str:
    """The item's image dataset entries when all are local with relative folders (SimpleTuner's layout), else the
    reason they are not created."""
    _, entries = _dataset_list(item, workdir)
    if not isinstance(entries, list):
        return "- (no readable dataset list)"
    embeds = {entry.get(key) for entry in entries if isinstance(entry, dict) for key in EMBED_CACHES}
    images = [entry for entry in entries if isinstance(entry, dict) and entry.get("id") not in embeds
              and entry.get("dataset_type", "image") == "image" and not entry.get("disabled")]  # fmt: skip
    if not images or any(entry.get("type", "local") != "local" for entry in images):
        return "- (datasets not all local)"
    if any(not isinstance(entry.get("instance_data_dir"), str) or Path(entry["instance_data_dir"]).is_absolute()
           for entry in images):  # fmt: skip
        return ABSOLUTE
    return images


def run_prepare(item: Item, workdir: Path) -> str:
    """Run `st prepare` on the item (its dataset folders already made); "ok" or the failure."""
    command = [*st_command(), "prepare", "--config", item.config, "--output", "prepared"]
    result = subprocess.run(command, cwd=workdir, check=False, capture_output=True, text=True)
    if result.returncode == 0:
        return "ok"
    lines = (result.stdout + result.stderr).strip().splitlines()
    return f"failed: {lines[-1] if lines else f'exit {result.returncode}'}"


def make_dataset(folder: Path, entry: dict[str, Any]) -> None:
    """A few generated images large enough for the entry's size limits, captioned as its caption_strategy reads."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    side = 1024
    for key in ("minimum_image_size", "resolution"):
        value = entry.get(key)
        if isinstance(value, (int, float)) and value > 16:
            side = max(side, int(value))
    for index in range(IMAGES_PER_DATASET):
        shade = 40 + 60 * index
        image = Image.linear_gradient("L").resize((side, side)).convert("RGB")
        image = Image.blend(image, Image.new("RGB", (side, side), (shade, 255 - shade, 128)), 0.5)
        stem = f"a photo of sample {index}"
        image.save(folder / f"{stem}.jpg", quality=85)
        if entry.get("caption_strategy") == "textfile":
            (folder / f"{stem}.txt").write_text(f"{stem}\n")


def run(source: Path, prepare: bool) -> list[Item]:
    items = collect(source)
    with tempfile.TemporaryDirectory(prefix="st-corpus-") as temp:
        base = Path(temp) / "base"
        build_layout(source, base)
        for number, item in enumerate(items):
            if item.kind != "fragment":
                run_item(item, base, Path(temp) / f"item{number}", prepare)
    return items


def table(items: list[Item], prepare: bool) -> str:
    header = ["item", "kind", "status", *(["prepare"] if prepare else []), "message"]
    rows = [[i.name, i.kind, i.status, *([i.prepare] if prepare else []), i.message] for i in items]
    widths = [max(len(str(row[c])) for row in [header, *rows]) for c in range(len(header) - 1)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + "  " + str(row[-1])
             for row in [header, *rows]]  # fmt: skip
    return "\n".join(line.rstrip() for line in lines)


def totals(items: list[Item], prepare: bool) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item.status] = counts.get(item.status, 0) + 1
        if prepare and item.prepare != "-" and not item.prepare.startswith("- "):
            key = "prepare ok" if item.prepare == "ok" else "prepare failed"
            counts[key] = counts.get(key, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("simpletuner_dir", type=Path)
    parser.add_argument("--prepare", action="store_true", help="also create local datasets and run `st prepare`")
    parser.add_argument("--json", action="store_true", help="print the rows and totals as JSON")
    args = parser.parse_args(argv)
    if not (args.simpletuner_dir / "simpletuner/examples").is_dir():
        parser.error(f"{args.simpletuner_dir} has no simpletuner/examples folder; pass a SimpleTuner work tree")
    items = run(args.simpletuner_dir.resolve(), args.prepare)
    counts = totals(items, args.prepare)
    if args.json:
        rows = [{k: v for k, v in asdict(item).items() if k != "files"} for item in items]
        print(json.dumps({"items": rows, "totals": counts}, indent=2))
    else:
        print(table(items, args.prepare))
        print("totals: " + ", ".join(f"{key} {value}" for key, value in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
