"""The `st` command line, after litgpt's: `COMMANDS` maps each command name to a plain function of typed arguments
that runs one stage, prints its summary (formatted in `console`) and returns the stage's result.

Errors become messages and exit codes in one place, `_Commands.invoke`. Heavy modules (torch, diffusers, the
stages) are imported inside the command functions, so that `st --help` stays instant."""

from __future__ import annotations

import contextlib
import os
import traceback
from pathlib import Path
from typing import Annotated, List, Optional

import typer
from typer.core import TyperGroup

from . import __version__, console
from .artifacts.location import parse_location
from .errors import UserError
from .log import configure

ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="config.json / .toml / .env with SimpleTuner option names (default: as SimpleTuner's "
                           "launcher finds it: config/<ENV>/config.json|toml|env, CONFIG_BACKEND picks the type).")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Folder this stage writes (created if needed).")]
InputOpt = Annotated[Path, typer.Option("--input", "-i", help="The previous stage's manifest.json (or its folder).")]
# A stage's own --input / --output: a local path or s3://bucket/prefix (pipeline.artifacts; AWS_ENDPOINT_URL and the
# other standard AWS variables give the endpoint and credentials).
StageOutputOpt = Annotated[str, typer.Option(
    "--output", "-o", help="Folder this stage writes (created if needed), or s3://bucket/prefix.")]
StageInputOpt = Annotated[str, typer.Option(
    "--input", "-i", help="The previous stage's manifest.json (or its folder), or s3://bucket/prefix.")]
SetOpt = Annotated[List[str], typer.Option("--set",
                                           help="Override an option: --set key=value (value read as a TOML literal).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Run even when the output is up to date.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the same data as JSON.")]
NO_SETS: List[str] = []  # the default of --set (never mutated)


GLOBAL_FLAGS = ("-v", "--verbose", "-q", "--quiet", "-V", "--version")


