"""Everything `st` prints on stdout: plain-text tables and the summary line of each command.

Commands in `cli.py` run a stage and hand its result here, so a change of wording is made in one place. Log lines
go through `pipeline.log`; the reports of `st status` and `st verify` are formatted beside their checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

MANIFEST = "manifest.json"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell; columns listed in `right` are right-aligned (numbers)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def show_value(value: Any) -> str:
    """An option's value as a config.json spells it (null, true, 0.0001, [...]); strings without quotes."""
    return value if isinstance(value, str) else json.dumps(value)


def bucket_table(manifest: dict[str, Any]) -> str:
    """Buckets of a prepare manifest: one row per (dataset, bucket), with a total."""
    rows = []
    for dataset in manifest["datasets"]:
        for bucket, count in dataset["buckets"].items():
            width, height = bucket.split("@")[0].split("x")
            raised = dataset.get("repeats_raised", {}).get(bucket)
            repeats = raised if raised is not None else dataset["repeats"]
            rows.append([dataset["id"], bucket, f"{int(width) / int(height):.2f}", count, repeats])
    rows.append(["total", f"{len(manifest['buckets'])} buckets", "", manifest["stats"]["samples"], ""])
    return format_table(["dataset", "bucket", "aspect", "samples", "repeats"], rows, right=(2, 3, 4))


def conditioning_summary(manifest: dict[str, Any]) -> str | None:
    """`conditioning: edges (controlnet) 7 paired, ...` for a prepare manifest with paired data; None without."""
    listed = manifest.get("conditioning_datasets")
    if not listed:
        return None
    parts = [f"{c['id']} ({c['conditioning_type']}{', generated' if c.get('generator') else ''}) {c['paired']} paired"
             for c in listed]  # fmt: skip
    return "conditioning: " + ", ".join(parts)


