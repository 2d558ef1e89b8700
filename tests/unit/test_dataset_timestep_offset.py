"""A dataset's `timestep_sampling_offset` (SimpleTuner's per-dataset flow timestep bias): read and checked from the
dataset list, carried through `st prepare` and `st cache`, and added to the normal draw of the logit-normal flow
schedule for that dataset's batches only: the sigmas st train draws equal SimpleTuner's formula replayed here under
the same generator state."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import Config, load_config
from pipeline.datasets import parse_entry
from pipeline.errors import ConfigError
from pipeline.manifest import read_manifest
from pipeline.train.objectives import Objective
from tests.helpers.files import make_image, write_config
from tests.helpers.training import cached_dataset, train

OFFSET = 1.25


def simpletuner_sigmas(normal: torch.Tensor, offset: float, scale: float, shift: float) -> torch.Tensor:
    """SimpleTuner's `sample_flow_sigmas` (logit-normal branch) and `apply_flow_schedule_shift`, written out."""
    if offset:
        normal = normal + offset
    sigmas = torch.sigmoid(scale * normal)
    return (sigmas * shift) / (1 + (shift - 1) * sigmas)


def test_the_key_is_read_and_checked(tmp_path):
    make_image(tmp_path / "a" / "img.png", size=(64, 64))
    loaded = load_config(write_config(tmp_path, [], resolution=64))
    entry = {"id": "d", "instance_data_dir": "a"}
    where = tmp_path / "multidatabackend.json"
    spec = parse_entry({**entry, "timestep_sampling_offset": "-0.5"}, loaded, where, 0)
    assert spec.timestep_sampling_offset == -0.5 and spec.describe()["timestep_sampling_offset"] == -0.5
    for unset in (0, 0.0, None, ""):  # SimpleTuner reads these as no offset: the stage key stays as it was
        spec = parse_entry({**entry, "timestep_sampling_offset": unset}, loaded, where, 0)
        assert spec.timestep_sampling_offset == 0.0 and "timestep_sampling_offset" not in spec.describe()
    assert parse_entry(entry, loaded, where, 0).describe() == spec.describe()
    for bad in ("lots", float("nan"), True, [1]):
        with pytest.raises(ConfigError, match=r"'timestep_sampling_offset' must be a finite number"):
            parse_entry({**entry, "timestep_sampling_offset": bad}, loaded, where, 0)


def test_the_offset_moves_the_logit_normal_draw_as_simpletuner_does():
    """Same generator, same draws: the offset only moves the sigmas, by SimpleTuner's formula (before the shift)."""
    objective = Objective(Config(flow_schedule_shift=3.0, flow_sigmoid_scale=1.5), kind="flow_matching",
                          scheduler_config=None)  # fmt: skip
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    for offset in (OFFSET, -0.75, 0.0):
        noised = objective.draw(x, torch.Generator().manual_seed(7), step=0, offset=offset)
        replay = torch.Generator().manual_seed(7)
        noise = torch.randn(x.shape, generator=replay, dtype=torch.float32)
        normal = torch.randn(6, generator=replay, dtype=torch.float64)
        expected = simpletuner_sigmas(normal, offset, 1.5, 3.0).to(torch.float32)
        torch.testing.assert_close(noised.sigmas, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(noised.timesteps, expected * 1000, rtol=0, atol=1e-3)
        assert torch.equal(noised.noise, noise)
    plain = objective.draw(x, torch.Generator().manual_seed(7), step=0)
    assert torch.equal(plain.sigmas, objective.draw(x, torch.Generator().manual_seed(7), step=0, offset=0.0).sigmas)
    raised = objective.draw(x, torch.Generator().manual_seed(7), step=0, offset=OFFSET)
    assert torch.all(raised.sigmas > plain.sigmas)  # a positive offset: noisier timesteps, sample by sample


def test_schedules_that_do_not_read_it_warn(st_log):
    log = st_log("train")
    x = torch.randn(2, 4, 8, 8)
    uniform = Objective(Config(flow_use_uniform_schedule=True), kind="flow_matching", scheduler_config=None)
    plain = uniform.draw(x, torch.Generator().manual_seed(3), step=0)
    moved = uniform.draw(x, torch.Generator().manual_seed(3), step=0, offset=OFFSET)
    assert torch.equal(plain.sigmas, moved.sigmas)  # ignored, as in SimpleTuner
    uniform.draw(x, torch.Generator().manual_seed(3), step=0, offset=OFFSET)
    warnings = [r.getMessage() for r in log if "timestep_sampling_offset" in r.getMessage()]
    assert len(warnings) == 1 and "the uniform flow schedule" in warnings[0]  # once per run


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, tiny_model):
    """(root, config) of 4 + 4 sample images for the tiny Flux model: dataset 'detail' with timestep_sampling_offset
    OFFSET and dataset 'plain' without, one square bucket, prepared and cached."""
    root = tmp_path_factory.mktemp("offset")
    config = cached_dataset(root, "flux", tiny_model("flux"), datasets={
        "detail": (4, {"timestep_sampling_offset": OFFSET}), "plain": (4, {"timestep_sampling_offset": 0})},
        **{"--train_batch_size": 2})  # fmt: skip
    return root, config