class _Commands(TyperGroup):
    """Runs the chosen command: a user error prints `error: <message>` on stderr and exits with the error's code
    (-v adds the traceback); Ctrl-C exits 130. Anything else is a bug: exit 1 with the traceback.

    The global flags (GLOBAL_FLAGS) may follow the command too (`st prepare -c x -o y -v`): they are moved in front
    of it before parsing."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _global_flags_first(args))

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if ctx.params.get("verbose"):
                traceback.print_exc()
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None


def _global_flags_first(args: list[str]) -> list[str]:
    """`args` with the global flags moved to the front (up to a `--`). An option's value never looks like one of
    them: click refuses a value that starts with a dash."""
    end = args.index("--") if "--" in args else len(args)
    flags = [arg for arg in args[:end] if arg in GLOBAL_FLAGS]
    return flags + [arg for arg in args[:end] if arg not in GLOBAL_FLAGS] + args[end:]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"st {__version__}")
        raise typer.Exit()


def main_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging and tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    version: Annotated[bool, typer.Option("--version", "-V", callback=_print_version, is_eager=True,
                                          help="Print st's version and exit.")] = False,  # fmt: skip
) -> None:
    if not verbose:
        # transformers warns at import time about optional image-processor backends st never uses.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    configure(verbose=verbose, quiet=quiet)


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


# --- the commands -----------------------------------------------------------------------------------------------


def prepare(
    output: StageOutputOpt,
    config: ConfigOpt = None,
    set_: SetOpt = NO_SETS,
    strict: Annotated[bool, typer.Option("--strict", help="Fail instead of skipping unusable images.")] = False,
    force: ForceOpt = False,
):
    """Scan image folders and captions into an aspect-bucket manifest (samples.parquet)."""
    from .artifacts.stages import output_folder
    from .config import load_config
    from .prepare.stage import run_prepare

    loaded = load_config(_config_path(config), set_)
    with stage_notifications(loaded, "prepare"), output_folder(output, "prepare") as local_output:
        result = run_prepare(loaded, local_output, strict=strict, force=force)
    typer.echo(console.prepare_done(result, parse_location(output)))
    return result


def cache(
    ctx: typer.Context,
    config: ConfigOpt = None,
    input: Annotated[Optional[str], typer.Option(
        "--input", "-i", help="The prepare manifest.json (or its folder), or s3://bucket/prefix.")] = None,
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", help="Folder this stage writes, or s3://bucket/prefix.")] = None,
    set_: SetOpt = NO_SETS,
    part: Annotated[Optional[str],
                    typer.Option("--part", help="Encode only part i of n (i/n); combine with `merge`.")] = None,
    force: ForceOpt = False,
    strict: Annotated[bool,
                      typer.Option("--strict", help="Fail instead of skipping images that cannot be decoded.")] = False,
):
    """Encode latents and text embeddings into content-addressed webdataset shards."""
    if ctx.invoked_subcommand is not None:  # `st cache -c ... merge ...`: the options are the merge's defaults
        ctx.obj = {"config": config, "input": input, "set": set_}
        return None
    from .artifacts.stages import input_folder, output_folder
    from .cache.layout import PART_NAME
    from .cache.stage import run_cache
    from .manifest import MANIFEST_NAME
    from .config import load_config

    _require(input=input, output=output)
    loaded = load_config(_config_path(config), set_)
    commit = MANIFEST_NAME if part is None else PART_NAME  # what a reader trusts: a part has part.json
    with stage_notifications(loaded, "cache"), output_folder(output, "cache", commit) as local_output:
        result = run_cache(loaded, input_folder(input, "prepare"), local_output, part=part, force=force,
                           strict=strict)  # fmt: skip
    where = parse_location(output)
    typer.echo(console.cache_done(result, where) if result.manifest else console.cache_part_done(result, where, part))
    return result


def cache_merge(
    ctx: typer.Context,
    parts: Annotated[List[str], typer.Argument(
        help="Output folders (or s3://bucket/prefix) of `st cache --part i/n` runs.")],
    output: StageOutputOpt,
    config: Annotated[Optional[Path],
                      typer.Option("--config", "-c", help="The config the parts were run with.")] = None,
    input: Annotated[Optional[str], typer.Option(
        "--input", "-i", help="The prepare manifest the parts read (or s3://bucket/prefix).")] = None,
    set_: SetOpt = NO_SETS,
):
    """Combine `st cache --part i/n` outputs into one cache output (same manifest as a single run)."""
    from .artifacts.stages import input_folder, output_folder, part_folders
    from .cache.layout import PART_NAME
    from .cache.stage import merge_parts
    from .config import load_config

    group = ctx.obj or {}
    config, input = config or group.get("config"), input or group.get("input")
    _require(input=input)
    loaded = load_config(_config_path(config), [*group.get("set", []), *set_])
    with output_folder(output, "cache") as local_output:
        result = merge_parts(loaded, input_folder(input, "prepare"), part_folders(parts, PART_NAME), local_output)
    typer.echo(console.cache_merged(result, len(parts), parse_location(output)))
    return result


def _config_path(config: Path | None) -> Path:
    """--config, else the config SimpleTuner's launcher would use (config/<ENV>/config.json|toml|env)."""
    if config is not None:
        return config
    from .config import simpletuner_config_path

    return simpletuner_config_path(os.environ, Path.cwd())


def _require(**values: object) -> None:
    from .errors import ConfigError

    missing = [f"--{name}" for name, value in values.items() if value is None]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}; see `st cache --help`")


def train(
    input: StageInputOpt,
    output: StageOutputOpt,
    config: ConfigOpt = None,
    set_: SetOpt = NO_SETS,
    force: ForceOpt = False,
    resume_strict: Annotated[bool, typer.Option(
        "--resume-strict",
        help="With resume_from_checkpoint=latest: exit 2 instead of starting from step 0 when the output's "
             "checkpoints were made with other options or another cache (only max_train_steps, num_train_epochs, "
             "validation, evaluation, checkpoint, tracking and hub options may change on resume).",
    )] = False,  # fmt: skip
    shard_cache: Annotated[Optional[Path], typer.Option(
        "--shard-cache", help="With --input s3://...: the folder shards are fetched into (default "
                              "$ST_STATE_DIR/shard-cache).")] = None,  # fmt: skip
    shard_cache_limit: Annotated[Optional[float], typer.Option(
        "--shard-cache-limit", help="With --input s3://...: at most this many GB of shards are kept locally "
                                    "(default: no limit).")] = None,  # fmt: skip
):
    """Train LoRA or full weights from cache shards (under `accelerate launch` for several processes)."""
    from .artifacts.stages import output_folder
    from .config import load_config
    from .train.shard_cache import train_input
    from .train.stage import run_train

    loaded = load_config(_config_path(config), set_)
    local_input = train_input(input, shard_cache, shard_cache_limit)
    with output_folder(output, "train") as local_output:
        result = run_train(loaded, local_input, local_output, force=force, resume_strict=resume_strict)
    output = parse_location(output)
    if result.interrupted:
        typer.echo(console.train_interrupted(result, output))
        raise typer.Exit(130)
    if result.manifest is not None:  # None on the processes other than the main one
        typer.echo(console.train_done(result, output))
    return result


