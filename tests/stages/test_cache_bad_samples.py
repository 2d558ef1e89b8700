"""Images `st cache` must decode itself: high-bit-depth and transparent images become the 8-bit RGB a user expects
(transparency on white), and an image the decoder rejects is skipped with its reason, or fails the run with --strict."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cache.images import BACKGROUND, decode_rgb
from pipeline.cache_reader import CacheReader
from pipeline.cache.stage import run_cache
from pipeline.config import load_config
from pipeline.families import get_family
from pipeline.manifest import read_manifest
from pipeline.prepare.stage import run_prepare
from tests.helpers.files import write_config

SIZE = (64, 64)  # one 64x64 bucket at resolution 64, no resize or crop: pixels reach the VAE as decoded


# ------------------------------------------------------------------------------------------------ image files


def png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by the channel count of `array`, HxWxC uint16), written by hand
    because Pillow cannot write 16-bit colour PNGs."""
    height, width, channels = array.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))  # fmt: skip
    return path


def half_transparent(mode: str = "RGBA") -> Image.Image:
    """Opaque red on the left half, fully transparent (black underneath) on the right half."""
    img = Image.new("RGBA", SIZE, (0, 0, 0, 0))
    img.paste((200, 20, 20, 255), (0, 0, SIZE[0] // 2, SIZE[1]))
    return img if mode == "RGBA" else img.convert(mode)


def corrupt_jpeg(path: Path) -> Path:
    """A JPEG whose scan data breaks mid-stream but whose end marker is intact: `st prepare` accepts it."""
    rng = np.random.default_rng(3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    middle = (data.index(b"\xff\xda") + len(data)) // 2
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[:middle] + b"\xff" * 64 + data[middle + 64 :])
    return path


def pixels_of(path: Path) -> np.ndarray:
    return np.asarray(decode_rgb(path.read_bytes()))


# ------------------------------------------------------------------------------------------------- decoding


def test_sixteen_bit_grey_png_keeps_its_grey(tmp_path):
    mid = png16(tmp_path / "mid.png", np.full((8, 8, 1), 32896, dtype=np.uint16))  # 32896 = 128 * 257
    ramp = png16(tmp_path / "ramp.png", np.array([[[0], [16384], [49152], [65535]]], dtype=np.uint16))
    with Image.open(mid) as img:
        assert img.mode == "I;16"  # what Pillow hands over, and what convert("RGB") clips to white
    assert pixels_of(mid).shape == (8, 8, 3) and (pixels_of(mid) == 128).all()
    assert pixels_of(ramp)[0].tolist() == [[0] * 3, [64] * 3, [191] * 3, [255] * 3]


def test_sixteen_bit_colour_png_is_reduced_and_composited(tmp_path):
    rgba = np.zeros((2, 2, 4), dtype=np.uint16)
    rgba[..., 0] = 65535  # red
    rgba[0, 0, 3] = 65535  # only the top-left pixel is opaque
    rgb = png16(tmp_path / "rgb.png", np.full((2, 2, 3), 32896, dtype=np.uint16))
    assert (pixels_of(rgb) == 128).all()
    decoded = pixels_of(png16(tmp_path / "rgba.png", rgba))
    assert decoded[0, 0].tolist() == [255, 0, 0]
    assert decoded[1, 1].tolist() == decoded[0, 1].tolist() == list(BACKGROUND)


def test_float_and_32_bit_greys_are_rescaled(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    Image.fromarray(np.full((4, 4), 32896, dtype=np.int32)).save(tmp_path / "int32.tif")
    with Image.open(tmp_path / "float.tif") as f, Image.open(tmp_path / "int32.tif") as i:
        assert (f.mode, i.mode) == ("F", "I")
    assert (pixels_of(tmp_path / "float.tif") == 128).all()
    assert (pixels_of(tmp_path / "int32.tif") == 128).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L"])
def test_transparent_regions_show_the_white_background(mode, tmp_path):
    """Alpha channels, and palette or grey images whose transparency is one colour (PNG tRNS)."""
    path = tmp_path / f"{mode}.png"
    img = half_transparent(mode)
    if mode == "P":
        img = half_transparent().convert("RGB").quantize(colors=2)
        black = next(i for i, c in enumerate(zip(*[iter(img.getpalette())] * 3)) if c == (0, 0, 0))
        img.save(path, transparency=black)
    elif mode == "L":
        img.save(path, transparency=0)  # the black half
    else:
        img.save(path)
    decoded = pixels_of(path)
    assert (decoded[:, SIZE[0] // 2 :] == BACKGROUND).all(), mode
    grey = np.asarray(half_transparent().convert("L"))[0, 0]
    assert decoded[0, 0].tolist() == ([200, 20, 20] if mode in ("RGBA", "P") else [grey] * 3), mode


def test_undecodable_image_raises_with_the_decoders_message(tmp_path):
    with pytest.raises(OSError, match="broken data stream"):
        decode_rgb(corrupt_jpeg(tmp_path / "bad.jpg").read_bytes())


# ------------------------------------------------------------------------------------------------ cache runs


@pytest.fixture(scope="module")
def sd1x(tmp_path_factory) -> Path:
    model = tmp_path_factory.mktemp("model") / "sd1x"
    get_family("sd1x").tiny(model, 0)
    return model


@pytest.fixture
def odd_images(tmp_path, sd1x):
    """A prepared dataset of a 16-bit grey PNG, a half-transparent RGBA PNG, a plain JPEG and a corrupt JPEG, decoded
    in a loader worker process (two batches of two)."""
    images = tmp_path / "data" / "images"
    png16(images / "grey16.png", np.full((SIZE[1], SIZE[0], 1), 32896, dtype=np.uint16))
    half_transparent().save(images / "alpha.png")
    Image.new("RGB", SIZE, (10, 120, 240)).save(images / "plain.jpg")
    corrupt_jpeg(images / "broken.jpg")
    for name in ("grey16", "alpha", "plain", "broken"):
        (images / f"{name}.txt").write_text(f"a picture called {name}\n")
    datasets = [{"id": "odd", "type": "local", "instance_data_dir": "images", "caption_strategy": "textfile",
                 "crop": False}]  # fmt: skip
    config = write_config(tmp_path / "data", datasets, resolution=64, resolution_type="pixel_area",
                          aspect_bucket_alignment=32, model_family="sd1x", pretrained_model_name_or_path=str(sd1x),
                          cache_dtype="fp32", vae_dtype="fp32", vae_batch_size=2, max_workers=1)  # fmt: skip
    run_prepare(load_config(config), tmp_path / "prepare")
    prepared = read_manifest(tmp_path / "prepare", stage="prepare")
    assert prepared["stats"]["samples"] == 4, "st prepare no longer accepts the corrupt JPEG: this test needs another"
    return config, images, tmp_path / "prepare"


def folder_state(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_cache_skips_the_undecodable_image_and_encodes_the_rest_as_decoded(odd_images, sd1x, tmp_path):
    import torch

    from pipeline.cache.encode import Encoders

    config, images, prep = odd_images
    before = folder_state(images)
    result = run_cache(load_config(config), prep, tmp_path / "cache")
    assert folder_state(images) == before  # nothing of the user's is touched

    manifest = result.manifest
    assert manifest["stats"]["samples"] == 3 and manifest["stats"]["skipped"] == {"corrupt_image": 1}
    skipped = [json.loads(line) for line in (tmp_path / "cache" / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 1
    assert (skipped[0]["dataset_id"], skipped[0]["path"], skipped[0]["reason"]) == ("odd", "broken.jpg",
                                                                                     "corrupt_image")  # fmt: skip
    assert "broken data stream" in skipped[0]["detail"]
    assert "skipped.jsonl" in {o["path"] for o in manifest["outputs"]}

    # Each cached latent is exactly the VAE sample of the pixels a user expects: grey, and red beside white.
    samples = {s.meta["path"]: s for s in CacheReader(tmp_path / "cache")}
    assert sorted(samples) == ["alpha.png", "grey16.png", "plain.jpg"]
    grey = np.full((SIZE[1], SIZE[0], 3), 128, dtype=np.uint8)
    red_white = np.asarray(half_transparent().convert("RGB")).copy()
    red_white[:, SIZE[0] // 2 :] = BACKGROUND
    encoders = Encoders(get_family("sd1x"), str(sd1x), None, None, None, None, "fp32", torch.device("cpu"))
    for path, expected in (("grey16.png", grey), ("alpha.png", red_white)):
        pixels = torch.from_numpy(expected.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        want = encoders.encode_latents(pixels, [samples[path].key], seed=0, batch_size=2)[0]
        assert torch.equal(samples[path].latent, want), path


def test_strict_names_the_file_and_writes_no_manifest(odd_images, cli, tmp_path):
    config, _, prep = odd_images
    args = ("cache", "-c", config, "-i", prep, "-o", tmp_path / "strict", "--strict")
    failed = cli(*args)
    assert failed.exit_code == 2
    message = " ".join(failed.output.split())
    assert "broken.jpg" in message and "dataset odd" in message and "broken data stream" in message
    assert "--strict" in message and "Traceback" not in failed.output
    assert not (tmp_path / "strict" / "manifest.json").exists()

    # Skipped by a run without --strict, the image still fails a --strict run on the up-to-date output.
    assert cli(*args[:-1]).exit_code == 0
    again = cli(*args)
    assert again.exit_code == 2 and "broken.jpg" in again.output
