"""Weights to fine-tune from: a released model or a checkpoint, fitted to the model being trained."""
from __future__ import annotations

import torch

from models import check_state_dict
from util.checkpoints import load_checkpoint, model_weights
from util.pretrained import PRETRAINED_MODELS, download_model
from util.sampling import LABEL_TABLE


def initial_weights(source: str) -> tuple[dict, dict]:
    """(model weights, EMA weights) of a released name (downloaded if absent: its EMA weights are
    both) or of a checkpoint file (a train.py checkpoint, or a bare state dict used for both).
    Raises FileNotFoundError, RuntimeError or ValueError in one sentence."""
    if source in PRETRAINED_MODELS:
        weights = download_model(source)
        return weights, weights
    checkpoint = load_checkpoint(source)
    if isinstance(checkpoint, dict) and "model" in checkpoint and "ema" in checkpoint:
        return checkpoint["model"], checkpoint["ema"]
    return model_weights(checkpoint), model_weights(checkpoint)


def fit_weights(
    model: torch.nn.Module, ema: torch.nn.Module, model_state: dict, ema_state: dict, what: str
) -> tuple[dict, dict, int | None]:
    """The weights checked against the model (ValueError naming `what` on a mismatch), and the
    rows of their label table when it keeps its fresh initialisation: for another number of
    classes the other weights carry over, as in fine-tuning a classifier on new classes."""
    table = LABEL_TABLE
    new_table, old_table = model.state_dict()[table], model_state.get(table)
    relabel = old_table is not None and old_table.shape != new_table.shape and old_table.shape[1:] == new_table.shape[1:]
    if relabel:
        model_state, ema_state = {**model_state, table: new_table}, {**ema_state, table: ema.state_dict()[table]}
    for module, weights in ((model, model_state), (ema, ema_state)):
        check_state_dict(module, weights, what=what)
    return model_state, ema_state, old_table.shape[0] if relabel else None