def test_the_key_reaches_the_cache_manifest_only_where_set(two_datasets):
    root, _ = two_datasets
    for stage in ("prepare", "cache"):
        datasets = {d["id"]: d for d in read_manifest(root / stage, stage=stage)["datasets"]}
        assert datasets["detail"]["timestep_sampling_offset"] == OFFSET
        assert "timestep_sampling_offset" not in datasets["plain"]


def test_training_batches_draw_their_datasets_sigmas(two_datasets, tmp_path, monkeypatch):
    """A real `st train` of the tiny Flux model for 6 steps: each batch's sigmas, recorded as the objective returns
    them, equal SimpleTuner's formula replayed from the generator state before the batch's draws, with the offset of
    the batch's dataset ('detail': OFFSET; 'plain': none)."""
    root, config = two_datasets
    seen = []
    original = Objective.draw

    def recording(self, latents, generator, step, offset=0.0):
        state = generator.get_state()
        noised = original(self, latents, generator, step, offset)
        seen.append((state, latents.shape, self.shift_for(latents), noised.sigmas.cpu()))
        return noised

    monkeypatch.setattr(Objective, "draw", recording)
    train(config, root / "cache", tmp_path / "out", "max_train_steps=6", "train_batch_size=2", "eval_steps_interval=0")
    records = [json.loads(line) for line in (tmp_path / "out" / "logs" / "data-rank0.jsonl").read_text().splitlines()]
    datasets = [("detail" if any(k in keys for k in _keys(root, "detail")) else "plain")
                for keys in (r["keys"] for r in records if "keys" in r)]  # fmt: skip
    assert len(seen) == len(datasets) == 6 and set(datasets) == {"detail", "plain"}
    for (state, shape, shift, sigmas), dataset in zip(seen, datasets):
        replay = torch.Generator().manual_seed(0)
        replay.set_state(state)
        torch.randn(shape, generator=replay, dtype=torch.float32)  # the noise, drawn first
        normal = torch.randn(shape[0], generator=replay, dtype=torch.float64)
        expected = simpletuner_sigmas(normal, OFFSET if dataset == "detail" else 0.0, 1.0, shift)
        torch.testing.assert_close(sigmas, expected.clamp(0, 1).to(torch.float32), rtol=0, atol=1e-6)


def _keys(root, dataset_id: str) -> set[str]:
    from pipeline.train.data import CacheIndex

    index = CacheIndex(root / "cache", read_manifest(root / "cache", stage="cache"))
    return {k for (d, _), keys in index.groups.items() if d == dataset_id for k in keys}
