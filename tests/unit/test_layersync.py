"""LayerSync on the tiny Flux model (1 double block, 21 single blocks; real diffusers and peft classes, random
weights): the loss a training step adds equals SimpleTuner's LayerSyncRegularizer replayed on the blocks' hidden
states, its gradient reaches the student block's LoRA only, `st train` follows another trajectory with it and resumes
exactly, and missing or refused options stop with exit 2."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.config import build_config  # noqa: E402
from pipeline.errors import ConfigError  # noqa: E402
from tests.helpers.trainers import build_trainer, first_batch  # noqa: E402
from tests.helpers.training import WEIGHTS, train  # noqa: E402

ON = ["layersync_enabled=true", "layersync_student_block=1", "layersync_teacher_block=3"]


def simpletuner_layersync(buffer: dict, student_block, teacher_block, weight: float):
    """SimpleTuner's LayerSyncRegularizer.compute_loss, line for line, on a `layer_<i>` hidden-state buffer."""
    import torch.nn.functional as F

    def resolve(idx):
        for cand in ([idx - 1] if idx > 0 else []) + [idx]:
            if buffer.get(f"layer_{cand}") is not None:
                return buffer[f"layer_{cand}"]
        raise ValueError(idx)

    def flatten(hidden):
        return hidden.reshape(hidden.shape[0], -1, hidden.shape[-1]) if hidden.ndim == 4 else hidden

    student = flatten(resolve(student_block))
    teacher = flatten(resolve(teacher_block if teacher_block is not None else student_block)).detach()
    similarity = (F.normalize(student, dim=-1) * F.normalize(teacher, dim=-1)).sum(dim=-1)
    return -similarity.mean() * weight


def capture_buffer(denoiser) -> dict:
    """SimpleTuner's Flux buffer: every block's image tokens as `layer_<i>`, double blocks then single ones."""
    buffer: dict = {}
    blocks = [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda _m, _a, out, i=i: buffer.__setitem__(f"layer_{i}", out[1]))
    return buffer


@pytest.fixture(scope="module")
def flux_run(cached):
    return cached("flux")


def test_loss_is_simpletuners_and_reaches_the_student_lora_only(flux_run, tmp_path):
    trainer = build_trainer(flux_run, tmp_path / "out", *ON, "layersync_lambda=0.5")
    assert (trainer.layersync.student, trainer.layersync.teacher) == (0, 2)  # depths 1 and 3, counted from 1
    buffer = capture_buffer(trainer.unwrapped)
    layersync, trainer.layersync = trainer.layersync, None  # the base loss alone, then the LayerSync term
    batch = first_batch(trainer)
    trainer.model.zero_grad()
    base = trainer._forward_loss(batch, 0)
    term = layersync.loss()
    value = float(term.detach())
    expected = simpletuner_layersync(buffer, 1, 3, 0.5)
    assert torch.equal(term.detach(), expected.detach()) and value != 0
    assert layersync.metrics() == {"layersync_loss": value, "layersync_similarity": pytest.approx(value / -0.5)}
    assert layersync.captured == {}  # handed over: a recomputation cannot overwrite it
    term.backward()
    grads = {n: float(p.grad.abs().sum()) for n, p in trainer.unwrapped.named_parameters()
             if "lora_B" in n and p.grad is not None}  # fmt: skip
    assert any(v > 0 for n, v in grads.items() if n.startswith("transformer_blocks.0."))
    assert all(v == 0 for n, v in grads.items() if n.startswith("single_transformer_blocks."))  # teacher detached
    assert float(base.detach()) > 0

    # Without a teacher block the student aligns to itself: exactly -lambda, and no gradient reaches the LoRA.
    alone = build_trainer(flux_run, tmp_path / "alone", "layersync_enabled=true", "layersync_student_block=2")
    assert alone.layersync.teacher == alone.layersync.student == 1
    alone.model.zero_grad()
    alone._forward_loss(first_batch(alone), 0)
    assert alone.layersync.metrics()["layersync_loss"] == pytest.approx(-0.2)


def metrics(out) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m for m in lines if "loss" in m}


def test_st_train_changes_the_trajectory_and_resumes_exactly(flux_run, tmp_path):
    root, config = flux_run
    cache, sets = root / "cache", [*ON, "layersync_lambda=5", "learning_rate=1e-3", "lora_dropout=0", "seed=3",
                        "eval_steps_interval=0"]
    train(config, cache, tmp_path / "plain", *sets[4:])
    straight = tmp_path / "straight"
    train(config, cache, straight, *sets, "checkpoint_step_interval=1")
    plain, synced = metrics(tmp_path / "plain"), metrics(straight)
    assert all(synced[s]["layersync_loss"] < 0 and -1 <= synced[s]["layersync_similarity"] <= 1 for s in (1, 2))
    # the same batches, noise and timesteps: the loss differs by the LayerSync term, then the weights do too
    assert synced[1]["loss"] == pytest.approx(plain[1]["loss"] + synced[1]["layersync_loss"], rel=1e-5)
    assert synced[2]["loss"] - synced[2]["layersync_loss"] != pytest.approx(plain[2]["loss"], rel=1e-7)
    assert (straight / WEIGHTS).read_bytes() != (tmp_path / "plain" / WEIGHTS).read_bytes()

    resumed = tmp_path / "resumed"
    train(config, cache, resumed, *sets, f'resume_from_checkpoint="{straight / "checkpoints" / "checkpoint-1"}"')
    again = metrics(resumed)
    assert list(again) == [2] and again[2] == {**again[2], **{k: synced[2][k] for k in ("loss", "layersync_loss")}}
    assert (resumed / WEIGHTS).read_bytes() == (straight / WEIGHTS).read_bytes()


def test_missing_or_bad_companion_options_exit_2_naming_them(cli, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_family": "flux", "model_type": "lora", "layersync_enabled": True}))
    result = cli("check", "-c", str(config))
    assert result.exit_code == 2, result.output
    assert "layersync_student_block is not set" in " ".join(result.output.split()), result.output
    on = {"layersync_enabled": True, "layersync_student_block": 2}
    for extra, words in (({"layersync_lambda": 0}, "layersync_lambda is 0, but LayerSync needs a weight above 0"),
                         ({"layersync_teacher_block": -1}, "layersync_teacher_block")):  # fmt: skip
        with pytest.raises(ConfigError, match=words):
            build_config({**on, **extra})
    # Off, its companions load and change nothing (as in SimpleTuner).
    build_config({"layersync_enabled": False, "layersync_lambda": 0, "layersync_student_block": 3})


def test_unsupported_families_and_combinations_refused_by_name(cached, flux_run, tmp_path):
    root, config = cached("sd1x")
    with pytest.raises(ConfigError, match="does not train model_family sd1x yet; it trains flux, ltxvideo"):
        train(config, root / "cache", tmp_path / "unet", *ON)
    root, config = flux_run
    with pytest.raises(ConfigError, match="layersync_enabled with tread_config is not supported"):
        train(config, root / "cache", tmp_path / "tread", *ON,
              'tread_config={routes=[{selection_ratio=0.5, start_layer_idx=2, end_layer_idx=4}]}')
    with pytest.raises(ConfigError, match="layersync_teacher_block is 23, but this FluxTransformer2DModel has 22"):
        train(config, root / "cache", tmp_path / "deep", *ON[:2], "layersync_teacher_block=23")
    assert not any((tmp_path / name / "final").exists() for name in ("unet", "tread", "deep"))