def publish(
    input: StageInputOpt,
    output: StageOutputOpt,
    config: ConfigOpt = None,
    set_: SetOpt = NO_SETS,
    force: ForceOpt = False,
):
    """Assemble weights, model card and lineage, and upload them."""
    from .artifacts.stages import input_folder, output_folder
    from .config import load_config
    from .publish.stage import run_publish

    loaded = load_config(_config_path(config), set_)
    with stage_notifications(loaded, "publish"), output_folder(output, "publish") as local_output:
        result = run_publish(loaded, input_folder(input, "train"), local_output, force=force)
    typer.echo(console.publish_done(result, parse_location(output)))
    return result


def check(config: ConfigOpt = None, set_: SetOpt = NO_SETS,
          any_machine: Annotated[bool, typer.Option(
              "--any-machine", help="Check the config for another machine (the one that will train it): what it "
                                    "needs of the machine (a CUDA GPU, a compute capability, GPU-only packages such "
                                    "as kernels or flash-attn) is listed after the verdict instead of counting as a "
                                    "problem; without it, st check decides them against this machine, as `st train` "
                                    "would here.")] = False):  # fmt: skip
    """Check a config, its dataset list and its model without running a stage (nothing is decoded or downloaded).

    Lists every problem at once, each with its fix, and exits 2 when there is any; output folders are not checked."""
    from .check import run_check

    from .train.checks import config_checks

    report = run_check(_config_path(config), set_, any_machine=any_machine, stage_checks=config_checks())
    typer.echo(console.check_report(report))
    if not report.ok:
        raise typer.Exit(2)
    return report


def options(
    stage: Annotated[Optional[str], typer.Option(
        "--stage", help="Only the options this stage reads: prepare, cache, train or publish.")] = None,
    search: Annotated[Optional[str], typer.Option(
        "--search", help="Only options whose name, help or SimpleTuner state contains this word.")] = None,
    as_json: JsonOpt = False,
):
    """List every option with its type, default, stages and SimpleTuner state.

    Columns: the stages that read it and whether it enters their keys; its SimpleTuner state (implemented, alias of
    another option, accepted and ignored with the reason, refused with the feature st lacks).

    With --stage, options no stage reads (accepted and refused ones) are left out."""
    from .option_list import list_options

    rows = list_options(stage, search)
    typer.echo(console.as_json([row.to_dict() for row in rows]) if as_json else console.options_table(rows))
    return rows


def config_show(
    config: ConfigOpt = None,
    set_: SetOpt = NO_SETS,
    everything: Annotated[bool, typer.Option("--all", help="Every option, also those at their default.")] = False,
    as_json: JsonOpt = False,
):
    """Print the effective config: each option given or not at its default, with where its value came from.

    Origins: default, file, --set, alias X (file), alias X (--set), derived (computed while loading). Then the
    SimpleTuner options the config carries that st reads nowhere."""
    from .option_list import effective_config

    effective = effective_config(_config_path(config), set_, everything=everything)
    typer.echo(console.as_json(effective.to_dict()) if as_json else console.effective_config(effective))
    return effective


