"""The CLIP image embeddings of Wan 2.1 image-to-video batches (`encoder_hidden_states_image`).

Each cached i2v clip stores its first frame as its conditioning image (`Batch.control_pixels`, the uint8 frame the
pipeline would be given as `image`); the frozen CLIP vision encoder of the model folder embeds it per batch, exactly as
`WanImageToVideoPipeline.encode_image` embeds a user's image.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..families import Family, wan_i2v


class ImageEmbeds:
    """The model's image encoder and processor, on the training device."""

    def __init__(self, source: str, device: Any) -> None:
        self.encoder, self.processor = wan_i2v.load_image_encoder(source)
        self.encoder.to(device)

    @classmethod
    def for_run(cls, family: Family, source: str, device: Any) -> ImageEmbeds | None:
        """The run's embedder: for the Wan i2v family only (None otherwise)."""
        return cls(source, device) if family.pipeline_class == wan_i2v.PIPELINE_CLASS else None

    def text_inputs(self, batch: Any) -> dict[str, Any]:
        """The denoiser's extra text inputs of `batch`: `image_embeds` of each sample's first frame."""
        pixels = None if batch is None else batch.control_pixels
        if pixels is None:
            raise InputError(f"a {wan_i2v.PIPELINE_CLASS} batch (dataset {getattr(batch, 'dataset_id', '?')!r}) has "
                             "no first frame: Wan image-to-video trains on video datasets cached for this model; "
                             "re-run `st cache` with it")  # fmt: skip
        images = wan_i2v.pixels_to_images(pixels)
        return {wan_i2v.IMAGE_EMBEDS_KEY: wan_i2v.encode_image(self.encoder, self.processor, images)}
