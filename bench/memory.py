"""Memory benchmark: what each `base_model_precision` costs a LoRA run on a real SDXL UNet and a Flux transformer.

Models (random weights, no download), built from their published configs (bench/gpu.py's SDXL_UNET and FLUX_DEV):
- sdxl: the SDXL UNet (2.6 B parameters).
- flux: the Flux.1-dev transformer with its depth reduced to 2 double + 4 single blocks (of 19 + 38; every block
  the same size as in the 12 B model), so that its fp32 copy fits in a small machine's memory.
Weights are created on the meta device, then `to_empty` in the case's dtype on the target device and initialised in
place (each module's `reset_parameters`), so no second copy is ever held.

Cases (precision: the st options it sets; every case: LoRA rank 16 on st's default targets, gradient checkpointing,
batch 1, st's default optimizer adamw_bf16):
- fp32: mixed_precision no: frozen weights fp32 (what st loaded before they followed the training dtype).
- bf16: mixed_precision bf16, base_model_precision no_change: frozen weights bf16, LoRA fp32 (SimpleTuner's way).
- int8-quanto, int4-quanto, int8-torchao: mixed_precision bf16 and that base_model_precision (quantised after the
  bf16 load, with quantize_via cpu's code, on the device the weights are on).
- fp8-torchao: the same, CUDA compute capability 8.9 or newer only. nf4-bnb and int4-torchao quantise while
  diffusers loads a checkpoint, which a randomly built model has not: not measured.
A case that `st train` would refuse on this machine (pipeline.quantise.check) is listed as not run, with the reason.

Each case runs in its own process, built and stepped with st's own pieces (BasePrecision, quantise, speed's
denoiser set-up, adapters.attach, upcast_trainable, the Objective, build_optimizer, accelerate's autocast), on a
random batch: on CUDA 256 px (32x32 latents), SDXL 77 text tokens, Flux 512; on a CPU 32 px (4x4 latents) and 8 Flux
text tokens (a CPU without native bf16 takes minutes per bf16 step at 256 px; at 32 px the weights, adapters and
optimizer state are nearly all of the memory, which is what is compared). `--latent` and `--flux-tokens` set these.
Figures:
- parameter bytes of the frozen denoiser before adapters (pipeline.quantise.parameter_bytes: quantised tensors count
  their packed data and scales);
- peak resident memory (VmHWM of /proc/self/status): while building and quantising ("load"), then reset (writing 5 to
  /proc/self/clear_refs) and read after the training steps ("train"); the process's resident memory after its
  imports, before any model, is given as "base";
- time of the last step (the first also allocates the optimizer state);
- on CUDA, peak device memory over the steps (torch.cuda.max_memory_allocated, reset after loading).
Ratios are to bf16 and to fp32 of the same model. A case whose weights would not fit in the memory available now
(MemAvailable, or free device memory, with a margin) is not run: its fp32/bf16 parameter bytes are then counted
from the parameter count (numel x element size) without materialising anything, and the row says so.

Run: `.venv/bin/python bench/memory.py [--cases sdxl,flux] [--precisions fp32,bf16,int8-quanto,...] [--json out.json]`;
`--quick` runs the same code on tiny models (a smoke test of the bench itself).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODELS = ("sdxl", "flux")
PRECISIONS = ("fp32", "bf16", "int8-quanto", "int4-quanto", "int8-torchao", "fp8-torchao")
FLUX_DEPTH = {"num_layers": 2, "num_single_layers": 4}
LATENT = 32  # 256 px
# A CPU without native bf16 runs a bf16 step of these models 3-40x slower than fp32 (minutes per step at 256 px):
# there the steps run at 32 px with 8 Flux text tokens, where the weights are most of the memory.
CPU_LATENT, CPU_FLUX_TOKENS = 4, 8
GIB = 2**30


def st_options(precision: str) -> dict[str, Any]:
    """The st options of a precision case."""
    if precision == "fp32":
        return {"mixed_precision": "no"}
    if precision == "bf16":
        return {"mixed_precision": "bf16"}
    return {"mixed_precision": "bf16", "base_model_precision": precision, "base_model_default_dtype": "bf16"}


def st_config(family: str, precision: str):
    """The config `st train` would run this case with (every option the case relies on stated)."""
    from pipeline.config import build_config

    raw = {"model_family": family, "model_type": "lora", "lora_rank": 16, "lora_dropout": 0.0, "train_batch_size": 1,
           "learning_rate": 1e-4, "caption_dropout_probability": 0.0, "gradient_checkpointing": True, "seed": 0,
           **st_options(precision)}  # fmt: skip
    config, _ = build_config(raw)
    return config


def refusal(family: str, precision: str) -> str | None:
    """Why `st train` would refuse this case on this machine (None: it runs)."""
    from pipeline.errors import UserError
    from pipeline.quantise import check

    try:
        check(st_config(family, precision))
    except UserError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------------------------------------ one case (child)


def train_case(model: str, quick: bool, latent: int, flux_tokens: int):
    """bench/gpu.py's TrainCase of `model`, batch 1 at `latent` x `latent` latents (Flux: `flux_tokens` T5 tokens)."""
    from gpu import FLUX_DEV, SDXL_UNET, TrainCase, train_cases

    if quick:
        return train_cases(smoke=True)[model]
    size = f"{latent * 8} px"
    if model == "sdxl":
        return TrainCase("sdxl", "sdxl", "UNet2DConditionModel", SDXL_UNET, 1, latent, 77, 2048, 1280, True,
                         f"SDXL UNet, batch 1, {size}, 77 text tokens")  # fmt: skip
    flux = {**FLUX_DEV, **FLUX_DEPTH}
    return TrainCase("flux", "flux", "FluxTransformer2DModel", flux, 1, latent, flux_tokens, 4096, 768, True,
                     f"Flux.1-dev transformer with 2 double + 4 single blocks (of 19 + 38), batch 1, {size}, "
                     f"{flux_tokens} text tokens")  # fmt: skip


