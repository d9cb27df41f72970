"""The Stable Diffusion VAE that maps images to DiT's latents and back."""
from __future__ import annotations

import os

import torch
from diffusers.models import AutoencoderKL

# Latents are scaled to roughly unit variance before diffusion (Rombach et al., 2022).
LATENT_SCALE = 0.18215
HUB_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}


def load_vae(vae: str, device: torch.device, vae_path: str | None = None) -> AutoencoderKL:
    """The `ema` or `mse` VAE from the Hugging Face hub, or a local diffusers folder `vae_path`."""
    if vae_path is not None:
        if not os.path.isfile(os.path.join(vae_path, "config.json")):
            raise FileNotFoundError(
                f"--vae-path {vae_path} is not a diffusers AutoencoderKL folder (no config.json in it)"
            )
        return AutoencoderKL.from_pretrained(vae_path).to(device).eval()
    if vae not in HUB_VAES:
        raise ValueError(f"unknown VAE {vae!r}; choose one of {', '.join(HUB_VAES)} or pass --vae-path DIR")
    repo = HUB_VAES[vae]
    try:
        return AutoencoderKL.from_pretrained(repo).to(device).eval()
    except OSError as error:
        raise RuntimeError(
            f"could not load the VAE {repo} from the Hugging Face hub or its cache ({type(error).__name__}); "
            f"when offline, pass --vae-path DIR with a local copy (AutoencoderKL.save_pretrained or a "
            f"download of https://huggingface.co/{repo})"
        ) from error


def latent_size(image_size: int) -> int:
    """Side of the latent of a square image of side image_size: the VAE downsamples by 8."""
    if image_size <= 0 or image_size % 8:
        raise ValueError(f"--image-size {image_size} is not a positive multiple of 8 (the VAE downsamples by 8)")
    return image_size // 8


@torch.no_grad()
def encode(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents, one sample from the posterior (as in training)."""
    return vae.encode(images).latent_dist.sample() * LATENT_SCALE


@torch.no_grad()
def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images, nominally in [-1, 1]."""
    return vae.decode(latents / LATENT_SCALE).sample
