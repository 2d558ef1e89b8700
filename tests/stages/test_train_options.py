"""`st train` options as a user notices them: EMA, interruption and resume, checkpoint limits, divergence, init_lora,
prediction type, optimizers, LR schedules, mixed precision, accumulation, caption dropout, Flux options, trackers."""

from __future__ import annotations

import importlib.util
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, UserError
from pipeline.train.checkpoint import list_checkpoints, read_checkpoint
from pipeline.train.trainer import TrainingDiverged
from tests.helpers.training import QUICK, run_st_train, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(cached):
    """The shared cached sample dataset per family (tests/stages/conftest.py)."""
    return cached


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory):
    """A plain 2-step sd1x LoRA run (QUICK options: seed unset -> 0, epsilon, adamw_bf16, report_to none)."""
    root, config = data("sd1x")
    out = tmp_path_factory.mktemp("baseline") / "out"
    train(config, root / "cache", out)
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(out) if "loss" in r}


def _data_log(out: Path) -> list[dict]:
    lines = (out / "logs" / "data-rank0.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "keys" in r]


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------------------------------------------- EMA


def test_ema_weights_are_saved_and_validated_side_by_side(data, tmp_path):
    import torch

    root, config = data("sd1x")
    out = tmp_path / "out"
    train(config, root / "cache", out, "use_ema=true", "ema_decay=0.5", "checkpoint_step_interval=2",
          "validation_disable=false", 'ema_validation="comparison"', 'validation_resolution="64"',
          "validation_num_inference_steps=1")  # fmt: skip
    ema = _load(out / "final" / "ema_weights.safetensors")
    trained = _load(out / "checkpoints" / "checkpoint-2" / "weights.safetensors")  # the trainable weights by name
    assert ema and set(ema) == set(trained)
    final = _load(out / "final" / "pytorch_lora_weights.safetensors")
    # peft names `x.lora_A.default.weight`; the diffusers file names it `unet.x.lora_A.weight`.
    as_final = {f"unet.{name.replace('.default', '')}": name for name in ema}
    assert set(as_final) == set(final)
    for key, name in as_final.items():
        assert ema[name].shape == final[key].shape
    assert any(not torch.equal(ema[name], final[key]) for key, name in as_final.items())
    # After 2 steps, lora_B (zero at init) has moved in the trained weights and lagged behind in the EMA.
    b_keys = [k for k in as_final if ".lora_B." in k]
    assert b_keys and all(not torch.equal(ema[as_final[k]], final[k]) for k in b_keys)
    checkpoint = read_checkpoint(out / "checkpoints" / "checkpoint-2")
    assert checkpoint["ema"] is not None and set(checkpoint["ema"]) == set(ema)

    validation = out / "validation"
    assert sorted(p.name for p in validation.iterdir()) == ["step-2", "step-2-ema"]
    for label in ("step-2", "step-2-ema"):
        assert (validation / label / "grid.png").is_file()
        assert (validation / label / "validation-64x64-0.png").is_file()


# ---------------------------------------------------------------------------------------------- SIGINT and resume


def _cli(config: Path, cache: Path, out: Path, *sets: str) -> list[str]:
    args = [sys.executable, "-m", "pipeline.cli", "train", "-c", str(config), "-i", str(cache), "-o", str(out)]
    for item in [*QUICK, *sets]:
        args += ["--set", item]
    return args


def test_sigint_saves_a_checkpoint_and_the_run_resumes_from_it(data, tmp_path):
    root, config = data("sd1x")
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli(config, root / "cache", out, "max_train_steps=5000"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        # The first training step's line (not the step-0 evaluation line): the signal lands while training.
        while not (metrics.is_file() and '"loss"' in metrics.read_text()):
            assert proc.poll() is None, f"train exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no metrics line within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr[-3000:]
    assert "resume_from_checkpoint" in stdout + stderr
    found = list_checkpoints(out / "checkpoints")
    assert len(found) == 1, found
    step, folder = found[0]
    assert folder.name == f"checkpoint-{step}" and step >= 1 and (folder / "manifest.json").is_file()
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert read_checkpoint(folder)["info"]["step"] == step
    assert not (out / "manifest.json").exists()  # an interrupted run is not a finished one
    before, seen = _losses(out), _data_log(out)
    assert sorted(before) == list(range(1, step + 1))
    assert [r["step"] for r in seen] == list(range(1, step + 1))

    resumed = train(config, root / "cache", out, f"max_train_steps={step + 2}", 'resume_from_checkpoint="latest"')
    assert resumed.manifest["metrics"]["steps"] == step + 2
    records = [r["step"] for r in _records(out) if "loss" in r]
    assert records == list(range(1, step + 3))  # continues at step + 1: no gap, no repeat
    after = _losses(out)
    assert {s: after[s] for s in before} == before
    log = _data_log(out)
    assert [r["step"] for r in log] == list(range(1, step + 3))
    assert log[:step] == seen


# ---------------------------------------------------------------------------------------------- checkpoint limits


def test_checkpoint_limits_keep_the_newest(data, tmp_path):
    root, config = data("sd1x")
    result = train(config, root / "cache", tmp_path / "limited", "max_train_steps=4", "checkpoint_step_interval=1",
                   "checkpoints_total_limit=2")  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "limited" / "checkpoints").iterdir())
    assert names == ["checkpoint-3", "checkpoint-4"]
    assert [c["step"] for c in result.manifest["checkpoints"]] == [3, 4]

    train(config, root / "cache", tmp_path / "rolling", "max_train_steps=3", "checkpointing_rolling_steps=1",
          "checkpoints_rolling_total_limit=2")  # fmt: skip
    names = sorted(p.name for p in (tmp_path / "rolling" / "checkpoints").iterdir())
    assert names == ["rolling-2", "rolling-3"]