def skipped_summary(manifest: dict[str, Any]) -> str:
    """`skipped: none`, or the count of each reason."""
    skipped = manifest["stats"].get("skipped") or {}
    if not skipped:
        return "skipped: none"
    return "skipped: " + ", ".join(f"{reason} {count}" for reason, count in skipped.items())


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def cache_table(manifest: dict[str, Any]) -> str:
    """Shards of a cache manifest per (dataset, bucket), with sizes."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for shard in manifest["shards"]:
        groups.setdefault((shard["dataset_id"], shard["bucket"]), []).append(shard)
    rows = []
    for (dataset, bucket), shards in sorted(groups.items()):
        samples = sum(s["samples"] for s in shards)
        size = sum(s["bytes"] for s in shards)
        rows.append([dataset, bucket, len(shards), samples, _size(size), _size(size // max(samples, 1))])
    total = sum(s["bytes"] for s in manifest["shards"])
    rows.append(["total", f"{len(groups)} groups", len(manifest["shards"]), manifest["stats"]["samples"], _size(total), ""])
    table = format_table(["dataset", "bucket", "shards", "samples", "bytes", "per sample"], rows, right=(2, 3, 4, 5))
    return f"{table}\n{skipped_summary(manifest)}"


# --- what each command prints ---------------------------------------------------------------------------------------


def _state(result: Any, wrote: str = "wrote") -> str:
    return "up to date" if result.up_to_date else wrote


def prepare_done(result: Any, output: Path) -> str:
    """The buckets, the skipped samples and where the manifest is."""
    lines = [bucket_table(result.manifest), conditioning_summary(result.manifest), skipped_summary(result.manifest),
             f"prepare: {_state(result)} {output / MANIFEST}"]  # fmt: skip
    return "\n".join(line for line in lines if line is not None)


def cache_part_done(result: Any, output: Path, part: str) -> str:
    return f"cache: part {part} written to {output} ({result.encoded} encoded, {result.reused} reused)"


def cache_done(result: Any, output: Path) -> str:
    """The shards per bucket and what this run encoded."""
    state = _state(result, f"wrote ({result.encoded} encoded, {result.reused} reused)")
    return f"{cache_table(result.manifest)}\ncache: {state} {output / MANIFEST}"


def cache_merged(result: Any, parts: int, output: Path) -> str:
    return f"{cache_table(result.manifest)}\ncache: merged {parts} part(s) into {output / MANIFEST}"


def train_interrupted(result: Any, output: Path) -> str:
    return (f"train: stopped by {result.interrupted}; a checkpoint was saved under {output / 'checkpoints'}"
            "; run the same `st train` again to continue from it")  # fmt: skip


def train_done(result: Any, output: Path) -> str:
    """Steps and losses of the run (and of the resumed part), and where the weights are."""
    metrics, stats = result.manifest["metrics"], result.manifest["stats"]
    loss = metrics.get("final_loss")
    lines = [f"train: {metrics['steps']} steps, final loss {loss:.4f}" if loss is not None else "train: done"]
    resumed = stats.get("resumed_from")
    if resumed and not result.up_to_date:
        lines.append(f"train: resumed from {resumed['checkpoint']} (step {resumed['step']}); "
                     f"{stats['steps_this_run']} step(s) trained by this run")  # fmt: skip
    if metrics.get("first_eval_loss") is not None and metrics.get("final_eval_loss") is not None:
        lines.append(f"train: eval loss {metrics['first_eval_loss']:.4f} -> {metrics['final_eval_loss']:.4f}")
    lines.append(f"train: {_state(result)} {output / MANIFEST} (weights in {output / 'final'})")
    return "\n".join(lines)


def publish_done(result: Any, output: Path) -> str:
    """The weight files, the uploads and where the model card is."""
    lines = [f"publish: {w['path']} ({w['format']}, {w['bytes']} bytes)" for w in result.manifest["weights"]]
    lines += [f"publish: uploaded to {r.get('destination', r.get('provider', '?'))}" for r in result.uploads]
    lines.append(f"publish: {_state(result)} {output / MANIFEST}")
    lines.append(f"published model: {output.resolve()} (model card: {output / 'README.md'})")
    return "\n".join(lines)


def tiny_model_written(family: str, output: Path) -> str:
    return f"tiny {family} model written to {output}"


def sample_data_written(images: int, output: Path, config: Path) -> str:
    return f"sample data: {images} images under {output}; config {config}"


def status_json(rows: Sequence[Any]) -> str:
    return as_json({"ok": all(r.ok for r in rows), "stages": [r.to_dict() for r in rows]})


def verify_failed(failed: int, total: int) -> str:
    return f"verify: {failed} of {total} manifest(s) failed"


def check_report(report: Any) -> str:
    """What `st check` looked at, then each problem with its fix, or the ok line; then, with --any-machine, what
    the machine that trains needs (not problems)."""
    if report.ok:
        lines = [f"check: ok ({'; '.join(report.checked)})"]
    else:
        lines = [f"check: {len(report.problems)} problem(s) in {report.config}:"]
        lines += [f"  - {problem}" for problem in report.problems]
    needs = getattr(report, "machine_needs", ())
    if needs:
        lines.append("the machine that runs `st train` needs (this one lacks it):")
        lines += [f"  * {need}" for need in needs]
    return "\n".join(lines)


DEFAULT_WIDTH = 40  # `st options` shortens longer defaults


def options_table(rows: Sequence[Any]) -> str:
    """`st options`: one row per option (see `pipeline.option_list.OptionInfo`), then the count."""

    def default(row: Any) -> str:  # an option no stage reads has no default unless the reference names one
        shown = "-" if row.default is None and row.type == "-" else show_value(row.default)
        shown = " ".join(shown.split())  # a multi-line default (Sana's instruction) stays on its row
        return shown if len(shown) <= DEFAULT_WIDTH else shown[: DEFAULT_WIDTH - 3] + "..."  # --json has it whole

    table = format_table(["option", "type", "default", "stages", "key", "simpletuner", "notes"],
                         [[r.name, r.type, default(r), ",".join(r.stages) or "-", r.in_key, r.state, r.notes]
                          for r in rows])  # fmt: skip
    return f"{table}\n{len(rows)} option(s)" if rows else "no option matches"


def effective_config(effective: Any) -> str:
    """`st config show`: each option's value and origin, then the SimpleTuner options st sets aside."""
    rows = [[o.name, show_value(o.value), o.origin] for o in effective.options]
    lines = [f"config: {effective.config}",
             format_table(["option", "value", "origin"], rows) if rows else "every option at its default"]  # fmt: skip
    if effective.set_aside:
        lines.append("set aside (st reads them nowhere):")
        lines += [f"  {s.name} = {show_value(s.value)} ({s.origin}): {s.reason}" for s in effective.set_aside]
    return "\n".join(lines)


def as_json(data: Any) -> str:
    """JSON for `--json` (values JSON cannot hold, such as paths, as strings)."""
    return json.dumps(data, indent=2, default=str)