def status_kib(field: str) -> int:
    """A `/proc/self/status` figure in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def available_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


def release_freed_memory() -> None:
    """Return freed heap memory to the system, so that resident figures count what is held."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def build_in_place(case, dtype, device, seed: int = 0):
    """The model on the meta device, then allocated once in `dtype` on `device` and initialised in place."""
    import diffusers
    import torch
    from gpu import default_dtype

    with torch.device("meta"), default_dtype(dtype):
        model = getattr(diffusers, case.model_class)(**case.config)
    model = model.to_empty(device=device)
    torch.manual_seed(seed)
    initialised: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            own = list(module.parameters(recurse=False))
            if own and hasattr(module, "reset_parameters"):
                module.reset_parameters()
                initialised.update(id(p) for p in own)
        for param in model.parameters():
            if id(param) not in initialised:
                param.normal_(0.0, 0.02)
        for buffer in model.buffers():
            buffer.zero_()
    return model


def run_case(model_name: str, precision_name: str, args) -> dict[str, Any]:
    """Build, quantise and train `steps` LoRA steps in this process; the figures as a dict."""
    import diffusers
    import torch
    from accelerate import Accelerator
    from gpu import make_batch

    from pipeline import speed
    from pipeline.families import get_family
    from pipeline.quantise import BasePrecision, parameter_bytes, quantise, upcast_trainable
    from pipeline.train import adapters
    from pipeline.train.objectives import Objective
    from pipeline.train.optim import build_optimizer, clip_gradients, optimizer_train_mode
    from pipeline.train.options import AdapterOptions, ObjectiveOptions, OptimizerOptions
    from pipeline.train.trainer import _reset_accelerator_state

    base_rss = status_kib("VmRSS") * 1024
    case = train_case(model_name, args.quick, args.latent, args.flux_tokens)
    family = get_family(case.family)
    config = st_config(case.family, precision_name)
    precision = BasePrecision.from_config(config)
    _reset_accelerator_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision)
    device = accelerator.device
    cuda = device.type == "cuda"
    row: dict[str, Any] = {"model": model_name, "precision": precision_name, "description": case.description,
                           "device": str(device), "base_rss": base_rss}  # fmt: skip

    with torch.device("meta"):
        numel = sum(p.numel() for p in getattr(diffusers, case.model_class)(**case.config).parameters())
    dtype = precision.torch_dtype()
    unquantised = numel * dtype.itemsize
    row["parameters"] = numel
    needed = int(unquantised * 1.3) + (0 if cuda else 2 * GIB)  # the weights, activations and the process
    available = available_bytes(device)
    if needed > available:
        row.update(status="not run", reason=f"needs about {needed / GIB:.1f} GiB, {available / GIB:.1f} GiB available")
        if not precision.quantised:  # numel x element size, nothing materialised
            row.update(parameter_bytes=unquantised, parameter_bytes_counted=True)
        return row

    started = time.perf_counter()
    model = build_in_place(case, dtype, device)
    speed.setup_denoiser(model, config)
    quantise(model, precision, family.name, device)
    row["parameter_bytes"] = parameter_bytes(model)
    params = adapters.attach(model, AdapterOptions.from_config(config), family)
    upcast_trainable(params)
    model.train()
    objective = Objective(ObjectiveOptions.from_config(config), kind=family.prediction_type,
                          scheduler_config=_scheduler(family), default_shift=family.default_flow_shift)  # fmt: skip
    optimizer_options = OptimizerOptions.from_config(config)
    optimizer = build_optimizer(params, optimizer_options, device_type=device.type)
    model, optimizer = accelerator.prepare(model, optimizer)
    optimizer_train_mode(optimizer)
    row["load_s"] = time.perf_counter() - started
    batch = make_batch(case)
    generator = torch.Generator(device="cpu").manual_seed(0)

    release_freed_memory()
    row["load_peak_rss"] = status_kib("VmHWM") * 1024
    row["loaded_rss"] = status_kib("VmRSS") * 1024
    reset_peak_rss()
    if cuda:
        row["loaded_device"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for step in range(args.steps):
        started = time.perf_counter()
        latents = batch.latents.to(device)
        noised = objective.draw(latents, generator, step)
        guidance = objective.guidance(latents.shape[0], generator)
        text = {k: v.to(device) for k, v in family.collate_text(batch.texts).items()}
        guidance = None if guidance is None else guidance.to(device)
        with accelerator.autocast():
            prediction = family.denoiser_forward(model, noised.noisy, noised.timesteps, text, batch.meta,
                                                 guidance=guidance)  # fmt: skip
        loss = objective.loss(prediction.float(), noised, step)
        accelerator.backward(loss)
        clip_gradients(params, optimizer_options)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - started)
    row.update(status="ok", train_peak_rss=status_kib("VmHWM") * 1024, step_s=times[-1], losses=losses)
    if cuda:
        row["train_peak_device"] = torch.cuda.max_memory_allocated(device)
    return row