# ------------------------------------------------------------------------------------------------------ divergence


def test_a_diverging_loss_stops_with_advice_and_keeps_the_checkpoint(data, tmp_path):
    root, config = data("sd1x")
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged) as caught:
        train(config, root / "cache", out, "max_train_steps=6", "learning_rate=1e30", 'optimizer="adamw_bf16"',
              "max_grad_norm=0", "checkpoint_step_interval=1")  # fmt: skip
    assert isinstance(caught.value, UserError)
    message = str(caught.value)
    step = int(message.split("NaN/Inf at step ")[1].split(";")[0])
    assert 1 <= step <= 6
    assert "lower learning_rate" in message
    found = list_checkpoints(out / "checkpoints")
    assert [s for s, _ in found] == list(range(1, step))  # none for the diverged step
    if found:
        assert f"the latest checkpoint is {found[-1][1]}" in message
        loaded = read_checkpoint(found[-1][1])
        assert loaded["info"]["step"] == step - 1 and loaded["weights"]
        assert math.isfinite(loaded["info"]["last_loss"])
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert not (out / "final").exists() and not (out / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------------- init_lora


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", "bfloat16"), ("no", "float32")])
def test_init_lora_starts_from_the_given_weights(data, baseline, tmp_path, precision, dtype):
    """The baseline ran under the default bf16 (kept on a CPU with AVX512-BF16 / AMX), so its LoRA was held, trained
    and saved in bf16, as SimpleTuner does. Started from it with learning_rate 0, a bf16 run gives it back bit for bit,
    and an fp32 run (mixed_precision no) holds and saves the same values in fp32."""
    import torch

    root, config = data("sd1x")
    init = baseline / "final" / "pytorch_lora_weights.safetensors"
    start = _load(init)
    assert {v.dtype for v in start.values()} == {torch.bfloat16}
    # lora_B starts at zero, so a fresh run's weights could not equal these.
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in start.items())
    train(config, root / "cache", tmp_path / "out", f'init_lora="{init}"', "learning_rate=0",
          f'mixed_precision="{precision}"', "checkpoint_step_interval=1")  # fmt: skip
    end = _load(tmp_path / "out" / "final" / "pytorch_lora_weights.safetensors")
    assert set(end) == set(start)
    assert {v.dtype for v in end.values()} == {getattr(torch, dtype)}
    assert all(torch.equal(end[k], start[k].to(end[k].dtype)) for k in start)
    # the trained parameters themselves (what a checkpoint stores) are held in that dtype
    weights = read_checkpoint(tmp_path / "out" / "checkpoints" / "checkpoint-2")["weights"]
    assert weights and {v.dtype for v in weights.values()} == {getattr(torch, dtype)}


