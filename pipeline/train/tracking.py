"""Where training numbers go: metrics.jsonl always, and TensorBoard or Weights & Biases as `report_to` says."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..log import get_logger

log = get_logger("train")


class Tracker:
    """Writes one JSON line per optimizer step and forwards scalars and images to the chosen tracker."""

    def __init__(self, out_dir: Path, *, report_to: str, logging_dir: Path, project: str, run_name: str,
                 config: dict[str, Any], resume_step: int = 0) -> None:  # fmt: skip
        self.metrics_path = out_dir / "metrics.jsonl"
        self._trim_metrics(resume_step)
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")
        self._tb = None
        self._wandb = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            logging_dir.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(log_dir=str(logging_dir / run_name))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError("report_to 'wandb' needs the wandb package: pip install 'st[wandb]'") from None
            os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb.init(project=project, name=run_name, dir=str(logging_dir), config=config,
                                     resume="allow")  # fmt: skip

    def _trim_metrics(self, resume_step: int) -> None:
        """On resume, drop lines past the checkpoint's step so the file reads as one uninterrupted run."""
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= resume_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        self.metrics_path.write_text("".join(k + "\n" for k in kept))

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record, sort_keys=True) + "\n")
        self._metrics.flush()
        step = int(record.get("step", 0))
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(f"train/{name}" if not name.startswith("eval_loss") else
                                   "eval/loss" + name[len("eval_loss"):], value, step)  # fmt: skip
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def images(self, tag: str, paths: list[Path], step: int) -> None:
        if not paths:
            return
        if self._tb is not None:
            import numpy as np
            from PIL import Image

            for i, path in enumerate(paths):
                with Image.open(path) as img:
                    self._tb.add_image(f"{tag}/{i}", np.asarray(img.convert("RGB")), step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: [wandb.Image(str(p)) for p in paths]}, step=step)

    def close(self) -> None:
        self._metrics.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