def _scheduler(family) -> dict[str, Any]:
    from gpu import DDPM_SCHEDULER, FLOW_SCHEDULER

    return FLOW_SCHEDULER if family.prediction_type == "flow_matching" else DDPM_SCHEDULER


# ------------------------------------------------------------------------------------------------- runner (parent)


def measure(model: str, precision: str, args) -> dict[str, Any]:
    """One case in its own process (so that its peak memory is its own)."""
    reason = refusal(model, precision)  # the model names are their families' names
    if reason is not None:
        return {"model": model, "precision": precision, "status": "not run", "reason": reason}
    command = [sys.executable, __file__, "--child", model, precision, "--steps", str(args.steps), "--latent",
               str(args.latent), "--flux-tokens", str(args.flux_tokens)]  # fmt: skip
    command += ["--quick"] if args.quick else []
    if args.threads:
        command += ["--threads", str(args.threads)]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)  # a failed case is a row
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]  # the exception's message
        return {"model": model, "precision": precision, "status": "failed", "reason": " ".join(tail)}
    return json.loads(lines[-1])


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each figure as a ratio to the same model's bf16 and fp32 rows."""
    figures = ("parameter_bytes", "train_peak_rss", "train_peak_device", "step_s")
    for row in rows:
        for reference in ("bf16", "fp32"):
            ref = next((r for r in rows if r["model"] == row["model"] and r["precision"] == reference), None)
            for name in figures:
                if ref and row.get(name) and ref.get(name):
                    row[f"{name}_vs_{reference}"] = row[name] / ref[name]


