"""The space DiT diffuses in: the scaled latents of a diffusers AutoencoderKL (the Stable
Diffusion VAE in the paper, Section 3.1 "Latent diffusion models"), or RGB pixels in [-1, 1].

An AutoencoderKL's own config says what its latents look like: latent_channels, the
down-sampling (one factor of 2 per encoder block after the first), and the affine map
(z - shift_factor) * scaling_factor that brings them to roughly unit variance (Rombach et al.,
2022). The SD VAEs' configs say 4 channels, 8x, 0.18215 and no shift.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers.models import AutoencoderKL

PIXEL_SPACE = "none"
HUB_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
# The SD VAEs' config.scaling_factor; feature stores without an "autoencoder" entry use it.
LATENT_SCALE = 0.18215
SD_LATENT_CHANNELS = 4
SD_DOWNSAMPLE = 8


class AutoencoderError(ValueError):
    """An autoencoder that cannot be loaded or used as asked; the message says what was tried."""


@dataclass
class Autoencoder:
    """What the DiT is trained on: a diffusers AutoencoderKL's scaled latents, or pixels."""

    name: str  # PIXEL_SPACE, "ema", "mse", or the AutoencoderKL folder
    channels: int  # the DiT's in_channels
    downsample: int  # image side / latent side
    scale: float
    shift: float
    module: AutoencoderKL | None = None  # None in pixel space, or when only described

    @classmethod
    def from_module(cls, name: str, module: AutoencoderKL) -> Autoencoder:
        """Channels, down-sampling, scale and shift read from the module's config."""
        config = module.config
        return cls(
            name=name,
            channels=int(config.latent_channels),
            downsample=2 ** (len(config.block_out_channels) - 1),
            scale=float(config.scaling_factor),
            shift=float(config.shift_factor or 0.0),
            module=module,
        )

    @classmethod
    def pixels(cls) -> Autoencoder:
        """Pixel space: the identity on (3, S, S) images in [-1, 1]."""
        return cls(name=PIXEL_SPACE, channels=3, downsample=1, scale=1.0, shift=0.0)

    @classmethod
    def from_description(cls, description: dict) -> Autoencoder:
        """The numbers of `describe()` without weights: enough for `latent_size` and `from_moments`."""
        return cls(
            name=description["vae"],
            channels=int(description["latent_channels"]),
            downsample=int(description["downsample"]),
            scale=float(description["scaling_factor"]),
            shift=float(description["shift_factor"]),
        )

    @property
    def is_pixels(self) -> bool:
        return self.name == PIXEL_SPACE

    def latent_size(self, image_size: int) -> int:
        """Side of the latent of a square image of side image_size.

        The message starts with the size, so that a script can put its flag in front of it.
        """
        if image_size <= 0 or image_size % self.downsample:
            if self.is_pixels:
                raise AutoencoderError(f"{image_size} is not a positive image size")
            raise AutoencoderError(
                f"{image_size} is not a positive multiple of {self.downsample} (the VAE downsamples by {self.downsample})"
            )
        return image_size // self.downsample

    def _loaded(self) -> AutoencoderKL:
        if self.module is None:
            raise AutoencoderError(f"the autoencoder {self.name} is only described here, its weights are not loaded")
        return self.module

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents, one sample from the posterior (as in training)."""
        if self.is_pixels:
            return images
        latents = self._loaded().encode(images).latent_dist.sample()
        if self.shift:
            latents = latents - self.shift
        return latents * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images, nominally in [-1, 1] (not clamped)."""
        if self.is_pixels:
            return latents
        latents = latents / self.scale
        if self.shift:
            latents = latents + self.shift
        return self._loaded().decode(latents).sample

    def from_moments(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Scaled latents from a stored posterior's mean and std, as float32: eps ~ N(0, I) is
        drawn from the global generator with randn_like, as the posterior's own sample draws it."""
        mean, std = mean.float(), std.float()
        latents = mean + std * torch.randn_like(mean)
        if self.shift:
            latents = latents - self.shift
        return latents * self.scale

    def describe(self) -> dict:
        """The numbers that define the latent space, for feature stores and checkpoints."""
        return {
            "vae": self.name,
            "latent_channels": self.channels,
            "downsample": self.downsample,
            "scaling_factor": self.scale,
            "shift_factor": self.shift,
        }


# What a feature store without an "autoencoder" entry was made with.
SD_VAE_DESCRIPTION = Autoencoder(
    name="sd-vae", channels=SD_LATENT_CHANNELS, downsample=SD_DOWNSAMPLE, scale=LATENT_SCALE, shift=0.0
).describe()


def load_module(vae: str, device: torch.device, vae_path: str | None = None) -> AutoencoderKL:
    """The `ema` or `mse` SD VAE from the Hugging Face hub, or any local AutoencoderKL folder `vae_path`."""
    if vae_path is not None:
        if not os.path.isfile(os.path.join(vae_path, "config.json")):
            raise AutoencoderError(f"{vae_path} is not a diffusers AutoencoderKL folder (no config.json in it)")
        try:
            return AutoencoderKL.from_pretrained(vae_path).to(device).eval()
        except (OSError, ValueError, TypeError) as error:
            raise AutoencoderError(
                f"{vae_path} could not be loaded as a diffusers AutoencoderKL folder ({type(error).__name__}: {error})"
            ) from error
    if vae not in HUB_VAES:
        raise AutoencoderError(f"unknown VAE {vae!r}; choose one of {', '.join(HUB_VAES)} or a local AutoencoderKL folder")
    repo = HUB_VAES[vae]
    try:
        return AutoencoderKL.from_pretrained(repo).to(device).eval()
    except OSError as error:
        raise AutoencoderError(
            f"could not load the VAE {repo} from the Hugging Face hub or its cache ({type(error).__name__}); "
            f"when offline, use a local AutoencoderKL folder instead (AutoencoderKL.save_pretrained or a "
            f"download of https://huggingface.co/{repo})"
        ) from error


def load_autoencoder(vae: str, device: torch.device, vae_path: str | None = None) -> Autoencoder:
    """Pixel space for vae == PIXEL_SPACE (and no folder), else the AutoencoderKL from `vae_path`
    (which wins) or the hub, with its config's channels, down-sampling, scale and shift."""
    if vae == PIXEL_SPACE and vae_path is None:
        return Autoencoder.pixels()
    module = load_module(vae, device, vae_path)
    return Autoencoder.from_module(vae_path or vae, module)


# The SD-VAE functions of the scripts that address the VAE module directly. Their messages
# name the scripts' flags, which the scripts pass on as they are.


def load_vae(vae: str, device: torch.device, vae_path: str | None = None) -> AutoencoderKL:
    """The SD VAE module (see load_module); errors name --vae-path."""
    from util.flags import vae_error_sentence  # util.flags imports this module

    try:
        return load_module(vae, device, vae_path)
    except AutoencoderError as error:
        raise AutoencoderError(vae_error_sentence(error, vae_path)) from error


def latent_size(image_size: int) -> int:
    """Side of the SD VAE's latent of a square image of side image_size."""
    try:
        return Autoencoder.from_description(SD_VAE_DESCRIPTION).latent_size(image_size)
    except AutoencoderError as error:
        raise AutoencoderError(f"--image-size {error}") from None


def encode(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> SD-VAE-scaled latents (see Autoencoder.encode)."""
    return Autoencoder.from_module("vae", vae).encode(images)


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """SD-VAE-scaled latents -> images (see Autoencoder.decode)."""
    return Autoencoder.from_module("vae", vae).decode(latents)
