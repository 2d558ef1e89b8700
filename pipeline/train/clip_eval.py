"""`evaluation_type: clip`: the CLIP score of each validation image against its prompt, as SimpleTuner logs it.

SimpleTuner scores with torchmetrics' `clip_score` (model `pretrained_evaluation_model_name_or_path`): the image and
the prompt through `CLIPModel.get_image_features` / `get_text_features`, both L2-normalised, score
`max(100 * cos, 0)`. st computes the same formula with transformers directly, loading the image processor with its
PIL backend (`CLIPImageProcessorPil`), so no torchvision is needed. The scores of one validation are logged as
`clip/min`, `clip/max`, `clip/mean` and `clip/std` (SimpleTuner's names).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..log import get_logger

log = get_logger(__name__)

# A still validation render: `<prompt name>-<width>x<height>-<index>.png` (grids, control and reference images differ).
_RENDER = re.compile(r"^(?P<name>.+)-\d+x\d+-\d+\.png$")


class ClipEvaluator:
    """A CLIP model loaded once by name (hub id or local folder; HF_HUB_OFFLINE honoured), scoring on the CPU or
    `device`."""

    def __init__(self, name_or_path: str, device: Any = "cpu") -> None:
        import torch
        from transformers import CLIPModel, CLIPTokenizer
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        try:
            self.model = CLIPModel.from_pretrained(name_or_path, torch_dtype=torch.float32).eval().to(device)
            self.tokenizer = CLIPTokenizer.from_pretrained(name_or_path)
            self.processor = CLIPImageProcessorPil.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"pretrained_evaluation_model_name_or_path {name_or_path!r} (evaluation_type clip) "
                              f"could not be loaded as a CLIP model ({str(e).splitlines()[0] if str(e) else e}): "
                              "set it to a CLIP model's hub id or local folder") from e  # fmt: skip
        self.device = device
        self.max_length = self.model.config.text_config.max_position_embeddings

    def score(self, image: Any, prompt: str) -> float:
        """max(100 * cos(image, prompt), 0) for one PIL image; prompts longer than the text model are cut."""
        import torch

        pixels = self.processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
        tokens = self.tokenizer([prompt], padding=True, return_tensors="pt")
        # Cut, not `truncation=True`: torchmetrics slices long prompts' ids (end token included), and so does st.
        ids, mask = (tokens[k][..., : self.max_length].to(self.device) for k in ("input_ids", "attention_mask"))
        with torch.no_grad():
            img = _features(self.model.get_image_features(pixel_values=pixels.to(self.device)))
            txt = _features(self.model.get_text_features(input_ids=ids, attention_mask=mask))
        img = img / img.norm(p=2, dim=-1, keepdim=True)
        txt = txt / txt.norm(p=2, dim=-1, keepdim=True)
        return max(float(100 * (img * txt).sum(dim=-1).mean()), 0.0)

    def evaluate(self, paths: list[Path], prompts: dict[str, str]) -> dict[str, float]:
        """Scores of the still renders among `paths` (`prompts`: prompt name -> text); {} when there are none."""
        import numpy as np
        from PIL import Image

        scores = []
        for path in paths:
            match = _RENDER.match(Path(path).name)
            if match is None or match["name"] not in prompts:
                continue
            with Image.open(path) as image:
                scores.append(self.score(image, prompts[match["name"]]))
        if not scores:
            log.warning("evaluation_type clip: this validation rendered no still images to score")
            return {}
        return {"clip/min": min(scores), "clip/max": max(scores), "clip/mean": float(np.mean(scores)),
                "clip/std": float(np.std(scores))}  # fmt: skip


def _features(output: Any) -> Any:
    """transformers 5 returns a model output (projected `pooler_output`) from get_*_features; 4.x the tensor."""
    import torch

    return output if isinstance(output, torch.Tensor) else output.pooler_output
