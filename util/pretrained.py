"""DiT weights from any source: `load_weights(source)` returns them in the official key layout,
with the flags a train.py checkpoint was trained with.

- DiT-XL-2-256x256.pt, DiT-XL-2-512x512.pt: the released checkpoints, downloaded once into
  pretrained_models/ from https://dl.fbaipublicfiles.com/DiT/models/ (set DIT_DOWNLOAD_URL
  to a mirror's base address). When that address fails, the same weights come from the
  Hugging Face hub repos facebook/DiT-XL-2-256 / -512 instead.
- hf:OWNER/REPO[/SUBFOLDER]: a DiT in diffusers' layout on the hub (default subfolder
  `transformer`), e.g. hf:facebook/DiT-XL-2-256; huggingface_hub caches it (HF_HOME) and
  honours HF_ENDPOINT (a mirror) and HF_HUB_OFFLINE.
- a folder: a diffusers DiTTransformer2DModel (config.json + diffusion_pytorch_model
  .safetensors or .bin), or a pipeline folder with it under transformer/.
- any other path: a checkpoint file; a train.py checkpoint holds EMA and raw weights.
- a state dict, or a train.py checkpoint already loaded.

Every failure is a WeightsError with one sentence; `find_model` is the original DiT's API.
"""
from __future__ import annotations

import http.client
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Mapping

import torch
from tqdm.auto import tqdm

from util.checkpoints import CheckpointError, WeightsError, load_checkpoint
from util.diffusers_format import WEIGHT_FILES, is_diffusers_folder, load_diffusers_folder
from models import DiT_models, check_state_dict
from util.files import first_line

BASE_URL_ENV = "DIT_DOWNLOAD_URL"
DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/DiT/models"
PRETRAINED_DIR = "pretrained_models"
# Released file -> (model, latent size) it must load into.
PRETRAINED_MODELS = {
    "DiT-XL-2-256x256.pt": ("DiT-XL/2", 32),
    "DiT-XL-2-512x512.pt": ("DiT-XL/2", 64),
}
# The same weights in diffusers' layout on the Hugging Face hub.
HUB_PREFIX = "hf:"
HUB_REPOS = {
    "DiT-XL-2-256x256.pt": "facebook/DiT-XL-2-256",
    "DiT-XL-2-512x512.pt": "facebook/DiT-XL-2-512",
}
HUB_SUBFOLDER = "transformer"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
# A transfer cut off mid-way is resumed this many times within one call.
ATTEMPTS = 5
# The weight sets a train.py checkpoint holds: the EMA copy (what the paper samples with) and the raw trained weights.
WEIGHT_SETS = ("ema", "raw")
LOCAL_CHECKPOINT = "a local checkpoint"
EVERY_SOURCE = (
    f"a checkpoint file or diffusers DiT folder, hf:OWNER/REPO, or one of the released names {', '.join(PRETRAINED_MODELS)}"
)


@dataclass
class Weights:
    """DiT weights in the official key layout, as a source gave them."""

    source: str
    ema: dict[str, torch.Tensor]  # the weights to sample with: a train.py checkpoint's EMA copy, else the only set there is
    raw: dict[str, torch.Tensor] | None = None  # a train.py checkpoint's raw (non-EMA) weights; None for any other source
    args: dict = field(default_factory=dict)  # the flags a train.py checkpoint was trained with; {} for any other source

    def select(self, which: str = "ema") -> dict[str, torch.Tensor]:
        """The `ema` or `raw` weight set; a source without a raw copy raises WeightsError."""
        if which not in WEIGHT_SETS:
            raise WeightsError(f"unknown weight set {which!r}; choose one of {', '.join(WEIGHT_SETS)}")
        if which == "ema":
            return self.ema
        if self.raw is None:
            raise WeightsError(
                f"{self.source} holds one set of weights, not a training checkpoint's raw copy next to its EMA copy",
                remedy="sample its EMA weights", instead="a train.py checkpoint",
            )
        return self.raw


def load_weights(source: str | Mapping) -> Weights:
    """The weights of `source`: a released name (downloaded if absent), hf:OWNER/REPO[/SUBFOLDER],
    a diffusers DiT or pipeline folder, a checkpoint file, or a state dict / checkpoint already
    loaded (see the module's docstring). Raises WeightsError with one sentence."""
    if isinstance(source, Mapping):
        return from_checkpoint(dict(source), "the given state dict")
    if source in PRETRAINED_MODELS:
        return Weights(source, download_model(source))
    if source.startswith(HUB_PREFIX):
        return Weights(source, hub_model(source[len(HUB_PREFIX):]))
    if os.path.isdir(source):
        return Weights(source, folder_model(source))
    if not os.path.isfile(source):
        raise WeightsError(f"checkpoint {source} does not exist", instead=EVERY_SOURCE)
    try:
        return from_checkpoint(load_checkpoint(source), source)
    except CheckpointError as error:
        raise WeightsError(error.what, error.remedy, error.instead) from error


def from_checkpoint(checkpoint: object, source: str) -> Weights:
    """A train.py checkpoint ({"model", "ema", "args", ...}) or a bare state dict."""
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{source} holds a {type(checkpoint).__name__}, not a state dict or a training checkpoint")
    if "ema" not in checkpoint:
        return Weights(source, checkpoint)
    args = checkpoint.get("args")
    return Weights(source, checkpoint["ema"], checkpoint.get("model"), args if isinstance(args, dict) else {})


