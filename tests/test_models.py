"""models.py: the facts of the released checkpoints, initialisation, guidance and labels, the timm
layers of the original, bad input. (The comparisons with reference vectors: test_reference_vectors.py.)"""
from __future__ import annotations

import pytest
import torch

from conftest import load_golden_model, randomize_
from models import DiT_models, check_state_dict


# ---------------------------------------------------------------- structure

# Facts about the reference implementation (parameter counts of its models).
@pytest.mark.parametrize(
    "name,input_size,total,trainable",
    [
        ("DiT-S/2", 32, 32_963_360, 32_865_056),
        ("DiT-B/4", 32, 130_475_648, None),
        ("DiT-L/8", 32, 458_594_816, None),
        ("DiT-XL/2", 32, 675_129_632, None),
        ("DiT-XL/2", 64, 676_014_368, None),
    ],
)
def test_parameter_counts(name, input_size, total, trainable):
    with torch.device("meta"):
        model = DiT_models[name](input_size=input_size)
    assert sum(p.numel() for p in model.parameters()) == total
    if trainable is not None:
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


def released_checkpoint_shapes(input_size: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of DiT-XL-2-{256,512}.pt, written out from the published architecture."""
    d, depth, p, tokens = 1152, 28, 2, (input_size // 2) ** 2
    shapes = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, 4, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (1001, d),
    }
    for i in range(depth):
        shapes.update({
            f"blocks.{i}.attn.qkv.weight": (3 * d, d),
            f"blocks.{i}.attn.qkv.bias": (3 * d,),
            f"blocks.{i}.attn.proj.weight": (d, d),
            f"blocks.{i}.attn.proj.bias": (d,),
            f"blocks.{i}.mlp.fc1.weight": (4 * d, d),
            f"blocks.{i}.mlp.fc1.bias": (4 * d,),
            f"blocks.{i}.mlp.fc2.weight": (d, 4 * d),
            f"blocks.{i}.mlp.fc2.bias": (d,),
            f"blocks.{i}.adaLN_modulation.1.weight": (6 * d, d),
            f"blocks.{i}.adaLN_modulation.1.bias": (6 * d,),
        })
    shapes.update({
        "final_layer.linear.weight": (p * p * 8, d),
        "final_layer.linear.bias": (p * p * 8,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    })
    return shapes


@pytest.mark.parametrize("input_size", [32, 64])
def test_xl2_state_dict_keys_and_shapes(input_size):
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=input_size)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert actual == released_checkpoint_shapes(input_size)


def test_all_twelve_configs():
    sizes = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    assert set(DiT_models) == {f"DiT-{s}/{p}" for s in sizes for p in (2, 4, 8)}
    for name, build in DiT_models.items():
        size, patch = name[4:].split("/")
        with torch.device("meta"):
            model = build(input_size=32, num_classes=10)
        depth, width, heads = sizes[size]
        assert len(model.blocks) == depth
        assert model.pos_embed.shape == (1, (32 // int(patch)) ** 2, width)
        assert model.blocks[0].attn.num_heads == heads
        assert model.x_embedder.proj.kernel_size == (int(patch), int(patch))


def test_fresh_model_outputs_exactly_zero():
    torch.manual_seed(0)
    model = DiT_models["DiT-S/4"](input_size=16, num_classes=10)
    out = model(torch.randn(2, 4, 16, 16), torch.tensor([3, 999]), torch.tensor([0, 9]))
    assert out.shape == (2, 8, 16, 16)
    assert torch.count_nonzero(out) == 0


def test_pos_embed_is_frozen_but_saved():
    model = DiT_models["DiT-S/8"](input_size=16, num_classes=10)
    assert not model.pos_embed.requires_grad
    assert "pos_embed" in model.state_dict()
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "pos_embed")


def test_initialisation_statistics():
    torch.manual_seed(0)
    model = DiT_models["DiT-S/8"](input_size=16, num_classes=10)
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.002
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.002
    fan_in, fan_out = 384, 3 * 384  # xavier-uniform bound sqrt(6 / (fan_in + fan_out))
    bound = (6 / (fan_in + fan_out)) ** 0.5
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.95 * bound
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0
    conv_bound = (6 / (4 * 8 * 8 + 384)) ** 0.5  # the patch conv as a Linear(4*8*8 -> 384)
    assert model.x_embedder.proj.weight.abs().max() <= conv_bound


# ---------------------------------------------------------------- guidance and labels

def test_cfg_all_eps_channels_differs_exactly_on_channel_3():
    model, data = load_golden_model("model_tiny")
    args = (data["cfg_x"], data["cfg_t"], data["cfg_y"], data["cfg_scale"])
    with torch.no_grad():
        default = model.forward_with_cfg(*args)
        all_eps = model.forward_with_cfg(*args, all_eps_channels=True)
    assert torch.equal(default[:, :3], all_eps[:, :3])
    assert torch.equal(default[:, 4:], all_eps[:, 4:])  # variance channels are never guided
    assert not torch.allclose(default[:, 3], all_eps[:, 3])
    # The all-channel form applies the textbook formula to channel 3 as well.
    with torch.no_grad():
        half = data["cfg_x"][:2]
        raw = model(torch.cat([half, half]), data["cfg_t"], data["cfg_y"])
    cond, uncond = raw[:2, 3], raw[2:, 3]
    expected = uncond + data["cfg_scale"] * (cond - uncond)
    torch.testing.assert_close(all_eps[:2, 3], expected)
    torch.testing.assert_close(all_eps[2:, 3], expected)


def test_label_dropout_draws_rand_and_uses_null_row():
    model, data = load_golden_model("model_tiny")
    labels = torch.arange(10)
    embedder = model.y_embedder
    torch.manual_seed(5)
    dropped = torch.rand(10) < 0.1
    torch.manual_seed(5)
    out = embedder(labels, train=True)
    expected_ids = torch.where(dropped, 10, labels)
    torch.testing.assert_close(out, embedder.embedding_table.weight[expected_ids], rtol=0, atol=0)
    forced = embedder(labels, train=False, force_drop_ids=(labels % 2 == 0).long())
    assert torch.equal(forced[0], embedder.embedding_table.weight[10])
    assert torch.equal(forced[1], embedder.embedding_table.weight[1])
    assert torch.equal(embedder(labels, train=False), embedder.embedding_table.weight[:10])


def test_no_null_row_without_dropout():
    model, data = load_golden_model("model_nosigma")
    assert model.y_embedder.embedding_table.num_embeddings == 7


# ---------------------------------------------------------------- the original's timm layers

@pytest.mark.parametrize("fused", [True, False])
def test_layers_equal_the_timm_layers_of_the_original(fused):
    """The original builds PatchEmbed, Attention and Mlp from timm; ours have the same
    parameter names and shapes and give bit-identical outputs on the same weights."""
    vit = pytest.importorskip("timm.models.vision_transformer", reason="timm is in requirements-test.txt")
    from models import Attention, Mlp, PatchEmbed

    torch.manual_seed(0)
    pairs = [
        (PatchEmbed(2, 4, 48), vit.PatchEmbed(img_size=8, patch_size=2, in_chans=4, embed_dim=48, bias=True), torch.randn(3, 4, 8, 8)),
        (Attention(48, 4, fused=fused), vit.Attention(48, num_heads=4, qkv_bias=True), torch.randn(3, 16, 48)),
        (Mlp(48, 192), vit.Mlp(in_features=48, hidden_features=192, act_layer=lambda: torch.nn.GELU(approximate="tanh"), drop=0), torch.randn(3, 16, 48)),
    ]
    for ours, theirs, x in pairs:
        theirs.fused_attn = fused  # timm picks its attention kernel from this attribute
        randomize_(theirs.eval())
        assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
        ours.load_state_dict(theirs.state_dict(), strict=True)
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x)), type(ours).__name__


# ---------------------------------------------------------------- fast paths

def test_fused_attention_matches_plain_formula():
    torch.manual_seed(0)
    fused = randomize_(DiT_models["DiT-S/4"](input_size=16, num_classes=10))
    plain = DiT_models["DiT-S/4"](input_size=16, num_classes=10, fused_attn=False)
    plain.load_state_dict(fused.state_dict())
    x, t, y = torch.randn(3, 4, 16, 16), torch.tensor([1, 500, 999]), torch.tensor([0, 4, 9])
    fused.eval(), plain.eval()
    with torch.no_grad():
        a, b = fused(x, t, y), plain(x, t, y)
    assert a.abs().max() > 0.1
    assert ((a - b).abs().max() / a.abs().max()) < 1e-5


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = randomize_(DiT_models["DiT-S/8"](input_size=16, num_classes=10)).eval()
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 2])

    def grads():
        model.zero_grad()
        model(x, t, y).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    for g1, g2 in zip(plain, checkpointed):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- bad input

def test_latent_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match="latent size 30 is not divisible by the patch size 4"):
        DiT_models["DiT-S/4"](input_size=30)


def test_labels_out_of_range():
    model, data = load_golden_model("model_tiny")
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 10\].*got values in \[0, 11\]"):
        model(data["x"], data["t"], torch.tensor([0, 11, 3]))
    with pytest.raises(ValueError, match="class labels"):
        model(data["x"], data["t"], torch.tensor([-1, 1, 3]))


def test_wrong_channel_count_and_size():
    model, data = load_golden_model("model_tiny")
    with pytest.raises(ValueError, match=r"expected latents of shape \(N, 4, 8, 8\), got \(3, 3, 8, 8\)"):
        model(data["x"][:, :3], data["t"], data["y"])
    with pytest.raises(ValueError, match=r"expected latents of shape \(N, 4, 8, 8\), got \(3, 4, 16, 16\)"):
        model(torch.zeros(3, 4, 16, 16), data["t"], data["y"])


def test_state_dict_of_another_config_names_the_mismatches():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32)
        other = DiT_models["DiT-XL/2"](input_size=64, num_classes=10)
    with pytest.raises(ValueError) as info:
        check_state_dict(model, other.state_dict())
    message = str(info.value)
    assert "2 shape mismatches" in message
    assert "pos_embed expected (1, 256, 1152) found (1, 1024, 1152)" in message
    assert "y_embedder.embedding_table.weight expected (1001, 1152) found (11, 1152)" in message

    partial = dict(model.state_dict())
    del partial["blocks.27.attn.qkv.weight"]
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing keys: blocks\.27\.attn\.qkv\.weight.*1 unexpected keys: extra\.weight"):
        check_state_dict(model, partial)
    check_state_dict(model, model.state_dict())  # a matching dict passes
