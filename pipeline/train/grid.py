"""A contact sheet of validation images."""

from __future__ import annotations

from pathlib import Path


def image_grid(paths: list[Path], columns: int, pad: int = 4):
    """Images laid out row by row, `columns` per row, each cell as large as the largest image."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in paths]
    cell_w = max(i.width for i in images)
    cell_h = max(i.height for i in images)
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w + (columns + 1) * pad, rows * cell_h + (rows + 1) * pad), (24, 24, 24))
    for index, image in enumerate(images):
        row, col = divmod(index, columns)
        grid.paste(image, (pad + col * (cell_w + pad), pad + row * (cell_h + pad)))
        image.close()
    return grid