# ------------------------------------------------------------------------------------------ objective and optimizer


def test_v_prediction_changes_the_objective(data, baseline, tmp_path, st_log):
    root, config = data("sd1x")
    records = st_log()
    train(config, root / "cache", tmp_path / "out", 'prediction_type="v_prediction"')
    messages = [r.getMessage() for r in records]
    assert any(m.startswith("objective: v_prediction") for m in messages), messages
    v, epsilon = _losses(tmp_path / "out"), _losses(baseline)
    assert sorted(v) == [1, 2] and all(math.isfinite(x) for x in v.values())
    assert v[1] != epsilon[1]  # same seed, same batch and noise: only the target differs
    # the same batches in the same order
    assert [r["keys"] for r in _data_log(tmp_path / "out")] == [r["keys"] for r in _data_log(baseline)]


@pytest.mark.parametrize("optimizer", ["prodigy", "adamw_schedulefree"])
def test_other_optimizers_train(data, tmp_path, optimizer):
    import torch

    root, config = data("sd1x")
    # SimpleTuner's prodigy estimates the step size and runs at lr 1.0: learning_rate is not used (d0 raised so
    # that 2 steps move the weights visibly).
    sets = ['optimizer_config="d0=1e-3"'] if optimizer == "prodigy" else ["learning_rate=1e-3"]
    result = train(config, root / "cache", tmp_path / "out", f'optimizer="{optimizer}"', *sets)
    assert result.manifest["metrics"]["steps"] == 2
    losses = _losses(tmp_path / "out")
    assert sorted(losses) == [1, 2] and all(math.isfinite(x) for x in losses.values())
    weights = _load(tmp_path / "out" / "final" / "pytorch_lora_weights.safetensors")
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in weights.items())  # the weights moved
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_prodigy_resumes_exactly_and_logs_its_step_size(data, tmp_path):
    """SimpleTuner's prodigy (Prodigy-Plus-Schedule-Free): a checkpoint holds the averaged weights and the optimizer's
    state (z, p0, s, moments, d per group); a run resumed from it equals the uninterrupted run bit for bit."""
    root, config = data("sd1x")
    # d_coef 10: d grows within 2 steps of the tiny LoRA; the step-0 and per-checkpoint evaluations and the checkpoint
    # switch the weights to their average and back in both runs.
    sets = ['optimizer="prodigy"', 'optimizer_config="d_coef=10"', "prodigy_steps=4", "checkpoint_step_interval=2",
            'mixed_precision="no"', "max_train_steps=4"]  # fmt: skip
    # Separate `st train` processes, as a user resumes: nothing an earlier in-process run left behind can reach them.
    straight = tmp_path / "straight"
    done = run_st_train((root, config), straight, *QUICK, *sets)
    assert done.returncode == 0, done.stderr[-3000:]
    records = {r["step"]: r for r in _records(straight) if "loss" in r}
    # Step 1 cannot adapt d (the weights are still at their start). Whether a later step raises it depends on the sign
    # of Prodigy's numerator for these batch-1 draws (the cached latents differ in their last bits between machines),
    # so this run only checks what is logged: d never falls, lr x d is logged, and prodigy_steps 4 freezes it at step
    # 4. d's growth itself is tested on fixed gradients in tests/unit/test_optim.py.
    assert records[1]["prodigy_d"] == 1e-6, records
    assert all(records[s + 1]["prodigy_d"] >= records[s]["prodigy_d"] for s in (1, 2, 3)), records
    assert all(records[s]["prodigy_effective_lr"] == records[s]["prodigy_d"] for s in (1, 2, 3, 4))
    assert records[4]["prodigy_d"] == records[3]["prodigy_d"]
    resumed = tmp_path / "resumed"
    checkpoint = straight / "checkpoints" / "checkpoint-2"
    done = run_st_train((root, config), resumed, *QUICK, *sets, f'resume_from_checkpoint="{checkpoint}"')
    assert done.returncode == 0, done.stderr[-3000:]
    again = {r["step"]: r for r in _records(resumed) if "loss" in r}
    assert sorted(again) == [3, 4]
    assert [again[s]["loss"] for s in (3, 4)] == [records[s]["loss"] for s in (3, 4)]
    assert [again[s]["prodigy_d"] for s in (3, 4)] == [records[s]["prodigy_d"] for s in (3, 4)]
    weights = Path("final") / "pytorch_lora_weights.safetensors"
    assert (resumed / weights).read_bytes() == (straight / weights).read_bytes()


