"""The `st` command line: one subcommand per stage, plus helpers for tiny models and sample data."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, List, Optional, TypeVar

import typer

from .errors import UserError
from .log import configure, get_logger

app = typer.Typer(
    name="st",
    help="Fine-tune text-to-image diffusion models in stages: prepare -> cache -> train -> publish.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
log = get_logger()
_state = {"verbose": False}
T = TypeVar("T")

ConfigOpt = typer.Option(..., "--config", "-c", help="config.json / config.toml with SimpleTuner option names.")
OutputOpt = typer.Option(..., "--output", "-o", help="Folder this stage writes (created if needed).")
InputOpt = typer.Option(..., "--input", "-i", help="The previous stage's manifest.json (or its folder).")
SetOpt = typer.Option([], "--set", help="Override an option: --set key=value (value read as a TOML literal).")
ForceOpt = typer.Option(False, "--force", help="Run even when the output is up to date.")


def _guarded(action: Callable[[], T]) -> T:
    """Run a command body: user errors print one message and exit 2; -v adds the traceback."""
    try:
        return action()
    except UserError as exc:
        if _state["verbose"]:
            traceback.print_exc()
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


@app.callback()
def main_options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging and tracebacks for errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only warnings and errors."),
) -> None:
    _state["verbose"] = verbose
    if not verbose:
        # transformers warns at import time about optional image-processor backends st never uses.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    configure(verbose=verbose, quiet=quiet)


@app.command()
def prepare(
    config: Path = ConfigOpt,
    output: Path = OutputOpt,
    set_: List[str] = SetOpt,
    strict: bool = typer.Option(False, "--strict", help="Fail instead of skipping unusable images."),
    force: bool = ForceOpt,
) -> None:
    """Scan image folders and captions into an aspect-bucket manifest (samples.parquet)."""

    def body() -> None:
        from .config import load_config
        from .prepare.stage import run_prepare
        from .report import bucket_table, skipped_summary

        loaded = load_config(config, set_)
        with stage_notifications(loaded, "prepare"):
            result = run_prepare(loaded, output, strict=strict, force=force)
        typer.echo(bucket_table(result.manifest))
        typer.echo(skipped_summary(result.manifest))
        state = "up to date" if result.up_to_date else "wrote"
        typer.echo(f"prepare: {state} {output / 'manifest.json'}")

    _guarded(body)


@contextlib.contextmanager
def stage_notifications(loaded, stage: str):
    """Webhook events (start, finished, error) around a stage that has no finer-grained ones."""
    from . import notify
    from .distributed import rank_and_world

    notifier = notify.Notifier.from_config(loaded.config, loaded.base_dir, stage=stage,
                                           main_process=rank_and_world()[0] == 0)  # fmt: skip
    notifier.start({"stage": stage})
    try:
        yield notifier
    except BaseException as exc:
        notifier.error(f"{stage} failed: {exc}")
        raise
    else:
        notifier.finished({"stage": stage})
    finally:
        notifier.close(timeout=5)


cache_app = typer.Typer(
    help="Encode latents and text embeddings into content-addressed webdataset shards.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(cache_app, name="cache")


@cache_app.callback()
def cache(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="config.json / config.toml."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="The prepare manifest.json (or its folder)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Folder this stage writes."),
    set_: List[str] = SetOpt,
    part: Optional[str] = typer.Option(None, "--part", help="Encode only part i of n (i/n); combine with `merge`."),
    force: bool = ForceOpt,
    strict: bool = typer.Option(False, "--strict", help="Fail instead of skipping images that cannot be decoded."),
) -> None:
    """Encode latents and text embeddings into content-addressed webdataset shards."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"config": config, "input": input, "set": set_}
        return

    def body() -> None:
        from .cache.stage import run_cache
        from .config import load_config
        from .report import cache_table

        _require(config=config, input=input, output=output)
        loaded = load_config(config, set_)
        with stage_notifications(loaded, "cache"):
            result = run_cache(loaded, input, output, part=part, force=force, strict=strict)
        if result.manifest is None:
            typer.echo(f"cache: part {part} written to {output} ({result.encoded} encoded, {result.reused} reused)")
            return
        typer.echo(cache_table(result.manifest))
        state = "up to date" if result.up_to_date else f"wrote ({result.encoded} encoded, {result.reused} reused)"
        typer.echo(f"cache: {state} {output / 'manifest.json'}")

    _guarded(body)


