"""`validation_on_startup`: a validation before the first step, of a fresh run (step-0) and of a resumed one (at the
step it resumes from, as SimpleTuner's `run_startup_validation`), saved and recorded like every other validation."""

from __future__ import annotations

import numpy as np
from PIL import Image

from tests.helpers.training import train

VALIDATION = ["validation_disable=false", 'validation_resolution="64"', "validation_num_inference_steps=2",
              "validation_step_interval=100", "mixed_precision=\"no\"", "lora_dropout=0", "learning_rate=1e-2",
              "caption_dropout_probability=0"]  # fmt: skip
IMAGE = "validation-64x64-0.png"


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_fresh_run_validates_at_step_0_beside_the_benchmark(cached, tmp_path):
    root, config = cached("sd1x")
    result = train(config, root / "cache", tmp_path / "out", *VALIDATION, "disable_benchmark=false",
                   "validation_on_startup=true")  # fmt: skip
    validation = tmp_path / "out" / "validation"
    assert sorted(p.name for p in validation.iterdir()) == ["base", "step-0", "step-2"]
    assert sorted(p.name for p in (validation / "step-0").iterdir()) == ["grid.png", IMAGE]
    assert result.manifest["validations"] == ["base", "step-0", "step-2"]
    assert "validation/step-0/" + IMAGE in {o["path"] for o in result.manifest["outputs"]}
    # Before the first step the LoRA is zero: the startup validation renders the base model, as the benchmark does.
    assert np.array_equal(pixels(validation / "step-0" / IMAGE), pixels(validation / "base" / IMAGE))
    assert not np.array_equal(pixels(validation / "step-0" / IMAGE), pixels(validation / "step-2" / IMAGE))


def test_resumed_run_validates_again_at_its_step(cached, tmp_path):
    root, config = cached("sd1x")
    out = tmp_path / "out"
    train(config, root / "cache", out, *VALIDATION, "max_train_steps=1", "checkpoint_step_interval=1")
    first = pixels(out / "validation" / "step-1" / IMAGE)
    result = train(config, root / "cache", out, *VALIDATION, "max_train_steps=2", "checkpoint_step_interval=1",
                   'resume_from_checkpoint="latest"', "validation_on_startup=true")  # fmt: skip
    validation = out / "validation"
    assert sorted(p.name for p in validation.iterdir()) == ["step-1", "step-1-startup", "step-2"]
    assert result.manifest["validations"] == ["step-1-startup", "step-2"]
    # The earlier run's render is kept, and the resumed weights render exactly what they rendered at step 1.
    assert np.array_equal(pixels(validation / "step-1" / IMAGE), first)
    assert np.array_equal(pixels(validation / "step-1-startup" / IMAGE), first)

