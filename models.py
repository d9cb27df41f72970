"""DiT: a latent diffusion transformer with adaLN-Zero conditioning (Peebles & Xie, 2022,
"Scalable Diffusion Models with Transformers"; sections, figures and tables below are the paper's).

State-dict keys and shapes match the released checkpoints, so `DiT-XL-2-256x256.pt` loads
with `strict=True`. Shapes used below: N batch, C latent channels, T tokens, D width.

The original builds PatchEmbed, Attention and Mlp from timm; these are the same three layers
in plain torch (same parameter names, same arithmetic: tests/test_models.py compares them
with timm's), so that timm is no run-time dependency.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-sample affine on tokens, the adaptive layer norm's gamma and beta (Section 3.2):
    x (N, T, D), shift/scale (N, D). `1 + scale` makes a zero scale the identity."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------

def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(len(positions), dim) table [sin(pos * omega), cos(pos * omega)], in float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even size, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, dim) float32 table for a square grid of tokens in row-major order: the
    fixed sine-cosine position embedding added to every token after patchify (Section 3.2).

    The first half of the channels encodes the column index, the second half the row index.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a size divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows = coords.repeat_interleave(grid_size)  # token k sits at row k // grid_size
    cols = coords.repeat(grid_size)  # ... and column k % grid_size
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N, dim) sinusoidal features [cos(t*f), sin(t*f)], zero-padded when dim is odd."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class PatchEmbed(nn.Module):
    """"Patchify" (Section 3.2, Figure 4): non-overlapping p x p patches -> tokens,
    (N, C, H, W) -> (N, H*W/p^2, D), as a strided convolution (timm's PatchEmbed)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Scalar diffusion timesteps -> (N, D) vectors: a 256-dim frequency embedding, then a
    two-layer SiLU MLP (Section 3.2, DiT block design)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (N, D) vectors. Row `num_classes` is the null label that
    classifier-free guidance uses (Section 3.1: labels are dropped at random in training so
    that one model learns both the conditional and the unconditional prediction); it exists
    only when labels can be dropped."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        has_null_row = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + has_null_row, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replace dropped labels with the null label (random unless force_drop_ids is given)."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        # Checking values costs a host-device sync, so only CPU labels are checked here;
        # the scripts check labels before they reach an accelerator.
        if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.embedding_table.num_embeddings:
                raise ValueError(
                    f"class labels must lie in [0, {self.embedding_table.num_embeddings - 1}] "
                    f"({self.num_classes} classes{' + null label' if self.dropout_prob > 0 else ''}), "
                    f"got values in [{lo}, {hi}]"
                )
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


# ----------------------------------------------------------------------------------------
# Transformer
# ----------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's Attention with qkv_bias).

    fused=True uses scaled_dot_product_attention (flash / memory-efficient kernels);
    fused=False spells out softmax(q k^T / sqrt(d)) v.
    """

    def __init__(self, dim: int, num_heads: int, fused: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.fused = fused
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """Linear-GELU-Linear (timm's Mlp with the tanh approximation of GELU, as the original)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning (adaLN-Zero,
    Section 3.2, Figure 3): the conditioning gives shift, scale and a residual gate for
    attention and for the MLP; the gates start at zero, so the block starts as the identity."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, fused_attn: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, fused=fused_attn)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The transformer decoder (Section 3.2): adaLN-modulated LayerNorm, then a linear map
    from each token to its p x p x C patch (noise and, with learn_sigma, variance)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional diffusion transformer on latents of shape (N, in_channels, input_size, input_size).

    Outputs (N, out_channels, input_size, input_size): the noise prediction, followed by
    the variance interpolation channels when learn_sigma is set.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        fused_attn: bool = True,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(
                f"latent size {input_size} is not divisible by the patch size {patch_size}; "
                f"use an image size that is a multiple of {8 * patch_size}"
            )
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        # Fixed, but kept as a (frozen) parameter so that it is in the state dict like the original.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, fused_attn=fused_attn) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        grid = self.input_size // self.patch_size
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], grid).unsqueeze(0))

        # The patch conv is a linear map on flattened patches: initialise it like one.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero (Section 3.2): every block starts as the identity and the output at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        self.grad_checkpointing = enable

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W); token (h, w) holds a p x p x C patch, channel fastest."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected latents of shape (N, {expected[0]}, {expected[1]}, {expected[2]}), got {tuple(x.shape)}"
            )
        if t.shape != (x.shape[0],) or y.shape != (x.shape[0],):
            raise ValueError(
                f"expected t and y of shape ({x.shape[0]},), got {tuple(t.shape)} and {tuple(y.shape)}"
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) latents, t: (N,) timesteps, y: (N,) class labels."""
        self.check_inputs(x, t, y)
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        cfg_scale: float,
        all_eps_channels: bool = False,
    ) -> torch.Tensor:
        """Classifier-free guidance (Ho & Salimans 2022; DiT Section 3.1) on a batch laid out as
        [conditional; unconditional].

        Only the first half of x is used (it is run twice, once per label half). Guidance
        eps = eps(x_t, null) + s * (eps(x_t, y) - eps(x_t, null)) touches the noise
        prediction, never the variance channels. By default only the first 3 eps channels are guided, as in the original
        code whose published FID numbers depend on it; all_eps_channels=True guides all
        `in_channels` of them (the textbook form).
        """
        half = x[: len(x) // 2]
        # self(...) rather than self.forward(...), so that Module.compile() covers this path too.
        out = self(torch.cat([half, half], dim=0), t, y)
        guided = self.in_channels if all_eps_channels else 3
        eps, rest = out[:, :guided], out[:, guided:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Raise a ValueError that names missing, unexpected and mis-shaped keys, if any."""
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mis_shaped = [
        f"{k} expected {tuple(expected[k].shape)} found {tuple(state_dict[k].shape)}"
        for k in expected
        if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)
    ]
    for label, items in (("shape mismatches", mis_shaped), ("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            shown = "; ".join(items[:5]) + (f"; ... ({len(items) - 5} more)" if len(items) > 5 else "")
            problems.append(f"{len(items)} {label}: {shown}")
    if problems:
        raise ValueError(f"{what} does not fit the model: " + " | ".join(problems))


# ----------------------------------------------------------------------------------------
# Configs (Table 1): depth, width and heads of S, B and L follow ViT, XL is the paper's own.
# DiT-{size}/{p} cuts the latent into p x p patches: halving p quadruples the tokens and about
# quadruples the Gflops (forward multiply-adds; Table 1 lists them at p = 4, 32x32 latents).
# DiT-XL/2 at 256 px: 118.6 Gflops per image (benchmarks/benchmark.py counts them).
# ----------------------------------------------------------------------------------------

def DiT_XL_2(**kwargs) -> DiT:
    return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)


def DiT_XL_4(**kwargs) -> DiT:
    return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)


def DiT_XL_8(**kwargs) -> DiT:
    return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)


def DiT_L_2(**kwargs) -> DiT:
    return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)


def DiT_L_4(**kwargs) -> DiT:
    return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)


def DiT_L_8(**kwargs) -> DiT:
    return DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)


def DiT_B_2(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)


def DiT_B_4(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)


def DiT_B_8(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)


def DiT_S_2(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)


def DiT_S_4(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)


def DiT_S_8(**kwargs) -> DiT:
    return DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)


DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
}