def tiny_model(
    family: Annotated[str, typer.Argument(help="Model family: sd1x, sd2x, sdxl, sd3, flux, pixart_sigma, auraflow, "
                                               "lumina2, sana, qwen_image, kolors, chroma, z_image, hidream, "
                                               "cosmos2image, flux2, deepfloyd, wan, ltxvideo.")],
    output: Annotated[Path, typer.Argument(help="Folder to write the diffusers-layout model into.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights.")] = 0,
    flavour: Annotated[Optional[str], typer.Option("--flavour", help="A variant's pipeline instead of the family's: "
                                                "i2v (wan: Wan 2.1 image-to-video, WanImageToVideoPipeline); "
                                                "flf2v (wan: Wan 2.1 first/last-frame-to-video); "
                                                "i2v-2.2 (wan: Wan 2.2 I2V A14B, two experts); t2v-2.2 (wan: Wan 2.2 "
                                                "T2V "
                                                "A14B, two experts); ti2v (wan: Wan 2.2 "
                                                "TI2V 5B); vace (wan: Wan 2.1 VACE, WanVACEPipeline); ii "
                                                "(deepfloyd: stage II, IFSuperResolutionPipeline); dev (flux2: "
                                                "FLUX.2 [dev], Flux2Pipeline); edit (qwen_image: "
                                                "Qwen-Image-Edit, QwenImageEditPipeline); edit-plus (qwen_image: "
                                                "Qwen-Image-Edit-2509, QwenImageEditPlusPipeline).")] = None,
) -> Path:
    """Write a tiny randomly initialised model of a family's real classes (for tests and demos; no download)."""
    from .families import get_family
    from .log import quiet_libraries

    quiet_libraries()
    _tiny_writer(get_family(family), flavour)(output, seed)
    typer.echo(console.tiny_model_written(family, output))
    return output


def _tiny_writer(family, flavour: str | None):
    """The `tiny` of `family`, or of its variant `flavour` (TINY_FLAVOURS)."""
    if flavour is None:
        return family.tiny
    if (family.name, flavour) == ("wan", "i2v"):
        from .families import wan_i2v

        return wan_i2v.tiny
    if (family.name, flavour) == ("wan", "flf2v"):
        from .families import wan_i2v

        return wan_i2v.tiny_flf2v
    if (family.name, flavour) == ("wan", "i2v-2.2"):
        from .families import wan22

        return wan22.tiny
    if (family.name, flavour) == ("wan", "ti2v"):
        from .families import wan22

        return wan22.tiny_ti2v
    if (family.name, flavour) == ("wan", "t2v-2.2"):
        from .families import wan22

        return wan22.tiny_t2v
    if (family.name, flavour) == ("wan", "vace"):
        from .families import wan_vace

        return wan_vace.tiny
    if (family.name, flavour) == ("deepfloyd", "ii"):
        from .families import deepfloyd

        return deepfloyd.STAGE_II.tiny
    if (family.name, flavour) == ("flux2", "dev"):
        from .families import flux2

        return flux2.tiny_dev
    if (family.name, flavour) == ("qwen_image", "edit"):
        from .families import qwen_image_edit

        return qwen_image_edit.tiny
    if (family.name, flavour) == ("qwen_image", "edit-plus"):
        from .families import qwen_image_edit

        return qwen_image_edit.tiny_plus
    from .errors import ConfigError

    raise ConfigError(f"st tiny-model has no flavour {flavour!r} for {family.name}; flavours: i2v, i2v-2.2, t2v-2.2, ti2v, vace (wan only), ii "
                      "(deepfloyd only), dev (flux2 only), edit, edit-plus (qwen_image only)")  # fmt: skip


