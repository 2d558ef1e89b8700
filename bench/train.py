"""Benchmark `st train`: optimizer steps per second of a LoRA run on a tiny model against a plain training loop.

Setup (not timed): a tiny model of the family, `write_sample_dataset` images, `st prepare` and `st cache`, as
tests/stages/test_train.py does.

Baseline (`Plain`), in the same process, with the same model, LoRA targets and rank, batch, precision (fp32), attention
processor and thread count: a bare diffusers + peft loop: the denoiser from its folder, `add_adapter(LoraConfig(...))`,
`torch.optim.AdamW` on the LoRA parameters, the SAME latents and text tensors read once into memory with `CacheReader`
and batched with `family.collate_text`, in the SAME order of batches as the st run (from st's logs/data-rank0.jsonl),
DDPM noise + epsilon MSE (flow matching + velocity MSE for flow families), backward, `clip_grad_norm_`, optimizer step.
Each step (batch assembly included) is timed on its own.

st, end to end: `run_train` in process (validation off, report_to none, no checkpoints, no eval, default data
prefetch), `warmup + steps` optimizer steps. Its step time is read from metrics.jsonl: `samples_per_s` there is
`batch / (wall time between the ends of consecutive optimizer steps)`, so it includes waiting for the data loader,
the order log and the metrics line; model loading and the rest of the setup are not in it. Process CPU time per step
is stamped when the trainer logs each step (Tracker.log, wrapped here).
Both: the first `--warmup` steps are dropped; samples/s = batch * steps / (sum of the timed step times), over the same
batches. Runs alternate (st, plain, plain, st, ...) for `--rounds` rounds; the figures are medians over rounds
("best": each step's fastest time over the rounds).

st, interleaved: on a shared or virtual machine the speed of the same work drifts by 10-20 % over seconds, more than
the difference measured, so whole runs taken one after the other disagree by that much. `interleaved` alternates
st's step body (a `Trainer` as run_train builds it) and the plain step on the same batches, step by step, so that
drift hits both alike; it leaves out the per-step order log and metrics line and the loader thread.

Data loading: `TrainLoader.iterate` alone (prefetch off, fresh reader, the same plan), CPU time of each `next()` over
the same number of batches, as a fraction of st's step time (in st it runs in a thread, ahead of the step).

Threads: `torch.set_num_threads(--threads)` for both, 1 by default: with 2 threads on 2 shared cores every small op
waits for the busier core and step times swing several-fold; pass `--threads 2` on a quiet machine.

Run: `.venv/bin/python bench/train.py [--family sd1x] [--steps 30] [--json out.json] [--profile out.txt]`.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Families whose denoiser call the plain loop writes out (UNet with encoder_hidden_states only, or Flux).
PLAIN_FAMILIES = ("sd1x", "sd2x", "flux")


# ------------------------------------------------------------------------------------------------------------ setup


def build(work: Path, family_name: str, images: int, resolution: int, batch: int, rank: int, lr: float) -> Path:
    """A tiny model, a sample dataset, prepared and cached; returns the config path (cache under work/cache)."""
    from pipeline.cache.stage import run_cache
    from pipeline.config import load_config
    from pipeline.families import get_family
    from pipeline.prepare.stage import run_prepare
    from pipeline.sampledata import write_sample_dataset

    get_family(family_name).tiny(work / "model", 0)
    config = write_sample_dataset(work / "data", images=images, family=family_name, model=work / "model",
                                  resolution=resolution)  # fmt: skip
    data = json.loads(config.read_text())
    data.update({"--train_batch_size": batch, "--lora_rank": rank, "--learning_rate": lr})
    config.write_text(json.dumps(data, indent=2) + "\n")
    loaded = load_config(config)
    run_prepare(loaded, work / "prepare")
    run_cache(loaded, work / "prepare", work / "cache")
    return config


def st_settings(total_steps: int) -> list[str]:
    return ["validation_disable=true", "disable_benchmark=true", 'report_to="none"', f"max_train_steps={total_steps}",
            "checkpoint_step_interval=0", "eval_steps_interval=0", "lora_dropout=0.0"]  # fmt: skip


# --------------------------------------------------------------------------------------------------------------- st


def run_st(config: Path, cache: Path, out: Path, total_steps: int, extra: list[str] = ()) -> dict:
    """One in-process `st train`: per-step wall times (s) from metrics.jsonl, per-step process CPU times (s) from
    stamps taken when the trainer logs each step (Tracker.log, wrapped here), and the keys of each step."""
    from pipeline.config import load_config
    from pipeline.train import tracking
    from pipeline.train.stage import run_train

    shutil.rmtree(out, ignore_errors=True)
    loaded = load_config(config, [*st_settings(total_steps), *extra])
    stamps: list[float] = []
    original = tracking.Tracker.log

    def log(self, record):
        if "samples_per_s" in record:
            stamps.append(time.process_time())
        return original(self, record)

    tracking.Tracker.log = log
    try:
        t = time.perf_counter()
        result = run_train(loaded, cache, out)
        total_s = time.perf_counter() - t
    finally:
        tracking.Tracker.log = original
    assert result.manifest is not None and result.manifest["metrics"]["steps"] == total_steps, result
    batch = loaded.config.train_batch_size
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = [batch / r["samples_per_s"] for r in records if "samples_per_s" in r]
    orders = [json.loads(line) for line in (out / "logs" / "data-rank0.jsonl").read_text().splitlines()]
    keys = [o["keys"] for o in orders if "keys" in o]
    assert len(step_s) == len(keys) == len(stamps) == total_steps
    cpu_s = [float("nan")] + [b - a for a, b in zip(stamps, stamps[1:])]  # step 1 has no start stamp
    return {"step_s": step_s, "cpu_s": cpu_s, "keys": keys, "run_train_s": total_s, "loss": records[-1]["loss"]}


# ------------------------------------------------------------------------------------------------------------ plain


def load_memory(cache: Path) -> dict:
    """Every cached sample's latent and first caption's tensors (floating ones as float32, the model's dtype)."""
    from pipeline.cache_reader import CacheReader

    def fp32(text: dict) -> dict:
        return {k: v.float() if v.is_floating_point() else v for k, v in text.items()}

    return {s.key: (s.latent.float(), fp32(s.texts[0])) for s in CacheReader(cache)}


class Plain:
    """A bare diffusers + peft LoRA loop over in-memory tensors (sd1x/sd2x UNet call, or Flux's; v-prediction
    families are trained on epsilon here: the same work)."""

    def __init__(self, family, model_dir: Path, rank: int, lr: float, max_grad_norm: float, lora_targets) -> None:
        import torch
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        from pipeline.families import load_components

        parts = load_components(family, model_dir, which=("denoiser", "scheduler"))
        self.family, self.model = family, parts["denoiser"]
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where st's accelerate puts it
        self.flow = family.prediction_type == "flow_matching"
        scheduler = None if self.flow else DDPMScheduler.from_config(parts["scheduler"].config)
        self.alphas_cumprod = None if self.flow else scheduler.alphas_cumprod.to(self.device)
        self.model.requires_grad_(False)
        self.model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(lora_targets)))
        self.model.to(self.device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=1e-2)
        self.max_grad_norm = max_grad_norm
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, noisy, t, text):
        import torch

        if not self.flow:
            return self.model(noisy, t, encoder_hidden_states=text["prompt_embeds"], return_dict=False)[0]
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        embeds = text["prompt_embeds"]
        out = self.model(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=t,
            guidance=torch.ones(b, device=self.device) if self.model.config.guidance_embeds else None,
            pooled_projections=text["pooled_prompt_embeds"], encoder_hidden_states=embeds,
            txt_ids=torch.zeros(embeds.shape[1], 3, device=self.device),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, noisy.dtype),
            return_dict=False,
        )[0]  # fmt: skip
        return FluxPipeline._unpack_latents(out, h, w, 1)  # vae_scale_factor 1: h, w are latent sizes

    def step(self, latents, text) -> float:
        import torch
        import torch.nn.functional as F

        b = latents.shape[0]
        latents, text = latents.to(self.device), {k: v.to(self.device) for k, v in text.items()}
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        if self.flow:
            sigmas = torch.sigmoid(torch.randn(b, generator=self.generator)).to(self.device)
            s = sigmas.view(b, 1, 1, 1)
            noisy, target, t = (1 - s) * latents + s * noise, noise - latents, sigmas
        else:
            t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=self.generator).to(self.device)
            abar = self.alphas_cumprod[t].view(b, 1, 1, 1)
            noisy, target = abar.sqrt() * latents + (1 - abar).sqrt() * noise, noise
        loss = F.mse_loss(self.forward(noisy, t, text).float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def run(self, memory: dict, keys_per_step: list[list[str]]) -> dict:
        """Wall and process CPU seconds of each step (batch assembly from memory included)."""
        import torch

        wall, cpu = [], []
        for keys in keys_per_step:
            t, c = time.perf_counter(), time.process_time()
            latents = torch.stack([memory[k][0] for k in keys])
            text = self.family.collate_text([memory[k][1] for k in keys])
            self.step(latents, text)
            wall.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        return {"step_s": wall, "cpu_s": cpu}


# ----------------------------------------------------------------------------------------------------- data loading


def time_loader(cache: Path, seed: int, batch: int, count: int, sampling: str) -> list[float]:
    """Process CPU seconds per `next()` of `TrainLoader.iterate` (prefetch off) over `count` batches of the st plan
    (CPU time: on a shared machine wall time of a sub-millisecond call is mostly waiting for a core)."""
    from pipeline.cache_reader import CacheReader
    from pipeline.train.data import CacheIndex, Cursor, EpochPlanner, TrainLoader

    reader = CacheReader(cache)
    index = CacheIndex(reader.root, reader.manifest)
    planner = EpochPlanner(index, seed=seed, global_batch=batch, sampling=sampling)
    epochs = -(-count // planner.batches_per_epoch()) + 1
    loader = TrainLoader(index, planner, rank=0, world=1, shared_text=reader.shared_embeds(), caption_dropout=0.0,
                         empty_key=reader.manifest["embeds"]["empty"], seed=seed, prefetch=0)  # fmt: skip
    times = []
    it = loader.iterate(Cursor(), epochs)
    for _ in range(count):
        t = time.process_time()
        next(it)
        times.append(time.process_time() - t)
    it.close()
    return times


# ------------------------------------------------------------------------------------------------------ interleaved


def interleaved(config: Path, cache: Path, family, plain: "Plain", steps: int, warmup: int, extra=()) -> dict:
    """st's step body and the plain step on the same batches, alternating step by step (ABBA), so that a change in
    the machine's load hits both alike. st's side is a `Trainer` built as run_train builds it, stepped with the body of
    `Trainer.run` (forward + loss, backward, loss reduce, clip_gradients over the trainable parameters, optimizer and
    scheduler step, zero_grad); the order log, metrics line and data loader are left out (the batches are loaded
    first). Returns the wall and process CPU seconds of each step of each side."""
    import torch

    from pipeline.cache_reader import CacheReader
    from pipeline.families.identity import model_sources
    from pipeline.config import load_config
    from pipeline.train.data import Cursor
    from pipeline.train.optim import clip_gradients
    from pipeline.train.options import OptimizerOptions
    from pipeline.train.trainer import Trainer

    loaded = load_config(config, [*st_settings(warmup + steps), *extra])
    cfg = loaded.config
    reader = CacheReader(cache)
    shared = reader.shared_embeds()
    by_text = {text: shared[k] for k, text in reader.manifest["embeds"]["prompts"].items()}
    trainer = Trainer(config=cfg, family=family, source=model_sources(loaded).model,
                      vae_source=None, cache_root=reader.root, cache_manifest=reader.manifest, shared_embeds=shared,
                      prompts_by_text=by_text, out_dir=config.parent / "interleaved",
                      base_dir=loaded.base_dir)  # fmt: skip
    batches = []
    for batch in trainer.loader.iterate(Cursor(), trainer.epochs):
        batches.append(batch)
        if len(batches) == warmup + steps:
            break
    state = {"step": 0}

    attention = getattr(trainer, "_attention", contextlib.nullcontext)  # the SDPA kernel choice, where st has one

    def st_step(batch) -> None:
        with attention():
            loss = trainer._forward_loss(batch.latents, batch.texts, batch.meta, state["step"])
            trainer.accelerator.backward(loss)
        value = float(loss.detach())
        clip_gradients([p for p in trainer.model.parameters() if p.requires_grad], OptimizerOptions.from_config(cfg))
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        trainer.optimizer.zero_grad(set_to_none=cfg.set_grads_to_none)
        state["step"] += 1
        trainer.accelerator.reduce(torch.tensor(value, device=trainer.device), reduction="mean")

    def plain_step(batch) -> None:
        fp32 = [{k: v.float() if v.is_floating_point() else v for k, v in t.items()} for t in batch.texts]
        plain.step(batch.latents, family.collate_text(fp32))

    out: dict[str, dict[str, list[float]]] = {"st": {"step_s": [], "cpu_s": []}, "plain": {"step_s": [], "cpu_s": []}}
    for i, batch in enumerate(batches):
        for name, fn in ((("st", st_step), ("plain", plain_step)) if i % 2 == 0 else
                         (("plain", plain_step), ("st", st_step))):  # fmt: skip
            t, c = time.perf_counter(), time.process_time()
            fn(batch)
            out[name]["step_s"].append(time.perf_counter() - t)
            out[name]["cpu_s"].append(time.process_time() - c)
    return out


# ------------------------------------------------------------------------------------------------------------- main


def profile_to(path: Path, label: str, fn, *args):
    profiler = cProfile.Profile()
    result = profiler.runcall(fn, *args)
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).strip_dirs()
    text.write(f"==== {label}: by cumulative time ====\n")
    stats.sort_stats("cumulative").print_stats(45)
    text.write(f"==== {label}: by own time ====\n")
    stats.sort_stats("tottime").print_stats(30)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text.getvalue())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd1x", choices=PLAIN_FAMILIES)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of every run")
    parser.add_argument("--rounds", type=int, default=5, help="st and plain runs each, alternated")
    parser.add_argument("--interleaved-steps", type=int, default=60, help="steps of the step-by-step A/B (0: skip)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=96)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both (1: see the docstring)")
    parser.add_argument("--st-set", action="append", default=[], help="extra st config override (key=value)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile one st run and one plain run into this")
    args = parser.parse_args()

    import torch

    from pipeline.config import load_config
    from pipeline.families import get_family

    torch.set_num_threads(args.threads)
    family = get_family(args.family)
    total = args.warmup + args.steps
    work = Path(tempfile.mkdtemp(prefix="st-bench-train-"))
    try:
        t = time.perf_counter()
        config = build(work, args.family, args.images, args.resolution, args.batch, args.rank, args.lr)
        setup_s = time.perf_counter() - t
        cache = work / "cache"
        cfg = load_config(config, [*st_settings(total), *args.st_set]).config
        targets = family.lora_target_modules(cfg.flux_lora_target if family.name == "flux" else None)
        memory = load_memory(cache)
        buckets = sorted({tuple(v[0].shape) for v in memory.values()})

        st_runs, plain_runs, loads, keys = [], [], [], None
        order = ["st", "plain", "plain", "st"] * args.rounds
        for what in order[: 2 * args.rounds]:
            torch.set_num_threads(args.threads)
            if what == "st":
                run = run_st(config, cache, work / "out", total, args.st_set)
                assert torch.get_num_threads() == args.threads, "st train changed the thread count"
                keys = keys or run["keys"]
                assert run["keys"] == keys
                st_runs.append(run)
            else:  # the order starts with st, so its batch order (keys) is known here
                plain = Plain(family, work / "model", args.rank, args.lr, cfg.max_grad_norm, targets)
                plain_runs.append(plain.run(memory, keys))
            loads.append(time_loader(cache, cfg.seed or 0, args.batch, total, cfg.data_backend_sampling))

        def sps(run: dict, kind: str = "step_s") -> float:
            return args.batch * args.steps / sum(run[kind][args.warmup :])

        def med(values) -> float:
            return statistics.median(list(values))

        def best(runs: list[dict]) -> float:  # each timed step's fastest time over the rounds (noise only adds time)
            return args.batch * args.steps / sum(min(r["step_s"][i] for r in runs) for i in range(args.warmup, total))

        st_sps, plain_sps = med(sps(r) for r in st_runs), med(sps(r) for r in plain_runs)
        paired = [sps(a) / sps(b) for a, b in zip(st_runs, plain_runs)]
        st_cpu_sps, plain_cpu_sps = med(sps(r, "cpu_s") for r in st_runs), med(sps(r, "cpu_s") for r in plain_runs)
        load_ms = med(sum(lt[args.warmup :]) / args.steps for lt in loads) * 1e3

        ab = None
        if args.interleaved_steps:
            torch.set_num_threads(args.threads)
            plain = Plain(family, work / "model", args.rank, args.lr, cfg.max_grad_norm, targets)
            ab = interleaved(config, cache, family, plain, args.interleaved_steps, args.warmup, args.st_set)

            def ab_ratio(kind: str) -> float:
                st_sum, plain_sum = (sum(ab[k][kind][args.warmup :]) for k in ("st", "plain"))
                return plain_sum / st_sum

            pairs = [p / s for s, p in zip(ab["st"]["step_s"][args.warmup :], ab["plain"]["step_s"][args.warmup :])]

        if args.profile:
            args.profile.write_text("")
            torch.set_num_threads(args.threads)
            profile_to(args.profile, "st train (run_train, setup included)", run_st, config, cache, work / "out",
                       total, args.st_set)  # fmt: skip
            plain = Plain(family, work / "model", args.rank, args.lr, cfg.max_grad_norm, targets)
            profile_to(args.profile, "plain loop", plain.run, memory, keys)

        figures = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
            f"{platform.python_version()}",
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
            "device": str(plain.device),
            "threads": args.threads,
            "family": args.family,
            "images": args.images,
            "resolution": args.resolution,
            "latent_shapes": [list(b) for b in buckets],
            "batch": args.batch,
            "lora_rank": args.rank,
            "lora_modules": len([n for n, _ in plain.model.named_modules() if n.endswith(".lora_A")]),
            "optimizer_st": cfg.optimizer,
            "optimizer_plain": "torch.optim.AdamW",
            "steps_timed": args.steps,
            "warmup_steps": args.warmup,
            "rounds": len(st_runs),
            "setup_s": round(setup_s, 1),
            "plain_samples_per_s": round(plain_sps, 3),
            "plain_step_ms": round(args.batch / plain_sps * 1e3, 1),
            "st_samples_per_s": round(st_sps, 3),
            "st_step_ms": round(args.batch / st_sps * 1e3, 1),
            "ratio_st_over_plain": round(st_sps / plain_sps, 3),
            "ratio_per_round": [round(r, 3) for r in paired],
            "ratio_median_of_rounds": round(med(paired), 3),
            "plain_best_samples_per_s": round(best(plain_runs), 3),
            "st_best_samples_per_s": round(best(st_runs), 3),
            "ratio_best": round(best(st_runs) / best(plain_runs), 3),
            "plain_cpu_samples_per_s": round(plain_cpu_sps, 3),
            "st_cpu_samples_per_s": round(st_cpu_sps, 3),
            "ratio_cpu_st_over_plain": round(st_cpu_sps / plain_cpu_sps, 3),
            "ratio_cpu_per_round": [round(sps(a, "cpu_s") / sps(b, "cpu_s"), 3) for a, b in zip(st_runs, plain_runs)],
            "interleaved_steps": args.interleaved_steps,
            "interleaved_plain_step_ms": round(med(ab["plain"]["step_s"][args.warmup :]) * 1e3, 1) if ab else None,
            "interleaved_st_step_ms": round(med(ab["st"]["step_s"][args.warmup :]) * 1e3, 1) if ab else None,
            "interleaved_ratio_st_over_plain": round(ab_ratio("step_s"), 3) if ab else None,
            "interleaved_ratio_cpu_st_over_plain": round(ab_ratio("cpu_s"), 3) if ab else None,
            "interleaved_ratio_median_of_pairs": round(med(pairs), 3) if ab else None,
            "st_run_train_s": round(med(r["run_train_s"] for r in st_runs), 2),
            "data_load_cpu_ms_per_batch": round(load_ms, 3),
            "data_load_pct_of_st_step": round(100 * load_ms / (args.batch / st_sps * 1e3), 2),
            "data_load_pct_of_st_step_cpu": round(100 * load_ms / (args.batch / st_cpu_sps * 1e3), 2),
        }
        width = max(map(len, figures))
        for key, value in figures.items():
            print(f"{key.ljust(width)}  {value}")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