def find_model(model_name: str) -> dict[str, torch.Tensor]:
    """The original DiT's loader: the weights to sample with (a training checkpoint's EMA copy) of
    a released name, hf:OWNER/REPO[/SUBFOLDER], a diffusers DiT folder or a checkpoint file."""
    return load_weights(model_name).ema


def folder_model(folder: str) -> dict[str, torch.Tensor]:
    """A diffusers DiTTransformer2DModel folder, or a pipeline folder holding one in transformer/."""
    for candidate in (folder, os.path.join(folder, HUB_SUBFOLDER)):
        if is_diffusers_folder(candidate):
            return load_diffusers_folder(candidate)
    raise WeightsError(
        f"{folder} is a folder but not a diffusers DiT (config.json with {' or '.join(WEIGHT_FILES)}, "
        f"there or in {HUB_SUBFOLDER}/)", instead="a checkpoint file or such a folder",
    )


def hub_model(spec: str) -> dict[str, torch.Tensor]:
    """OWNER/REPO[/SUBFOLDER] from the Hugging Face hub, through huggingface_hub's cache."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    parts = spec.split("/", 2)
    repo, subfolder = "/".join(parts[:2]), parts[2] if len(parts) == 3 else HUB_SUBFOLDER
    try:
        config_path = hf_hub_download(repo, "config.json", subfolder=subfolder)
        safetensors_file, bin_file = WEIGHT_FILES
        try:
            hf_hub_download(repo, safetensors_file, subfolder=subfolder)
        except EntryNotFoundError:  # the facebook/DiT-XL-2-* main branches hold only the .bin
            hf_hub_download(repo, bin_file, subfolder=subfolder)
    except LocalEntryNotFoundError as error:
        raise WeightsError(
            f"{repo}/{subfolder} is not in the Hugging Face cache and the hub at {constants.ENDPOINT} could not be "
            f"reached (offline, or HF_HUB_OFFLINE set)", remedy="set HF_ENDPOINT to a mirror", instead=f"{LOCAL_CHECKPOINT} or diffusers folder",
        ) from error
    except (OSError, EntryNotFoundError, HFValidationError) as error:
        raise WeightsError(
            f"could not fetch {repo}/{subfolder} from the Hugging Face hub ({first_line(error)})",
            instead=f"{LOCAL_CHECKPOINT} or diffusers folder",
        ) from error
    return load_diffusers_folder(os.path.dirname(config_path))


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
            raise WeightsError(str(error), remedy=f"delete {path} to download it again") from error

    url = pretrained_url(name)
    part = path + ".part"
    try:
        fetch(url, part)
    except (OSError, http.client.HTTPException) as error:
        reason = error if isinstance(error, urllib.error.HTTPError) else getattr(error, "reason", error)
        if name not in HUB_REPOS:
            raise WeightsError(
                f"could not download {url} ({reason})",
                remedy=f"put the file at {path} by other means (or set {BASE_URL_ENV} to a mirror)", instead=LOCAL_CHECKPOINT,
            ) from error
        return hub_fallback(name, url, reason, path)
    try:
        state_dict = load_released(part, name)
    except ValueError as error:
        corrupt = path + ".corrupt"
        os.replace(part, corrupt)
        raise WeightsError(
            f"the file downloaded from {url} is not a valid {name} and was set aside as {corrupt} ({error})",
            remedy=f"put a good copy at {path}", instead=LOCAL_CHECKPOINT,
        ) from error
    os.replace(part, path)
    return state_dict


def hub_fallback(name: str, url: str, reason: object, path: str) -> dict[str, torch.Tensor]:
    """The released weights from their hub repo, when the original address failed."""
    repo = HUB_REPOS[name]
    print(f"could not download {url} ({reason}); trying hf:{repo}", file=sys.stderr)
    try:
        state_dict = hub_model(repo)
    except WeightsError as error:
        raise WeightsError(
            f"could not download {url} ({reason}) nor hf:{repo} from the Hugging Face hub",
            remedy=f"put the file at {path} by other means (or set {BASE_URL_ENV} or HF_ENDPOINT to a mirror)",
            instead=LOCAL_CHECKPOINT,
        ) from error
    return check_released(state_dict, name, f"hf:{repo}")


def load_released(path: str, name: str) -> dict[str, torch.Tensor]:
    """Load a released checkpoint safely and check its keys and shapes against its model."""
    return check_released(from_checkpoint(load_checkpoint(path), path).ema, name, path)


def check_released(state_dict: dict[str, torch.Tensor], name: str, source: str) -> dict[str, torch.Tensor]:
    """The keys and shapes of the model `name` must have, or a WeightsError naming the difference."""
    model_name, latent_size = PRETRAINED_MODELS[name]
    with torch.device("meta"):  # shapes only, no memory
        model = DiT_models[model_name](input_size=latent_size)
    try:
        check_state_dict(model, state_dict, what=f"{source} ({name})")
    except ValueError as error:
        raise WeightsError(str(error)) from error
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
