"""util/vae.py: the latent space comes from the AutoencoderKL's config; pixel space is the identity."""
from __future__ import annotations

import pytest
import torch
from diffusers.models import AutoencoderKL

from conftest import make_other_vae
from util.vae import (
    Autoencoder, AutoencoderError, PIXEL_SPACE, decode, encode, latent_size, load_autoencoder,
    load_vae, read_autoencoder
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def other_vae_dir(tmp_path_factory) -> str:
    return str(make_other_vae(tmp_path_factory.mktemp("other_vae")))


def images(count: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_numbers_come_from_the_config(other_vae_dir):
    autoencoder = load_autoencoder("ema", CPU, other_vae_dir)
    assert (autoencoder.channels, autoencoder.downsample) == (8, 4)
    assert (autoencoder.scale, autoencoder.shift) == (0.5, 0.1)
    assert autoencoder.name == other_vae_dir
    assert autoencoder.latent_size(32) == 8
    assert autoencoder.describe() == {
        "vae": other_vae_dir, "latent_channels": 8, "downsample": 4, "scaling_factor": 0.5, "shift_factor": 0.1,
    }


def test_the_config_alone_gives_the_same_numbers(other_vae_dir, tiny_vae_dir):
    for folder in (other_vae_dir, str(tiny_vae_dir)):
        described = read_autoencoder("ema", folder)
        assert described.module is None
        assert described.describe() == load_autoencoder("ema", CPU, folder).describe()
    assert read_autoencoder(PIXEL_SPACE).describe() == load_autoencoder(PIXEL_SPACE, CPU).describe()


def test_encode_and_decode_apply_shift_and_scale(other_vae_dir):
    autoencoder = load_autoencoder("ema", CPU, other_vae_dir)
    module = autoencoder.module
    x = images()
    torch.manual_seed(5)
    latents = autoencoder.encode(x)
    torch.manual_seed(5)
    with torch.no_grad():
        expected = (module.encode(x).latent_dist.sample() - 0.1) * 0.5
    assert latents.shape == (2, 8, 4, 4)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        expected_images = module.decode(latents / 0.5 + 0.1).sample
    torch.testing.assert_close(autoencoder.decode(latents), expected_images, rtol=0, atol=1e-6)


def test_from_moments_applies_shift_and_scale(other_vae_dir):
    autoencoder = Autoencoder.from_description(load_autoencoder("ema", CPU, other_vae_dir).describe())
    mean, std = torch.randn(2, 8, 4, 4).half(), torch.rand(2, 8, 4, 4).half()
    torch.manual_seed(7)
    latents = autoencoder.from_moments(mean, std)
    torch.manual_seed(7)
    eps = torch.randn(2, 8, 4, 4)
    assert latents.dtype == torch.float32
    torch.testing.assert_close(latents, (mean.float() + std.float() * eps - 0.1) * 0.5, rtol=0, atol=1e-6)
    with pytest.raises(AutoencoderError, match="weights are not loaded"):
        autoencoder.encode(images())


def test_pixel_space_is_the_identity():
    autoencoder = load_autoencoder(PIXEL_SPACE, CPU)
    assert (autoencoder.channels, autoencoder.downsample, autoencoder.module) == (3, 1, None)
    x = images()
    assert autoencoder.encode(x) is x and autoencoder.decode(x) is x
    assert autoencoder.latent_size(30) == 30
    with pytest.raises(AutoencoderError):
        autoencoder.latent_size(0)
    assert autoencoder.describe()["vae"] == "none"


def test_latent_size_must_divide(other_vae_dir):
    autoencoder = load_autoencoder("ema", CPU, other_vae_dir)
    with pytest.raises(AutoencoderError, match=r"^30 is not a positive multiple of 4 \(the VAE downsamples by 4\)$"):
        autoencoder.latent_size(30)
    with pytest.raises(AutoencoderError, match="multiple of 4"):
        autoencoder.latent_size(-8)
    with pytest.raises(ValueError, match=r"^--image-size 60 is not a positive multiple of 8"):
        latent_size(60)


def test_sd_vae_latents_are_bitwise_the_reference(tiny_vae_dir):
    autoencoder = load_autoencoder("ema", CPU, str(tiny_vae_dir))
    assert (autoencoder.channels, autoencoder.downsample, autoencoder.scale, autoencoder.shift) == (4, 8, 0.18215, 0.0)
    module = load_vae("ema", CPU, str(tiny_vae_dir))
    x = images(size=32)
    torch.manual_seed(11)
    latents = autoencoder.encode(x)
    torch.manual_seed(11)
    with torch.no_grad():
        reference = module.encode(x).latent_dist.sample() * 0.18215
    assert torch.equal(latents, reference)
    torch.manual_seed(11)
    assert torch.equal(encode(module, x), reference)
    with torch.no_grad():
        reference_images = module.decode(reference / 0.18215).sample
    assert torch.equal(autoencoder.decode(latents), reference_images)
    assert torch.equal(decode(module, latents), reference_images)


def test_sd_from_moments_is_bitwise_the_reference():
    autoencoder = Autoencoder.from_description(
        {"vae": "ema", "latent_channels": 4, "downsample": 8, "scaling_factor": 0.18215, "shift_factor": 0.0}
    )
    mean, std = torch.randn(2, 4, 4, 4).half(), torch.rand(2, 4, 4, 4).half()
    torch.manual_seed(2)
    latents = autoencoder.from_moments(mean, std)
    torch.manual_seed(2)
    reference = (mean.float() + std.float() * torch.randn_like(mean.float())) * 0.18215
    assert torch.equal(latents, reference)


def test_folder_errors_are_one_sentence(tmp_path):
    with pytest.raises(AutoencoderError, match=r"^\S+missing is not a diffusers AutoencoderKL folder \(no config.json in it\)$"):
        load_autoencoder("ema", CPU, str(tmp_path / "missing"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(AutoencoderError, match="could not be loaded as a diffusers AutoencoderKL folder"):
        load_autoencoder("ema", CPU, str(tmp_path / "broken"))
    with pytest.raises(AutoencoderError, match="^--vae-path "):
        load_vae("ema", CPU, str(tmp_path / "missing"))


def test_offline_hub_error_names_no_flag(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(AutoencoderError) as error:
        load_autoencoder("mse", CPU)
    message = str(error.value)
    assert message.startswith("could not load the VAE stabilityai/sd-vae-ft-mse from the Hugging Face hub or its cache")
    assert "a local AutoencoderKL folder" in message and "--" not in message
