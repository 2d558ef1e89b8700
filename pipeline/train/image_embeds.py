"""The CLIP image embeddings of Wan 2.1 image-to-video and FLF2V batches (`encoder_hidden_states_image`).

Each cached i2v clip stores its first frame as its conditioning image (`Batch.control_pixels`, the uint8 frame the
pipeline would be given as `image`); an FLF2V clip also stores its last frame (`Batch.last_pixels`). `st cache`
stores the CLIP embeddings of those frames beside them (`Batch.image_embeds`, as SimpleTuner caches them), made by the
model's `image_encoder/` and `image_processor/`, which the cache's model identity records (train refuses a cache made
with another; see `stage.check_lineage`). A cache written before st stored them has none: the frozen CLIP vision
encoder then embeds the cached frames per batch, exactly as `WanImageToVideoPipeline.encode_image` embeds a user's
image (FLF2V: `[image, last_image]`, each sample's first then last frame tokens, `wan_i2v.encode_first_last`); it is
loaded on the first such batch only.
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError
from ..families import Family, wan_i2v


class ImageEmbeds:
    """The CLIP embeddings of a run's batches: cached ones, else the model's image encoder on the training device."""

    def __init__(self, source: str, device: Any, last_frame: bool = False) -> None:
        self.source, self.device = source, device
        self.last_frame = last_frame  # FLF2V: the last frame's tokens follow the first's
        self._encoder: tuple[Any, Any] | None = None

    @classmethod
    def for_run(cls, family: Family, source: str, device: Any) -> ImageEmbeds | None:
        """The run's embedder: for the Wan 2.1 i2v and FLF2V families only (None otherwise; Wan 2.2 has no CLIP)."""
        if not wan_i2v.uses_clip(family):
            return None
        return cls(source, device, last_frame=wan_i2v.is_flf2v(family))

    @property
    def encoder(self) -> tuple[Any, Any]:
        """The model's CLIP vision encoder (on the device) and image processor, loaded on first use."""
        if self._encoder is None:
            encoder, processor = wan_i2v.load_image_encoder(self.source)
            self._encoder = (encoder.to(self.device), processor)
        return self._encoder

    def text_inputs(self, batch: Any) -> dict[str, Any]:
        """The denoiser's extra text inputs of `batch`: `image_embeds` of each sample's first frame (FLF2V: of its
        first and last frames, B x 2T x dim). A batch cached for the other of the two models is refused."""
        pixels = None if batch is None else batch.control_pixels
        dataset = getattr(batch, "dataset_id", "?")
        if pixels is None:
            raise InputError(f"a {wan_i2v.PIPELINE_CLASS} batch (dataset {dataset!r}) has no first frame: Wan "
                             "image-to-video trains on video datasets cached for this model; re-run `st cache` with "
                             "it")  # fmt: skip
        lasts = getattr(batch, "last_pixels", None)
        if not self.last_frame and lasts is not None:
            raise InputError(f"a batch of dataset {dataset!r} was cached for Wan 2.1 first/last-frame-to-video (its "
                             "condition latents hold the last frame too), and this run trains first-frame "
                             "image-to-video: re-run `st cache` with this model and model_flavour")  # fmt: skip
        if self.last_frame and lasts is None:
            raise InputError(f"a Wan first/last-frame-to-video batch (dataset {dataset!r}) has no last frame: its "
                             "cache was built for another model; re-run `st cache` with model_flavour "
                             f"{wan_i2v.FLF2V_FLAVOUR}")  # fmt: skip
        cached = getattr(batch, "image_embeds", None)
        if cached is not None:
            return {wan_i2v.IMAGE_EMBEDS_KEY: cached}
        images = wan_i2v.pixels_to_images(pixels)
        if not self.last_frame:
            return {wan_i2v.IMAGE_EMBEDS_KEY: wan_i2v.encode_image(*self.encoder, images)}
        embeds = wan_i2v.encode_first_last(*self.encoder, images, wan_i2v.pixels_to_images(lasts))
        return {wan_i2v.IMAGE_EMBEDS_KEY: embeds}
