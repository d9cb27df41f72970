"""util/images.py: uint8 conversion and grids. (ADM's center crop against the reference: test_reference_vectors.py.)"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from util.images import save_grid, to_uint8


def test_to_uint8_formula():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    pixels = to_uint8(x)
    assert pixels.shape == (1, 1, 5, 3) and pixels.dtype == np.uint8
    # clamp(127.5 * x + 128, 0, 255) truncated to an integer
    assert pixels[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_save_grid_layout(tmp_path):
    images = torch.full((6, 3, 8, 8), -1.0)
    images[5] = 1.0
    save_grid(images, tmp_path / "grid.png", nrow=4)
    grid = np.array(Image.open(tmp_path / "grid.png"))
    # 4 per row, 2 px padding: width 4*(8+2)+2, height 2*(8+2)+2
    assert grid.shape == (22, 42, 3)
    assert grid[12 + 4, 12 + 4].tolist() == [255, 255, 255]  # image 5: row 1, column 1
    assert grid[2 + 4, 2 + 4].tolist() == [0, 0, 0]