@cache_app.command("merge")
def cache_merge(
    ctx: typer.Context,
    parts: List[Path] = typer.Argument(..., help="Output folders of `st cache --part i/n` runs."),
    output: Path = OutputOpt,
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="The config the parts were run with."),
    input: Optional[Path] = typer.Option(None, "--input", "-i", help="The prepare manifest the parts read."),
    set_: List[str] = SetOpt,
) -> None:
    """Combine `st cache --part i/n` outputs into one cache output (same manifest as a single run)."""

    def body() -> None:
        from .cache.stage import merge_parts
        from .config import load_config
        from .report import cache_table

        group = ctx.obj or {}
        cfg = config or group.get("config")
        inp = input or group.get("input")
        _require(config=cfg, input=inp)
        result = merge_parts(load_config(cfg, [*group.get("set", []), *set_]), inp, parts, output)
        typer.echo(cache_table(result.manifest))
        typer.echo(f"cache: merged {len(parts)} part(s) into {output / 'manifest.json'}")

    _guarded(body)


def _require(**values: object) -> None:
    from .errors import ConfigError

    missing = [f"--{name}" for name, value in values.items() if value is None]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}; see `st cache --help`")


@app.command()
def train(
    config: Path = ConfigOpt,
    input: Path = InputOpt,
    output: Path = OutputOpt,
    set_: List[str] = SetOpt,
    force: bool = ForceOpt,
    resume_strict: bool = typer.Option(
        False, "--resume-strict",
        help="With resume_from_checkpoint=latest: exit 2 instead of starting from step 0 when the output's "
             "checkpoints were made with other options or another cache (only max_train_steps, num_train_epochs, "
             "validation, evaluation, checkpoint, tracking and hub options may change on resume).",
    ),  # fmt: skip
) -> None:
    """Train LoRA or full weights from cache shards (under `accelerate launch` for several processes)."""

    def body() -> None:
        from .config import load_config
        from .train.stage import run_train

        result = run_train(load_config(config, set_), input, output, force=force, resume_strict=resume_strict)
        if result.interrupted:
            typer.echo(f"train: stopped by {result.interrupted}; a checkpoint was saved under {output / 'checkpoints'}"
                       "; resume with --set resume_from_checkpoint=latest")  # fmt: skip
            raise typer.Exit(130)
        if result.manifest is None:
            return
        metrics = result.manifest["metrics"]
        state = "up to date" if result.up_to_date else "wrote"
        loss = metrics.get("final_loss")
        typer.echo(f"train: {metrics['steps']} steps, final loss {loss:.4f}" if loss is not None else "train: done")
        resumed = result.manifest["stats"].get("resumed_from")
        if resumed and not result.up_to_date:
            typer.echo(f"train: resumed from {resumed['checkpoint']} (step {resumed['step']}); "
                       f"{result.manifest['stats']['steps_this_run']} step(s) trained by this run")  # fmt: skip
        if metrics.get("first_eval_loss") is not None and metrics.get("final_eval_loss") is not None:
            typer.echo(f"train: eval loss {metrics['first_eval_loss']:.4f} -> {metrics['final_eval_loss']:.4f}")
        typer.echo(f"train: {state} {output / 'manifest.json'} (weights in {output / 'final'})")

    _guarded(body)