def test_schedule_free_exports_its_averaged_weights_after_the_final_validation(data, tmp_path):
    """The final validation renders the averaged weights and leaves them averaged: the exported LoRA is the same
    with and without validation (before, validation put the training point back and that was exported)."""
    root, config = data("sd1x")
    sets = ['optimizer="adamw_schedulefree"', "learning_rate=1e-3"]
    train(config, root / "cache", tmp_path / "plain", *sets)
    train(config, root / "cache", tmp_path / "validated", *sets, "validation_disable=false",
          'validation_resolution="64"', "validation_num_inference_steps=1")  # fmt: skip
    assert list((tmp_path / "validated" / "validation").rglob("*.png"))
    weights = Path("final") / "pytorch_lora_weights.safetensors"
    assert (tmp_path / "validated" / weights).read_bytes() == (tmp_path / "plain" / weights).read_bytes()


def test_cosine_schedule_is_simpletuners_wave(data, tmp_path):
    # SimpleTuner's Cosine: lr_end + (lr - lr_end)(1 + cos(pi t / lr_warmup_steps)) / 2, no warmup; the lr logged
    # for step t is the one set after it: t = 1..4 with a half-period of 2 -> 0.5, 0, 0.5, 1 times the lr.
    root, config = data("sd1x")
    train(config, root / "cache", tmp_path / "out", "max_train_steps=4", 'lr_scheduler="cosine"', "lr_warmup_steps=2",
          "learning_rate=1e-4", "lr_end=0.0")  # fmt: skip
    lrs = [r["lr"] for r in _records(tmp_path / "out") if "lr" in r]
    assert lrs == pytest.approx([5e-5, 0.0, 5e-5, 1e-4], abs=1e-12)


def test_gradient_accumulation_consumes_two_batches_per_step(data, tmp_path):
    root, config = data("sd1x")
    result = train(config, root / "cache", tmp_path / "out", "gradient_accumulation_steps=2")
    assert result.manifest["metrics"]["steps"] == 2
    assert result.manifest["stats"]["batch_size"] == 2
    records = _data_log(tmp_path / "out")
    assert [r["step"] for r in records] == [1, 1, 2, 2]
    assert len({tuple(r["keys"]) for r in records}) == 4  # four distinct batches
    assert sorted(_losses(tmp_path / "out")) == [1, 2]


def test_caption_dropout_one_drops_every_caption(data, tmp_path):
    root, config = data("sd1x")
    train(config, root / "cache", tmp_path / "out", "caption_dropout_probability=1.0")
    records = _data_log(tmp_path / "out")
    assert len(records) == 2
    assert all(r["dropped"] and all(r["dropped"]) for r in records)


