"""Image helpers shared by the scripts: ADM's center crop, uint8 conversion, sample grids."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.utils import save_image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's center crop: halve with a box filter while the short side is >= 2 * image_size,
    resize the short side to image_size (bicubic), then crop the center square."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(s // 2 for s in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(s * scale) for s in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top : top + image_size, left : left + image_size])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) images in [-1, 1] -> (N, H, W, 3) uint8, as the FID sample sets store them."""
    pixels = torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)
    return pixels.numpy()


def save_grid(images: torch.Tensor, path: str, nrow: int = 4) -> None:
    """Save (N, 3, H, W) images in [-1, 1] as one PNG grid, nrow images per row."""
    save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1))
