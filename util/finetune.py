"""Weights to fine-tune from: a released model or a checkpoint, fitted to the model being trained."""
from __future__ import annotations

import math

import torch

from models import check_state_dict
from util.checkpoints import load_checkpoint, model_weights
from util.pretrained import PRETRAINED_MODELS, download_model
from util.sampling import LABEL_TABLE

POS_EMBED = "pos_embed"
PATCH_WEIGHT = "x_embedder.proj.weight"


def initial_weights(source: str) -> tuple[dict, dict, dict]:
    """(model weights, EMA weights, training settings or {}) of a released name (downloaded if
    absent: its EMA weights are both) or of a checkpoint file (a train.py checkpoint, or a bare
    state dict used for both). Raises FileNotFoundError, RuntimeError or ValueError in one sentence."""
    if source in PRETRAINED_MODELS:
        weights = download_model(source)
        return weights, weights, {}
    checkpoint = load_checkpoint(source)
    if isinstance(checkpoint, dict) and "model" in checkpoint and "ema" in checkpoint:
        return checkpoint["model"], checkpoint["ema"], checkpoint.get("args") or {}
    return model_weights(checkpoint), model_weights(checkpoint), {}


def token_grid(weights: dict) -> int:
    """Tokens per side of the square grid that a state dict's pos_embed (1, tokens, width) covers."""
    return math.isqrt(weights[POS_EMBED].shape[1])


def describe_weights(weights: dict, settings: dict) -> str:
    """What a state dict was made for: the training settings when known, else its shapes."""
    if settings.get("model") and settings.get("image_size"):
        return f"{settings['model']} at {settings['image_size']} px with {settings.get('num_classes')} classes"
    if POS_EMBED not in weights or PATCH_WEIGHT not in weights:
        return "a model that is not a DiT"
    width, channels, patch, _ = weights[PATCH_WEIGHT].shape
    depth = len({name.split(".")[1] for name in weights if name.startswith("blocks.")})
    latent = token_grid(weights) * patch
    return f"a DiT of depth {depth}, width {width} and patch size {patch} on {latent}x{latent} latents of {channels} channels"


def only_pos_embed_differs(model: torch.nn.Module, weights: dict) -> bool:
    """Whether the weights fit the model but for pos_embed's number of tokens (another image size)."""
    expected = model.state_dict()
    if POS_EMBED not in weights or set(weights) != set(expected):
        return False
    mis_shaped = [name for name in expected if weights[name].shape != expected[name].shape]
    return mis_shaped == [POS_EMBED] and weights[POS_EMBED].shape[2] == expected[POS_EMBED].shape[2]


def fit_weights(
    model: torch.nn.Module, ema: torch.nn.Module, model_state: dict, ema_state: dict, what: str
) -> tuple[dict, dict, int | None, int | None]:
    """The weights fitted to the model, then checked (ValueError naming `what` on a mismatch).

    Two parts keep the model's fresh values: the label table for another number of classes (the
    other weights carry over, as in fine-tuning a classifier on new classes), and pos_embed for
    another image size: it is the fixed sin-cos table of the token grid (paper Section 3.2,
    "Patchify"), not learned, so the model's own table for its grid is the right one. Returns the
    weights, the source's label-table rows when relabelled and its token grid when re-gridded.
    """
    table = LABEL_TABLE
    new_table, old_table = model.state_dict()[table], model_state.get(table)
    relabel = old_table is not None and old_table.shape != new_table.shape and old_table.shape[1:] == new_table.shape[1:]
    if relabel:
        model_state, ema_state = {**model_state, table: new_table}, {**ema_state, table: ema.state_dict()[table]}
    old_grid = None
    if only_pos_embed_differs(model, model_state) and only_pos_embed_differs(ema, ema_state):
        old_grid = token_grid(model_state)
        model_state = {**model_state, POS_EMBED: model.state_dict()[POS_EMBED]}
        ema_state = {**ema_state, POS_EMBED: ema.state_dict()[POS_EMBED]}
    for module, weights in ((model, model_state), (ema, ema_state)):
        check_state_dict(module, weights, what=what)
    return model_state, ema_state, old_table.shape[0] if relabel else None, old_grid