def test_bnb_adamw8bit_on_cpu_is_a_machine_need(data, tmp_path, cli):
    import torch

    from pipeline.machine import MachineError

    if torch.cuda.is_available():
        pytest.skip("bnb-adamw8bit is supported on CUDA")
    root, config = data("sd1x")
    with pytest.raises(MachineError, match="optimizer bnb-adamw8bit needs a CUDA GPU"):
        train(config, root / "cache", tmp_path / "out", 'optimizer="bnb-adamw8bit"')
    sets = sum((["--set", s] for s in [*QUICK, 'optimizer="bnb-adamw8bit"']), [])
    result = cli("train", "-c", config, "-i", root / "cache", "-o", tmp_path / "out2", *sets)
    assert result.exit_code == 2
    assert "optimizer bnb-adamw8bit needs a CUDA GPU" in result.stderr


# ------------------------------------------------------------------------------------------------------------ Flux


def test_flux_random_guidance_and_auto_shift_train(data, tmp_path):
    root, config = data("flux")
    result = train(config, root / "cache", tmp_path / "out", 'flux_guidance_mode="random-range"',
                   "flux_guidance_min=1.0", "flux_guidance_max=4.0", "flow_schedule_auto_shift=true")  # fmt: skip
    assert result.manifest["metrics"]["steps"] == 2 and result.manifest["family"] == "flux"
    assert result.manifest["config"]["flux_guidance_mode"] == "random-range"
    assert result.manifest["config"]["flow_schedule_auto_shift"] is True
    losses = _losses(tmp_path / "out")
    assert sorted(losses) == [1, 2] and all(math.isfinite(x) and x > 0 for x in losses.values())


# -------------------------------------------------------------------------------------------------------- trackers


def test_wandb_without_the_package_says_how_to_install_it(data, tmp_path):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    root, config = data("sd1x")
    with pytest.raises(ConfigError, match="pip install"):
        train(config, root / "cache", tmp_path / "out", 'report_to="wandb"')


def test_report_to_none_writes_metrics_but_no_tensorboard_run(baseline):
    assert sorted(_losses(baseline)) == [1, 2]
    logs = baseline / "logs"
    assert not [p for p in logs.iterdir() if p.is_dir()]  # no logs/<run_name> folder
    assert not list(logs.rglob("events.out.tfevents.*"))


def test_one_process_can_train_with_different_precisions(data, tmp_path):
    """Library callers (notebooks) run several trainings in one process; accelerate's state must not leak."""
    root, config = data("sd1x")
    # One bf16 step and no evaluation passes: bf16 is emulated on CPUs without it (slow), and one step shows the run
    # trained.
    bf16 = train(config, root / "cache", tmp_path / "bf16", 'mixed_precision="bf16"', "max_train_steps=1",
                 "eval_steps_interval=0")  # fmt: skip
    plain = train(config, root / "cache", tmp_path / "plain", 'mixed_precision="no"')
    # An explicit bf16 is kept on a CPU without native bf16 (emulated: slow, but what the user asked for).
    assert bf16.manifest["config"]["mixed_precision"] == "bf16" and bf16.manifest["metrics"]["steps"] == 1
    losses = _losses(tmp_path / "bf16")
    assert sorted(losses) == [1] and all(math.isfinite(x) and x > 0 for x in losses.values())
    assert plain.manifest["config"]["mixed_precision"] == "no" and plain.manifest["metrics"]["steps"] == 2


def test_push_to_hub_without_a_reachable_hub_fails_before_training(data, tmp_path):
    root, config = data("sd1x")
    with pytest.raises(UserError, match="offline") as caught:
        train(config, root / "cache", tmp_path / "out", "push_to_hub=true", 'hub_model_id="me/my-lora"')
    assert "push_to_hub" in str(caught.value)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
