"""sample.py and the shared sampling plumbing: reference protocol, determinism, options, bad input."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import save_image

import sample
from conftest import (
    REPO, assert_close_to_reference, load_golden, load_golden_model, make_tiny_dit,
    unconditional_checkpoints
)
from diffusion import create_diffusion
from models import DiT, DiT_models
from util.precision import configure_precision
from util.sampling import create_sampler, denoise
from util.vae import load_vae

STEPS = 5
LABELS = [0, 1, 2, 3, 4]


def tiny_args(ckpts: dict, vae_dir, out, *extra: str) -> list[str]:
    return [
        "--model", ckpts["model"], "--image-size", str(ckpts["image_size"]), "--num-classes", str(ckpts["num_classes"]),
        "--ckpt", str(ckpts["training"]), "--vae-path", str(vae_dir), "--num-sampling-steps", str(STEPS),
        "--class-labels", *map(str, LABELS), "--out", str(out), *extra,
    ]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def run_cli(args: list[str]) -> None:
    # One thread: tiny matmuls gain nothing from more, and lose a lot on a busy machine.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(REPO / "sample.py"), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def cli_grid(tiny_dit_ckpts, tiny_vae_dir, tmp_path_factory):
    """sample.py run as a script, once from the training checkpoint and once from the bare weights."""
    folder = tmp_path_factory.mktemp("sample_cli")
    training, bare = folder / "training.png", folder / "bare.png"
    run_cli(tiny_args(tiny_dit_ckpts, tiny_vae_dir, training))
    run_cli(tiny_args(dict(tiny_dit_ckpts, training=tiny_dit_ckpts["bare"]), tiny_vae_dir, bare))
    return training, bare


pytestmark = pytest.mark.usefixtures("one_thread")


def run_in_process(ckpts: dict, vae_dir, out, *extra: str):
    try:
        sample.main(tiny_args(ckpts, vae_dir, out, *extra))
    finally:
        configure_precision("fp32")
    return pixels(out)


@pytest.fixture(scope="module")
def reference_model() -> DiT:
    return load_golden_model("model_tiny")[0]


# ---------------------------------------------------------------- the script

@pytest.mark.slow
def test_grid_has_four_images_per_row(cli_grid):
    # save_image's grid: 2 px padding around 64 px tiles; 5 images -> 4 columns, 2 rows.
    assert Image.open(cli_grid[0]).size == (4 * 66 + 2, 2 * 66 + 2)


@pytest.mark.slow
def test_same_seed_same_image_and_ema_weights_are_used(cli_grid):
    # The training checkpoint's `model` entry differs from `ema`: equal grids mean `ema` was used.
    training, bare = map(pixels, cli_grid)
    np.testing.assert_array_equal(training, bare)
    assert training.std() > 5, "a blank grid"


@pytest.mark.slow
def test_script_follows_the_reference_protocol(cli_grid, tiny_dit_ckpts, tiny_vae_dir, tmp_path):
    """Rebuild the grid step by step as the spec describes the original sample.py."""
    seed, cfg_scale = 0, 4.0
    torch.manual_seed(seed)
    model = DiT_models["DiT-S/8"](input_size=8, num_classes=10)
    model.load_state_dict(torch.load(tiny_dit_ckpts["bare"], weights_only=True))
    model.eval()
    diffusion = create_diffusion(str(STEPS))
    vae = load_vae("mse", torch.device("cpu"), str(tiny_vae_dir))
    torch.manual_seed(seed)
    z = torch.randn(len(LABELS), 4, 8, 8)
    z = torch.cat([z, z], 0)
    y = torch.cat([torch.tensor(LABELS), torch.tensor([10] * len(LABELS))], 0)
    with torch.no_grad():
        samples = diffusion.p_sample_loop(
            model.forward_with_cfg, z.shape, z, clip_denoised=False, model_kwargs=dict(y=y, cfg_scale=cfg_scale)
        )
        samples, _ = samples.chunk(2, dim=0)
        images = vae.decode(samples / 0.18215).sample
    expected = tmp_path / "expected.png"
    save_image(images, expected, nrow=4, normalize=True, value_range=(-1, 1))
    difference = np.abs(pixels(cli_grid[0]) - pixels(expected))
    assert difference.max() <= 1, "more than float noise between the script and the protocol"


@pytest.mark.slow
def test_seed_sampler_guidance_and_precision_options(tiny_dit_ckpts, tiny_vae_dir, cli_grid, tmp_path):
    reference = pixels(cli_grid[0])
    out = tmp_path / "grid.png"
    other_seed = run_in_process(tiny_dit_ckpts, tiny_vae_dir, out, "--seed", "1")
    all_channels = run_in_process(tiny_dit_ckpts, tiny_vae_dir, out, "--cfg-all-eps-channels")
    ddim = run_in_process(tiny_dit_ckpts, tiny_vae_dir, out, "--sampler", "ddim")
    bf16 = run_in_process(tiny_dit_ckpts, tiny_vae_dir, out, "--precision", "bf16")
    for name, grid in (("--seed 1", other_seed), ("--sampler ddim", ddim)):
        assert grid.shape == reference.shape
        assert np.abs(grid - reference).mean() > 1, f"{name} did not change the grid"
    # Guiding the 4th eps channel too changes the picture a little.
    assert (all_channels != reference).any()
    # bf16 matmuls change the last bits, not the picture.
    assert np.abs(bf16 - reference).mean() < 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image-size", "60"], "--image-size 60 is not a positive multiple of 8 (the VAE downsamples by 8)"),
        (["--image-size", "72"], "latent size 9 is not divisible by the patch size 8"),
        (["--image-size", "128"], "pos_embed expected (1, 4, 384) found (1, 1, 384)"),
        (["--num-classes", "20"], "y_embedder.embedding_table.weight expected (21, 384) found (11, 384)"),
        (["--class-labels", "3", "10"], "class labels must lie in [0, 9] for --num-classes 10, got [10]"),
        (["--ckpt", "missing.pt"], "checkpoint missing.pt does not exist; pass --ckpt PATH"),
        (["--sampler", "ddim", "--num-sampling-steps", "300"], "--num-sampling-steps 300 does not work with --sampler ddim"),
        (["--out", "grid"], "--out grid needs an image file extension"),
        (["--vae-path", "no-such-folder"], "--vae-path no-such-folder is not a diffusers AutoencoderKL folder"),
        (["--cfg-scale", "nan"], "--cfg-scale must be a finite number, got nan"),
        (["--cfg-scale", "inf"], "--cfg-scale must be a finite number, got inf"),
        (["--num-sampling-steps", "0"], "--num-sampling-steps must lie in [1, 1000] (the training steps), got 0"),
        (["--num-sampling-steps", "1001"], "--num-sampling-steps must lie in [1, 1000] (the training steps), got 1001"),
        (["--num-classes", "0"], "--num-classes must be at least 1, got 0"),
        (["--out", "missing/grid.png"], "the folder of --out missing/grid.png does not exist"),
    ],
)
def test_bad_input_fails_in_one_sentence_before_writing(tiny_dit_ckpts, tiny_vae_dir, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "grid.png"
    with pytest.raises(SystemExit) as exit_info:
        sample.main(tiny_args(tiny_dit_ckpts, tiny_vae_dir, out) + extra)
    text = str(exit_info.value.code)
    assert text.startswith("sample.py: error: ") and "\n" not in text
    assert message in text
    assert not out.exists() and os.listdir(tmp_path) == []


def test_other_models_need_a_checkpoint(tiny_vae_dir, tmp_path):
    with pytest.raises(SystemExit, match="no released checkpoint for DiT-S/8 at 64 px .*; pass --ckpt PATH"):
        sample.main(["--model", "DiT-S/8", "--image-size", "64", "--vae-path", str(tiny_vae_dir), "--out", str(tmp_path / "x.png")])


def test_output_that_cannot_be_written_is_refused_before_loading(tiny_dit_ckpts, tiny_vae_dir, tmp_path, monkeypatch):
    """A parent that is a file, a folder given as --out, or a read-only folder: one sentence,
    before the checkpoint is even read."""
    monkeypatch.setattr(sample, "load_model", lambda *args: pytest.fail("the model was loaded"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.png").mkdir()
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_access = os.access
    # As root a chmod does not stop writing; os.access is what the check asks.
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(read_only) and real_access(path, mode))
    cases = {
        tmp_path / "file" / "grid.png": "is a file",
        tmp_path / "folder.png": "is a folder; pass a file name such as",
        read_only / "grid.png": "is not writable",
    }
    for out, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            sample.main(tiny_args(tiny_dit_ckpts, tiny_vae_dir, out))
        text = str(exit_info.value.code)
        assert text.startswith("sample.py: error: ") and message in text and "\n" not in text
    assert sorted(os.listdir(tmp_path)) == ["file", "folder.png", "read_only"] and os.listdir(read_only) == []


@pytest.mark.slow
def test_solver_grid_is_seeded_and_differs_from_ddpm(tiny_dit_ckpts, tiny_vae_dir, cli_grid, tmp_path):
    """--sampler dpm-solver++ --num-sampling-steps 25, as the README shows, twice with one seed."""
    out = tmp_path / "grid.png"
    flags = ("--sampler", "dpm-solver++", "--num-sampling-steps", "25")
    first = run_in_process(tiny_dit_ckpts, tiny_vae_dir, out, *flags)
    second = run_in_process(tiny_dit_ckpts, tiny_vae_dir, out, *flags)
    other_seed = run_in_process(tiny_dit_ckpts, tiny_vae_dir, out, *flags, "--seed", "1")
    np.testing.assert_array_equal(first, second)
    assert first.shape == pixels(cli_grid[0]).shape and first.std() > 5
    assert np.abs(other_seed - first).mean() > 1


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_one_sampling_step_works(tiny_dit_ckpts, tiny_vae_dir, tmp_path, sampler):
    """One step samples from t=999 (tests/test_solvers.py checks the values)."""
    grid = run_in_process(tiny_dit_ckpts, tiny_vae_dir, tmp_path / "grid.png", "--num-sampling-steps", "1", "--sampler", sampler)
    assert grid.std() > 5


@pytest.mark.slow
def test_a_one_class_checkpoint_samples_with_num_classes_1(tiny_vae_dir, tmp_path):
    """Custom and unconditional checkpoints: --num-classes sizes the label table, and a label
    the checkpoint cannot take is refused in one sentence, not by an indexing error."""
    path = tmp_path / "one_class.pt"
    torch.save(make_tiny_dit(num_classes=1), path)
    ckpts = {"training": path, "model": "DiT-S/8", "image_size": 64, "num_classes": 1}
    grid = run_in_process(ckpts, tiny_vae_dir, tmp_path / "grid.png", "--class-labels", "0", "0", "--sampler", "unipc")
    assert grid.std() > 5
    with pytest.raises(SystemExit, match=r"class labels must lie in \[0, 0\] for --num-classes 1, got \[1\]"):
        sample.main(tiny_args(ckpts, tiny_vae_dir, tmp_path / "other.png", "--class-labels", "0", "1"))


# ---------------------------------------------------------------- checkpoints without a null label


@pytest.mark.slow
def test_a_checkpoint_without_null_label_samples_unguided(tiny_vae_dir, tmp_path, capsys):
    """Guidance is off whatever --cfg-scale says, with one line when it asked for guidance; the
    grid is the plain reverse process of the model without a null label."""
    ckpts = unconditional_checkpoints(tmp_path)
    labels = ("--class-labels", "0", "0", "0")
    asked = run_in_process(ckpts, tiny_vae_dir, tmp_path / "asked.png", *labels)  # default --cfg-scale 4.0
    lines = [line for line in capsys.readouterr().err.splitlines() if "guidance is off" in line]
    assert lines == ["--cfg-scale 4.0: guidance is off because the checkpoint has no null label (trained with --class-dropout-prob 0)"]
    unguided = run_in_process(ckpts, tiny_vae_dir, tmp_path / "unguided.png", *labels, "--cfg-scale", "1")
    assert "guidance is off" not in capsys.readouterr().err
    bare = run_in_process(dict(ckpts, training=ckpts["bare"]), tiny_vae_dir, tmp_path / "bare.png", *labels)
    np.testing.assert_array_equal(asked, unguided)
    np.testing.assert_array_equal(bare, unguided)  # told apart by the table's rows alone

    model = DiT_models["DiT-S/8"](input_size=8, num_classes=1, class_dropout_prob=0)
    model.load_state_dict(torch.load(ckpts["bare"], weights_only=True))
    model.eval()
    torch.manual_seed(0)
    z = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        samples = create_diffusion(str(STEPS)).p_sample_loop(model, z.shape, z, clip_denoised=False, model_kwargs=dict(y=torch.zeros(3, dtype=torch.long)))
        images = load_vae("mse", torch.device("cpu"), str(tiny_vae_dir)).decode(samples / 0.18215).sample
    save_image(images, tmp_path / "expected.png", nrow=4, normalize=True, value_range=(-1, 1))
    assert np.abs(unguided - pixels(tmp_path / "expected.png")).max() <= 1
    assert unguided.std() > 5, "a blank grid"


@pytest.mark.slow
@pytest.mark.parametrize(
    "which, extra, message",
    [
        ("training", ["--class-labels", "0", "1"], "class labels must lie in [0, 0] for --num-classes 1, got [1]"),
        ("training", ["--num-classes", "2"], "was trained with --num-classes 1 (now 2); pass --num-classes 1"),
        ("bare", ["--num-classes", "2"], "y_embedder.embedding_table.weight expected (3, 384) found (1, 384)"),
    ],
)
def test_labels_and_class_counts_a_checkpoint_without_null_label_cannot_take(tiny_vae_dir, tmp_path, which, extra, message):
    ckpts = unconditional_checkpoints(tmp_path)
    out = tmp_path / "grid.png"
    with pytest.raises(SystemExit) as exit_info:
        sample.main(tiny_args(dict(ckpts, training=ckpts[which]), tiny_vae_dir, out, "--class-labels", "0", *extra))
    text = str(exit_info.value.code)
    assert text.startswith("sample.py: error: ") and "\n" not in text
    assert message in text
    assert not out.exists()


def test_denoise_refuses_to_guide_a_model_without_null_label():
    """The library call too fails in a sentence, before the null label reaches the label table."""
    model = DiT_models["DiT-S/8"](input_size=8, num_classes=1, class_dropout_prob=0).eval()
    with pytest.raises(ValueError, match="no null label .* cannot be guided"):
        denoise(model, create_sampler(2, "ddpm"), torch.randn(1, 4, 8, 8), torch.zeros(1, dtype=torch.long), cfg_scale=4.0)


# ---------------------------------------------------------------- checkpoints that describe themselves

@pytest.fixture(scope="module")
def described(tmp_path_factory) -> dict:
    """A train.py checkpoint whose args name its model, size and classes (as train.py saves
    vars(args)); its raw weights differ from its EMA weights. Also the raw weights alone."""
    folder = tmp_path_factory.mktemp("described")
    ema = make_tiny_dit()
    raw = dict(ema, **{"final_layer.linear.bias": ema["final_layer.linear.bias"] + 1.0})
    args = {"model": "DiT-S/8", "image_size": 64, "num_classes": 10, "class_dropout_prob": 0.1, "vae": "ema", "vae_path": None}
    path, raw_path = folder / "0000020.pt", folder / "raw.pt"
    torch.save({"model": raw, "ema": ema, "args": args}, path)
    torch.save(raw, raw_path)
    return {"training": path, "raw": raw_path}


def short_args(ckpt, vae_dir, out, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--vae-path", str(vae_dir), "--num-sampling-steps", str(STEPS), "--out", str(out), *extra]


def test_a_training_checkpoint_needs_no_model_flags(described, tiny_dit_ckpts, tiny_vae_dir, tmp_path):
    """Model, size and classes come from the checkpoint; 10 classes get the labels 0..7."""
    try:
        sample.main(short_args(described["training"], tiny_vae_dir, tmp_path / "short.png"))
    finally:
        configure_precision("fp32")
    spelt_out = dict(tiny_dit_ckpts, training=described["training"])
    labels = ("--class-labels", *map(str, range(8)))
    run_in_process(spelt_out, tiny_vae_dir, tmp_path / "long.png", *labels)  # the later --class-labels wins
    np.testing.assert_array_equal(pixels(tmp_path / "short.png"), pixels(tmp_path / "long.png"))
    assert Image.open(tmp_path / "short.png").size == (4 * 66 + 2, 2 * 66 + 2)  # 8 images


def test_default_labels_fit_the_class_count():
    assert sample.default_labels(1000) == [207, 360, 387, 974, 88, 979, 417, 279]
    assert sample.default_labels(10) == list(range(8))
    assert sample.default_labels(3) == [0, 1, 2, 0, 1, 2, 0, 1]


@pytest.mark.parametrize(
    "extra, saved, given",
    [(["--model", "DiT-S/4"], "--model DiT-S/8", "DiT-S/4"), (["--num-classes", "20"], "--num-classes 10", "20")],
)
def test_a_flag_that_contradicts_the_checkpoint_is_one_sentence(described, tiny_vae_dir, tmp_path, extra, saved, given):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(short_args(described["training"], tiny_vae_dir, tmp_path / "grid.png", *extra))
    text = str(exit_info.value.code)
    assert text.startswith(f"sample.py: error: checkpoint {described['training']} was trained with {saved} (now {given})")
    assert "\n" not in text and not (tmp_path / "grid.png").exists()


def test_raw_weights_are_the_checkpoints_model_entry(described, tiny_dit_ckpts, tiny_vae_dir, tmp_path):
    """--weights raw samples checkpoint["model"]: the grid of the raw weights saved alone, not the EMA grid."""
    ema = run_in_process(dict(tiny_dit_ckpts, training=described["training"]), tiny_vae_dir, tmp_path / "ema.png")
    raw = run_in_process(dict(tiny_dit_ckpts, training=described["training"]), tiny_vae_dir, tmp_path / "raw.png", "--weights", "raw")
    alone = run_in_process(dict(tiny_dit_ckpts, training=described["raw"]), tiny_vae_dir, tmp_path / "alone.png")
    assert np.abs(raw - ema).mean() > 1
    np.testing.assert_array_equal(raw, alone)


def test_raw_weights_of_a_bare_file_is_one_sentence(tiny_dit_ckpts, tiny_vae_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"^sample.py: error: --weights raw: .*bare.pt holds one set of weights.*; drop --weights raw$"):
        sample.main(tiny_args(dict(tiny_dit_ckpts, training=tiny_dit_ckpts["bare"]), tiny_vae_dir, tmp_path / "grid.png", "--weights", "raw"))


def test_weights_for_another_model_name_the_config_they_were_made_for(tiny_dit_ckpts, tiny_vae_dir, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(tiny_args(dict(tiny_dit_ckpts, training=tiny_dit_ckpts["bare"], model="DiT-B/4"), tiny_vae_dir, tmp_path / "grid.png"))
    text = str(exit_info.value.code)
    assert f"{tiny_dit_ckpts['bare']} holds DiT-S/8 at 8x8 latents, 4 channels, 11 label rows" in text
    assert "not DiT-B/4 at 8x8, 4 channels, 10 classes" in text and "\n" not in text


@pytest.mark.slow
def test_describe_state_dict_reads_the_config_off_the_shapes():
    from util.sampling import describe_state_dict

    assert describe_state_dict(make_tiny_dit("DiT-B/4", input_size=16, num_classes=1000)) == (
        "DiT-B/4 at 16x16 latents, 4 channels, 1001 label rows (1000 classes and the null label, or 1001 without)"
    )
    assert describe_state_dict({"w": torch.zeros(1)}) == "not a DiT state dict"


def test_denoise_takes_a_sampler_that_knows_its_kind(reference_model):
    """DDIM over a DDIM-respaced diffusion is one object: the same latents as the golden DDIM loop."""
    from util.sampling import DiffusionLoop

    sampler = create_sampler(10, "ddim")
    assert isinstance(sampler, DiffusionLoop) and sampler.name == "ddim"
    case = load_golden("sampling")["ddim10_eta0.0_seed2"]
    torch.manual_seed(2)
    latents = denoise(reference_model, sampler, torch.randn(2, 4, 8, 8), case["y"], cfg_scale=None)
    assert_close_to_reference(latents, case["sample"], rel=1e-4)
    with pytest.raises(ValueError, match="the diffusion loops are ddpm and ddim"):
        DiffusionLoop("unipc", sampler.diffusion)


@pytest.fixture(scope="module")
def pixel_checkpoint(tmp_path_factory):
    """A train.py checkpoint of a DiT on 16 px RGB pixels (--vae none): 3 channels, no autoencoder."""
    torch.manual_seed(0)
    model = DiT_models["DiT-S/8"](input_size=16, in_channels=3, num_classes=10)
    for param in model.parameters():
        if not param.any():
            param.data.normal_(0, 0.02)
    args = {"model": "DiT-S/8", "image_size": 16, "num_classes": 10, "class_dropout_prob": 0.1, "vae": "none", "vae_path": None}
    path = tmp_path_factory.mktemp("pixels") / "0000005.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": args}, path)
    return path, model.eval()


def test_a_pixel_space_checkpoint_writes_the_models_output(pixel_checkpoint, tmp_path):
    """--vae none from the checkpoint: the grid is the denoised pixels themselves, 16 px each."""
    from util.images import save_grid

    path, model = pixel_checkpoint
    out = tmp_path / "grid.png"
    try:
        sample.main(["--ckpt", str(path), "--num-sampling-steps", "2", "--out", str(out)])
    finally:
        configure_precision("fp32")
    torch.manual_seed(0)
    z = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        images = denoise(model, create_sampler(2, "ddpm"), z, torch.arange(8), cfg_scale=4.0)
    save_grid(images, tmp_path / "expected.png")
    assert Image.open(out).size == (4 * 18 + 2, 2 * 18 + 2)
    assert np.abs(pixels(out) - pixels(tmp_path / "expected.png")).max() <= 1


def test_a_latent_vae_for_a_pixel_checkpoint_is_one_sentence(pixel_checkpoint, tiny_vae_dir, tmp_path):
    path, _ = pixel_checkpoint
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--ckpt", str(path), "--vae", "ema", "--vae-path", str(tiny_vae_dir), "--out", str(tmp_path / "grid.png")])
    text = str(exit_info.value.code)
    assert text.startswith(f"sample.py: error: checkpoint {path} was trained with --vae none (now ema)") and "\n" not in text


@pytest.mark.slow
def test_any_autoencoder_folder_sets_the_channels_and_size(tmp_path):
    """A 2-channel AutoencoderKL that downsamples by 4 (from --vae-path): the DiT takes 2 channels
    at image size / 4, and the grid is decoded by that folder."""
    from diffusers.models import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8),
        layers_per_block=1, latent_channels=2, norm_num_groups=4, sample_size=32,
    ).save_pretrained(tmp_path / "vae")
    model = DiT_models["DiT-S/4"](input_size=8, in_channels=2, num_classes=10)
    path = tmp_path / "bare.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "grid.png"
    try:
        sample.main(["--model", "DiT-S/4", "--image-size", "32", "--num-classes", "10", "--ckpt", str(path),
                     "--vae-path", str(tmp_path / "vae"), "--num-sampling-steps", "2", "--out", str(out)])
    finally:
        configure_precision("fp32")
    assert Image.open(out).size == (4 * 34 + 2, 2 * 34 + 2)


@pytest.mark.slow
def test_a_checkpoint_damaged_after_it_was_written_is_refused_in_one_sentence(tiny_dit_ckpts, tiny_vae_dir, tmp_path):
    """The bytes of one EMA weight overwritten with NaN: without the checksum this samples an all-black grid."""
    from test_checkpoints import nan_over_tensor_bytes
    from util.checkpoints import save_checkpoint

    path, out = tmp_path / "0000010.pt", tmp_path / "grid.png"
    checkpoint = torch.load(tiny_dit_ckpts["training"], weights_only=True)
    save_checkpoint(checkpoint, str(path))
    nan_over_tensor_bytes(path, checkpoint["ema"]["blocks.0.attn.qkv.weight"])
    with pytest.raises(SystemExit) as exit_info:
        sample.main(tiny_args(dict(tiny_dit_ckpts, training=path), tiny_vae_dir, out))
    assert str(exit_info.value.code) == (
        f"sample.py: error: checkpoint {path}: its content does not match the checksum written with it "
        "(the file changed after it was saved); pass --ckpt PATH to another checkpoint"
    )
    assert not out.exists()


def test_weights_holding_nan_without_a_checksum_are_refused(tiny_dit_ckpts, tiny_vae_dir, tmp_path):
    """A checkpoint of the original's format (no checksum) with one NaN in an EMA weight: its
    grid would be all black; sample.py refuses it, naming the tensor and the count."""
    checkpoint = torch.load(tiny_dit_ckpts["training"], weights_only=True)
    checkpoint["ema"] = dict(checkpoint["ema"], **{"final_layer.linear.weight": checkpoint["ema"]["final_layer.linear.weight"].clone()})
    checkpoint["ema"]["final_layer.linear.weight"][0, :2] = float("nan")
    path, out = tmp_path / "0000010.pt", tmp_path / "grid.png"
    torch.save(checkpoint, path)
    with pytest.raises(SystemExit) as exit_info:
        sample.main(tiny_args(dict(tiny_dit_ckpts, training=path), tiny_vae_dir, out))
    assert str(exit_info.value.code) == (
        f"sample.py: error: the ema weights of {path} hold 2 NaN or inf value(s) in 1 tensor(s) (the first: "
        "final_layer.linear.weight), so every sample would be garbage; pass --ckpt PATH to other weights"
    )
    assert not out.exists()
