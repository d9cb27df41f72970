"""Checkpoints to sample from: `find_model(name_or_path)` returns a DiT state dict.

The two released DiT-XL/2 checkpoints are downloaded once into pretrained_models/ from
https://dl.fbaipublicfiles.com/DiT/models/ (set DIT_DOWNLOAD_URL to a mirror's base
address to fetch them from there). Any other argument is a local checkpoint file.

  python download.py        # fetch both released checkpoints
"""
from __future__ import annotations

import http.client
import os
import sys
import urllib.error
import urllib.request

import torch
from tqdm.auto import tqdm

from checkpoint import load_checkpoint, model_weights
from models import DiT_models, check_state_dict

BASE_URL_ENV = "DIT_DOWNLOAD_URL"
DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/DiT/models"
PRETRAINED_DIR = "pretrained_models"
# Released file -> (model, latent size) it must load into.
PRETRAINED_MODELS = {
    "DiT-XL-2-256x256.pt": ("DiT-XL/2", 32),
    "DiT-XL-2-512x512.pt": ("DiT-XL/2", 64),
}
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
# A transfer cut off mid-way is resumed this many times within one call.
ATTEMPTS = 5


def find_model(model_name: str) -> dict[str, torch.Tensor]:
    """A released checkpoint by file name (downloaded if absent), or a local checkpoint path.

    A training checkpoint gives its EMA weights; a bare state dict is returned as it is.
    """
    if model_name in PRETRAINED_MODELS:
        return download_model(model_name)
    if not os.path.isfile(model_name):
        raise FileNotFoundError(
            f"checkpoint {model_name} does not exist; pass --ckpt PATH to a checkpoint file, or one of "
            f"the released names {', '.join(PRETRAINED_MODELS)}"
        )
    return model_weights(load_checkpoint(model_name))


def pretrained_url(name: str) -> str:
    base = os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return f"{base.rstrip('/')}/{name}"


def download_model(name: str) -> dict[str, torch.Tensor]:
    """pretrained_models/<name>, downloaded first when absent and checked against its model."""
    path = os.path.join(PRETRAINED_DIR, name)
    if os.path.isfile(path):
        try:
            return load_released(path, name)
        except ValueError as error:
            raise ValueError(f"{error}; delete {path} to download it again") from error

    url = pretrained_url(name)
    part = path + ".part"
    try:
        fetch(url, part)
    except (OSError, http.client.HTTPException) as error:
        reason = error if isinstance(error, urllib.error.HTTPError) else getattr(error, "reason", error)
        raise RuntimeError(
            f"could not download {url} ({reason}); put the file at {path} by other means "
            f"(or set {BASE_URL_ENV} to a mirror), or pass --ckpt PATH to a local checkpoint"
        ) from error
    try:
        state_dict = load_released(part, name)
    except ValueError as error:
        corrupt = path + ".corrupt"
        os.replace(part, corrupt)
        raise ValueError(
            f"the file downloaded from {url} is not a valid {name} and was set aside as {corrupt} "
            f"({error}); put a good copy at {path} or pass --ckpt PATH to a local checkpoint"
        ) from error
    os.replace(part, path)
    return state_dict


def load_released(path: str, name: str) -> dict[str, torch.Tensor]:
    """Load a released checkpoint safely and check its keys and shapes against its model."""
    state_dict = model_weights(load_checkpoint(path))
    model_name, latent_size = PRETRAINED_MODELS[name]
    with torch.device("meta"):  # shapes only, no memory
        model = DiT_models[model_name](input_size=latent_size)
    check_state_dict(model, state_dict, what=f"{path} ({name})")
    return state_dict


def fetch(url: str, part: str) -> None:
    """Download url into the file `part`, resuming what is already there; retries cut-off transfers."""
    os.makedirs(os.path.dirname(part) or ".", exist_ok=True)
    for _ in range(ATTEMPTS):
        if fetch_once(url, part):
            return
    raise OSError(f"the transfer stopped early {ATTEMPTS} times; the partial file {part} is kept for the next try")


def fetch_once(url: str, part: str) -> bool:
    """One HTTP request for the bytes `part` lacks; True when the file is complete."""
    start = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code == 416 and start:  # the partial file is not a prefix of this one: start over
            os.remove(part)
            return False
        raise
    with response:
        if response.status != 206:  # the server sent the whole file
            start = 0
        length = response.headers.get("Content-Length")
        total = start + int(length) if length is not None else None
        with open(part, "ab" if start else "wb") as f, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=os.path.basename(url)
        ) as bar:
            try:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException):
                return False
    return total is None or os.path.getsize(part) == total


def main() -> None:
    for name in PRETRAINED_MODELS:
        try:
            find_model(name)
        except (OSError, RuntimeError, ValueError) as error:
            sys.exit(f"download.py: error: {error}")
        print(f"{os.path.join(PRETRAINED_DIR, name)} is ready")


if __name__ == "__main__":
    main()