@app.command()
def publish(
    config: Path = ConfigOpt,
    input: Path = InputOpt,
    output: Path = OutputOpt,
    set_: List[str] = SetOpt,
    force: bool = ForceOpt,
) -> None:
    """Assemble weights, model card and lineage, and upload them."""

    def body() -> None:
        from .config import load_config
        from .publish.stage import run_publish

        loaded = load_config(config, set_)
        with stage_notifications(loaded, "publish"):
            result = run_publish(loaded, input, output, force=force)
        for weight in result.manifest["weights"]:
            typer.echo(f"publish: {weight['path']} ({weight['format']}, {weight['bytes']} bytes)")
        for record in result.uploads:
            typer.echo(f"publish: uploaded to {record.get('destination', record.get('provider', '?'))}")
        state = "up to date" if result.up_to_date else "wrote"
        typer.echo(f"publish: {state} {output / 'manifest.json'}")
        typer.echo(f"published model: {output.resolve()} (model card: {output / 'README.md'})")

    _guarded(body)


@app.command("tiny-model")
def tiny_model(
    family: str = typer.Argument(..., help="Model family: sd1x, sd2x, sdxl, sd3, flux, pixart_sigma."),
    output: Path = typer.Argument(..., help="Folder to write the diffusers-layout model into."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
) -> None:
    """Write a tiny randomly initialised model of a family's real classes (for tests and demos; no download)."""

    def body() -> None:
        from .families import get_family

        get_family(family).tiny(output, seed)
        typer.echo(f"tiny {family} model written to {output}")

    _guarded(body)


@app.command("sample-data")
def sample_data(
    output: Path = typer.Argument(..., help="Folder to write the sample dataset and its config into."),
    images: int = typer.Option(24, "--images", help="How many images to generate."),
    seed: int = typer.Option(0, "--seed"),
    resolution: int = typer.Option(128, "--resolution", help="The config's resolution (pixel_area)."),
    family: Optional[str] = typer.Option(None, "--family", help="model_family to put in the config."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder to put in the config."),
) -> None:
    """Generate a small captioned image dataset with config.json and multidatabackend.json (for demos and tests)."""

    def body() -> None:
        from .sampledata import write_sample_dataset

        config_path = write_sample_dataset(output, images=images, seed=seed, resolution=resolution, family=family,
                                           model=model)  # fmt: skip
        typer.echo(f"sample data: {images} images under {output}; config {config_path}")

    _guarded(body)


@app.command("status")
def status(
    paths: List[Path] = typer.Argument(..., help="Stage folders or manifests, or one run folder holding prepare/, "
                                                 "cache/, train/, publish/."),  # fmt: skip
    verify: bool = typer.Option(False, "--verify", help="Also re-hash every output file (slow for large outputs)."),
    as_json: bool = typer.Option(False, "--json", help="Print the same data as JSON."),
) -> None:
    """Show the lineage chain and whether each stage is up to date with its parent, from the manifests alone.

    States: ok; stale (the parent changed since this stage read it); parent not found; invalid (bad manifest).

    damaged: an output file is missing or has another size (or another sha256, with --verify).

    Exits 0 whatever the states (use `st verify` for a check that fails); 2 when a path is not a stage output."""

    def body() -> None:
        import json

        from .status import format_status, stage_status

        rows = stage_status(paths, verify=verify)
        if as_json:
            typer.echo(json.dumps({"ok": all(r.ok for r in rows), "stages": [r.to_dict() for r in rows]}, indent=2))
        else:
            typer.echo(format_status(rows))

    _guarded(body)


@app.command("verify")
def verify(
    paths: List[Path] = typer.Argument(..., help="Manifests or stage folders (or a run folder) to check."),
) -> None:
    """Re-hash every output file each manifest lists, and check the manifest's own schema and digest.

    For a cache output, also check structure: valid tar shards whose every member decodes within its manifest's bounds.

    Exit status: 0 when everything matches.

    1 when a file is missing, changed or malformed, or a manifest fails its digest: a finding, not a usage error.

    2 when a path is not a manifest, a stage folder or a run folder."""

    def body() -> None:
        from .verify import expand, format_verification, verify_manifest

        results = [verify_manifest(file) for file in expand(paths)]  # every path resolved before any hashing
        for result in results:
            typer.echo(format_verification(result))
        failed = sum(not r.ok for r in results)
        if failed:
            typer.echo(f"verify: {failed} of {len(results)} manifest(s) failed", err=True)
            raise typer.Exit(1)

    _guarded(body)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except UserError as exc:  # raised outside a command body (should not happen, but never show a traceback)
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
