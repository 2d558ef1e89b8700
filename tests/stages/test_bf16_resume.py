"""Exact resume of bf16 runs whose optimizer rounds the bf16 weights stochastically (its random bits come from the
global torch generator, which checkpoints hold): a run interrupted at step 2 and resumed to step 4, each in an `st
train` process of its own as a user resumes, equals the uninterrupted 4-step run byte for byte."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers.training import QUICK, st_train_args

RUNS = {
    # SimpleTuner's prodigy (Prodigy-Plus-Schedule-Free, stochastic_rounding on) on a bf16 LoRA; d_coef 10 lets d grow
    # within the tiny run, so the steps after the resume depend on the state it restored.
    "prodigy-lora": ('optimizer="prodigy"', 'optimizer_config="d_coef=10"', "prodigy_steps=4"),
    # model_type full under bf16: every UNet weight bf16, adamw_bf16's stochastic rounding.
    "adamw_bf16-full": ('optimizer="adamw_bf16"', 'model_type="full"', "learning_rate=1e-3"),
    # st's SOAP (fp32 statistics, bases and moments beside bf16 LoRA weights); precondition_frequency 2 refreshes the
    # bases by power iteration + QR at step 3, after the resume, from the restored statistics.
    "soap-lora": ('optimizer="soap"', 'optimizer_config="precondition_frequency=2"', "learning_rate=1e-3"),
}
COMMON = ('mixed_precision="bf16"', "checkpoint_step_interval=2", "max_train_steps=4", "lora_dropout=0",
          "caption_dropout_probability=0")  # fmt: skip


def _st_train(setup: tuple[Path, Path], out: Path, *sets: str) -> subprocess.CompletedProcess:
    """`st train` as its own process, on one thread as this test process (the two runs compared use the same count;
    the tiny model gains nothing from more on a busy machine)."""
    return subprocess.run(st_train_args(setup, out, *sets), capture_output=True, text=True, timeout=600)


def _weights(out: Path) -> dict[str, bytes]:
    """The final weight files of a run, by path under final/."""
    return {str(p.relative_to(out / "final")): p.read_bytes() for p in sorted((out / "final").rglob("*.safetensors"))}


def _steps(out: Path) -> dict[int, dict]:
    """step -> its training record (loss, lr, prodigy's d) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(("loss", "lr", "prodigy_"))}
            for r in records if "loss" in r}  # fmt: skip


@pytest.mark.parametrize("run", sorted(RUNS))
def test_a_bf16_run_resumed_at_step_2_equals_the_uninterrupted_run(cached, tmp_path, run):
    import torch

    from pipeline.publish.lora import load_tensors

    setup = cached("sd1x")
    sets = (*QUICK, *COMMON, *RUNS[run])
    straight = tmp_path / "straight"
    done = _st_train(setup, straight, *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    weights = _weights(straight)
    assert weights
    for name in weights:  # the trained weights are held and saved in bf16
        dtypes = {v.dtype for v in load_tensors(straight / "final" / name).values() if v.is_floating_point()}
        assert dtypes == {torch.bfloat16}, (name, dtypes)
    resumed = tmp_path / "resumed"
    checkpoint = straight / "checkpoints" / "checkpoint-2"
    done = _st_train(setup, resumed, *sets, f'resume_from_checkpoint="{checkpoint}"')
    assert done.returncode == 0, done.stderr[-3000:]
    first = _steps(straight)
    if run.startswith("prodigy"):  # d adapts within the run (at step 2 or 3, as the batch draws fall): the resumed
        # steps reproduce it only from the restored state (p0, s, z, d)
        assert max(first[s]["prodigy_d"] for s in (2, 3, 4)) > first[1]["prodigy_d"] == 1e-6, first
    again = _steps(resumed)
    assert sorted(again) == [3, 4] and again == {s: v for s, v in first.items() if s > 2}
    assert _weights(resumed) == weights