def sample_data(
    output: Annotated[Path, typer.Argument(help="Folder to write the sample dataset and its config into.")],
    images: Annotated[int, typer.Option("--images", help="How many images to generate.")] = 24,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    resolution: Annotated[int, typer.Option("--resolution", help="The config's resolution (pixel_area).")] = 128,
    family: Annotated[Optional[str], typer.Option("--family", help="model_family to put in the config.")] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="Model folder to put in the config.")] = None,
    conditioning: Annotated[Optional[str], typer.Option(
        "--conditioning", help="Paired datasets to add, comma-separated: controlnet (edge images in edges/), mask "
                               "(shape masks in masks/).")] = None,  # fmt: skip
    video: Annotated[bool, typer.Option(
        "--video", help="Write a video dataset instead (short MP4 clips of a moving shape in videos/, plus one too "
                        "short and one truncated clip that st prepare skips).")] = False,  # fmt: skip
    videos: Annotated[int, typer.Option("--videos", help="With --video: how many usable clips to write.")] = 6,
) -> Path:
    """Generate a small captioned image (or video) dataset with config.json and multidatabackend.json (for demos and
    tests)."""
    from .errors import ConfigError
    from .families import get_family
    from .sampledata import CONDITIONING_FOLDERS, write_sample_dataset

    kinds = tuple(k.strip() for k in conditioning.split(",") if k.strip()) if conditioning else ()
    unknown = [k for k in kinds if k not in CONDITIONING_FOLDERS]
    if unknown:
        raise ConfigError(f"--conditioning {unknown[0]!r} is not one of {', '.join(CONDITIONING_FOLDERS)}")
    if video and kinds:
        raise ConfigError("--video writes a video dataset without paired data: drop --conditioning")
    if video and family and not get_family(family).video:
        raise ConfigError(f"--video needs a video model family (wan), not {family!r}: drop --family or name one")
    if video and videos < 1:
        raise ConfigError(f"--videos must be at least 1, got {videos}")
    config = write_sample_dataset(output, images=images, seed=seed, resolution=resolution, family=family, model=model,
                                  conditioning=kinds, videos=videos if video else 0)  # fmt: skip
    if video:
        typer.echo(f"sample data: {videos} videos (and 2 that st prepare skips) under {output}; config {config}")
    else:
        typer.echo(console.sample_data_written(images, output, config))
    return config


def status(
    paths: Annotated[List[Path], typer.Argument(help="Stage folders or manifests, or one run folder holding prepare/, "
                                                     "cache/, train/, publish/; or s3://bucket/prefix.")],  # fmt: skip
    verify: Annotated[bool, typer.Option(
        "--verify", help="Also re-hash every output file (slow for large outputs).")] = False,
    as_json: JsonOpt = False,
):
    """Show the lineage chain and whether each stage is up to date with its parent, from the manifests alone.

    States: ok; stale (the parent changed since this stage read it); parent not found; invalid (bad manifest).

    damaged: an output file is missing or has another size (or another sha256, with --verify).

    Exits 0 whatever the states (use `st verify` for a check that fails); 2 when a path is not a stage output."""
    from .status import format_status, stage_status

    rows = stage_status(paths, verify=verify)
    typer.echo(console.status_json(rows) if as_json else format_status(rows))
    return rows


def verify(
    paths: Annotated[List[Path], typer.Argument(help="Manifests or stage folders (or a run folder, or s3://bucket/prefix) to check.")],
):
    """Re-hash every output file each manifest lists, and check the manifest's own schema and digest.

    For a cache output, also check structure: valid tar shards whose every member decodes within its manifest's bounds.

    Exit status: 0 when everything matches.

    1 when a file is missing, changed or malformed, or a manifest fails its digest: a finding, not a usage error.

    2 when a path is not a manifest, a stage folder or a run folder."""
    from .verify import expand, format_verification, verify_manifest

    results = [verify_manifest(file) for file in expand(paths)]  # every path resolved before any hashing
    for result in results:
        typer.echo(format_verification(result))
    failed = sum(not r.ok for r in results)
    if failed:
        typer.echo(console.verify_failed(failed, len(results)), err=True)
        raise typer.Exit(1)
    return results


# --- the command table ------------------------------------------------------------------------------------------

cache_app = typer.Typer(
    help="Encode latents and text embeddings into content-addressed webdataset shards.",
    invoke_without_command=True,
    no_args_is_help=False,
)
cache_app.callback()(cache)
cache_app.command("merge")(cache_merge)

config_app = typer.Typer(help="Show a config as st reads it.", no_args_is_help=True)
config_app.command("show")(config_show)

COMMANDS = {
    "check": check,
    "options": options,
    "config": config_app,
    "prepare": prepare,
    "cache": cache_app,
    "train": train,
    "publish": publish,
    "tiny-model": tiny_model,
    "sample-data": sample_data,
    "status": status,
    "verify": verify,
}

app = typer.Typer(
    cls=_Commands,
    name="st",
    help="Fine-tune text-to-image diffusion models in stages: prepare -> cache -> train -> publish.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.callback()(main_options)
for _name, _command in COMMANDS.items():
    if isinstance(_command, typer.Typer):
        app.add_typer(_command, name=_name)
    else:
        app.command(_name)(_command)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
