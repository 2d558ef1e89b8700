"""Benchmark one optimizer step of st's optimizers against torch.optim.AdamW on the same parameters.

Parameters: 400 LoRA-sized tensors (200 of 32x32, 100 of 320x4, 100 of 4x320; ~330k values), in bf16 and in fp32,
each with a fixed random gradient. Baseline, same process: `torch.optim.AdamW` (foreach, the PyTorch default) on a
copy of the same tensors. Each optimizer takes one untimed step (state allocation), then `--steps` timed steps; the
figure is the median over `--rounds` alternated rounds of the mean step time.

Run: `.venv/bin/python bench/optimizer_step.py [--optimizers adamw_bf16 optimi-adamw soap] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [(32, 32)] * 200 + [(320, 4)] * 100 + [(4, 320)] * 100


def build(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if name == "torch-adamw":
        return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2)
    from pipeline.config import build_config
    from pipeline.train.optim import build_optimizer
    from pipeline.train.options import OptimizerOptions

    config, _ = build_config({"optimizer": name, "learning_rate": 1e-3})
    return build_optimizer(params, OptimizerOptions.from_config(config), device_type="cpu")


def step_time(name: str, dtype: torch.dtype, steps: int) -> float:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*s, generator=generator).to(dtype)) for s in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(dtype)
    optimizer = build(name, params)
    optimizer.step()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=["adamw_bf16", "optimi-adamw", "soap"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for dtype in (torch.bfloat16, torch.float32):
        for name in args.optimizers:
            st, plain = [], []
            for _ in range(args.rounds):
                st.append(step_time(name, dtype, args.steps))
                plain.append(step_time("torch-adamw", dtype, args.steps))
            s, b = statistics.median(st), statistics.median(plain)
            print(f"{str(dtype).split('.')[-1]:8s} {name:14s} {s * 1e3:7.1f} ms/step  torch AdamW {b * 1e3:6.1f} ms/step "
                  f" ratio {s / b:.2f}")


if __name__ == "__main__":
    main()