def print_table(rows: list[dict[str, Any]]) -> None:
    cuda = any("train_peak_device" in r for r in rows)

    def gib(value) -> str:
        return "-" if value is None else f"{value / GIB:.3g}"

    def ratio(row, name) -> str:
        return "/".join("-" if row.get(f"{name}_vs_{r}") is None else f"{row[f'{name}_vs_{r}']:.2f}"
                        for r in ("bf16", "fp32"))  # fmt: skip

    head = ["model", "precision", "params GiB", "x bf16/fp32", "load peak", "train peak", "x bf16/fp32", "step s"]
    head += ["device peak", "x bf16/fp32"] if cuda else []
    print("  ".join(f"{h:>12s}" for h in head))
    for row in rows:
        if row.get("status") != "ok":
            counted = " (counted, not built)" if row.get("parameter_bytes_counted") else ""
            print(f"{row['model']:>12s}  {row['precision']:>12s}  {gib(row.get('parameter_bytes')):>12s}{counted}  "
                  f"{row['status']}: {row.get('reason', '')}")  # fmt: skip
            continue
        cells = [row["model"], row["precision"], gib(row["parameter_bytes"]), ratio(row, "parameter_bytes"),
                 gib(row["load_peak_rss"]), gib(row["train_peak_rss"]), ratio(row, "train_peak_rss"),
                 f"{row['step_s']:.2f}"]  # fmt: skip
        if cuda:
            cells += [gib(row.get("train_peak_device")), ratio(row, "train_peak_device")]
        print("  ".join(f"{c:>12s}" for c in cells))
    bases = [r["base_rss"] for r in rows if "base_rss" in r]
    if bases:
        print(f"memory in GiB; resident memory of a case's process after its imports, before any model: "
              f"{min(bases) / GIB:.2f}-{max(bases) / GIB:.2f} GiB")  # fmt: skip
    for description in sorted({r["description"] for r in rows if "description" in r}):
        print(f"model: {description}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(MODELS), help="models: sdxl, flux")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--quick", action="store_true", help="tiny models, the same code")
    parser.add_argument("--steps", type=int, default=2, help="LoRA training steps per case")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per case (default: torch's)")
    parser.add_argument("--latent", type=int, default=None, help="latent edge (default 32, 256 px; on a CPU 4)")
    parser.add_argument("--flux-tokens", type=int, default=None, help="Flux's T5 tokens (default 512; on a CPU 8)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows and the machine as JSON")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.latent is None or args.flux_tokens is None:
        import torch

        cuda = torch.cuda.is_available()
        args.latent = args.latent or (LATENT if cuda else CPU_LATENT)
        args.flux_tokens = args.flux_tokens or (512 if cuda else CPU_FLUX_TOKENS)
    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(run_case(*args.child, args)), flush=True)
        return 0
    models = [m for m in args.cases.split(",") if m]
    precisions = [p for p in args.precisions.split(",") if p]
    unknown = sorted(set(models) - set(MODELS)) + sorted(set(precisions) - set(PRECISIONS))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; models: {', '.join(MODELS)}; precisions: "
                     f"{', '.join(PRECISIONS)}")  # fmt: skip
    rows = []
    for model in models:
        for precision in precisions:
            started = time.perf_counter()
            row = measure(model, precision, args)
            print(f"  {model} {precision}: {row['status']} ({time.perf_counter() - started:.0f} s)", flush=True)
            rows.append(row)
            add_ratios(rows)
            if args.json:  # after every case: a long run stopped early keeps what it measured
                sizes = {"quick": args.quick, "steps": args.steps, "latent": args.latent,
                         "flux_tokens": args.flux_tokens}  # fmt: skip
                doc = {"date": time.strftime("%Y-%m-%d"), **sizes, "machine": machine(), "rows": rows}
                args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print_table(rows)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def machine() -> dict[str, Any]:
    import torch

    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


if __name__ == "__main__":
    sys.exit(main())
