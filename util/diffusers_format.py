"""DiT weights in diffusers' `DiTTransformer2DModel` layout <-> the official DiT keys.

The conversion only renames, splits and joins tensors: no value changes. The hub repos
facebook/DiT-XL-2-256 and -512 hold the released weights in this layout (subfolder
`transformer`); util.pretrained.load_weights reads such folders through `load_diffusers_folder`.

Export (`official_to_diffusers`) exists for the tests and for users who know the caveat:
  !! Stock diffusers does NOT compute the same function from these weights. Its timestep
  !! embedding uses downscale_freq_shift=1 where DiT uses 0 (frequencies exp(-ln(1e4) i/(d/2-1))
  !! instead of exp(-ln(1e4) i/(d/2))), and DiTPipeline guides all 4 eps channels where DiT
  !! guides 3. Sample with this project's model; there is no command that writes a diffusers
  !! folder, on purpose.
"""
from __future__ import annotations

import json
import os

import torch

from models import sincos_2d
from util.checkpoints import WeightsError

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# Official module -> diffusers module inside every block (the adaLN, attention and MLP).
BLOCK_RENAMES = {
    "adaLN_modulation.1": "norm1.linear",  # both chunk into shift, scale, gate (msa) then (mlp)
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
# Official module -> diffusers module outside the blocks.
TOP_RENAMES = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",  # shift, scale in both
    "final_layer.linear": "proj_out_2",
}
# diffusers keeps a copy of the timestep and label embedders in every block; the official has one.
EMBEDDER_RENAMES = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table",
}
PARAMS = ("weight", "bias")


def num_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {int(key[len(prefix):].split(".")[0]) for key in state_dict if key.startswith(prefix)}
    return max(indices) + 1 if indices else 0


def official_to_diffusers(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DiT keys -> DiTTransformer2DModel keys (see the module's warning).
    pos_embed is dropped: diffusers recomputes the same fixed sin-cos table."""
    out: dict[str, torch.Tensor] = {}
    for old, new in TOP_RENAMES.items():
        for param in PARAMS:
            out[f"{new}.{param}"] = state_dict[f"{old}.{param}"]
    for i in range(num_blocks(state_dict, "blocks.")):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for old, new in BLOCK_RENAMES.items():
            for param in PARAMS:
                out[f"{dst}{new}.{param}"] = state_dict[f"{src}{old}.{param}"]
        for param in PARAMS:  # qkv rows are [q; k; v]
            q, k, v = state_dict[f"{src}attn.qkv.{param}"].chunk(3, dim=0)
            for name, tensor in zip(("to_q", "to_k", "to_v"), (q, k, v)):
                out[f"{dst}attn1.{name}.{param}"] = tensor.clone()
        for old, new in EMBEDDER_RENAMES.items():
            for param in PARAMS:
                if f"{old}.{param}" in state_dict:
                    out[f"{dst}{new}.{param}"] = state_dict[f"{old}.{param}"]
    return out


def diffusers_to_official(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """DiTTransformer2DModel keys and config -> official DiT keys, with the sin-cos pos_embed
    the official checkpoints carry. Fails in one sentence on anything that is not a DiT."""
    if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise ValueError(f"norm_type {config.get('norm_type')!r} is not DiT's adaLN-Zero")
    remaining = dict(state_dict)

    def take(key: str) -> torch.Tensor:  # every key is used exactly once
        if key not in remaining:
            raise ValueError(f"it has no {key}")
        return remaining.pop(key)

    out: dict[str, torch.Tensor] = {}
    for old, new in TOP_RENAMES.items():
        for param in PARAMS:
            out[f"{old}.{param}"] = take(f"{new}.{param}")
    depth = num_blocks(state_dict, "transformer_blocks.")
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for old, new in BLOCK_RENAMES.items():
            for param in PARAMS:
                out[f"{dst}{old}.{param}"] = take(f"{src}{new}.{param}")
        for param in PARAMS:
            out[f"{dst}attn.qkv.{param}"] = torch.cat([take(f"{src}attn1.{name}.{param}") for name in ("to_q", "to_k", "to_v")])
        for old, new in EMBEDDER_RENAMES.items():
            for param in PARAMS:
                if f"{src}{new}.{param}" not in state_dict:
                    continue
                tensor = take(f"{src}{new}.{param}")
                first = out.setdefault(f"{old}.{param}", tensor)
                if not torch.equal(first, tensor):
                    raise ValueError(f"block {i}'s copy of {old} differs from block 0's, which a DiT never has")
    if remaining:
        raise ValueError(f"keys that a DiT does not have: {', '.join(sorted(remaining)[:5])}")
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    grid = config["sample_size"] // config["patch_size"]
    out["pos_embed"] = sincos_2d(hidden, grid).unsqueeze(0)
    return out


def is_diffusers_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and any(
        os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES
    )


def load_diffusers_folder(folder: str) -> dict[str, torch.Tensor]:
    """Official DiT keys from a DiTTransformer2DModel folder (config.json + weights)."""
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        config = json.load(f)
    if config.get("_class_name", "DiTTransformer2DModel") not in ("DiTTransformer2DModel", "Transformer2DModel"):
        raise WeightsError(f"{folder} holds a diffusers {config['_class_name']}, not a DiTTransformer2DModel")
    safetensors_path, bin_path = (os.path.join(folder, name) for name in WEIGHT_FILES)
    if os.path.isfile(safetensors_path):
        from safetensors.torch import load_file

        state_dict = load_file(safetensors_path)
    else:
        state_dict = torch.load(bin_path, map_location="cpu", weights_only=True)
    try:
        return diffusers_to_official(state_dict, config)
    except (KeyError, ValueError) as error:  # KeyError: a config entry is missing
        raise WeightsError(f"{folder} is not a DiT in diffusers' layout: {error}") from error
