"""sample_ddp.py: the .npz format, identical sets over 1 or 2 gloo processes, resuming, seeding."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample_ddp
from conftest import REPO, unconditional_checkpoints
from models import DiT_models
from util.sampling import create_sampler, denoise
from util.vae import decode, load_vae

NUM_IMAGES = 7
STEPS = 5
MICRO_BATCH = 4


def ddp_args(ckpts: dict, vae_dir, sample_dir, per_proc_batch_size: int, *extra: str) -> list[str]:
    return [
        "--model", ckpts["model"], "--image-size", str(ckpts["image_size"]), "--num-classes", str(ckpts["num_classes"]),
        "--ckpt", str(ckpts["training"]), "--vae-path", str(vae_dir), "--num-sampling-steps", str(STEPS),
        "--num-fid-samples", str(NUM_IMAGES), "--micro-batch-size", str(MICRO_BATCH),
        "--per-proc-batch-size", str(per_proc_batch_size), "--sample-dir", str(sample_dir), *extra,
    ]


def run(launcher: list[str], args: list[str]) -> subprocess.CompletedProcess:
    # The thread count decides float rounding on a CPU: every run here uses one thread.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([*launcher, str(REPO / "sample_ddp.py"), *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def set_paths(sample_dir) -> tuple[str, str]:
    (folder,) = [entry.path for entry in os.scandir(sample_dir) if entry.is_dir()]
    return folder, folder + ".npz"


@pytest.fixture(scope="module")
def one_process(tiny_dit_ckpts, tiny_vae_dir, tmp_path_factory):
    """Plain python, one process, 5 images per turn: blocks of 4 images, the last one padded."""
    sample_dir = tmp_path_factory.mktemp("one_process")
    run([sys.executable], ddp_args(tiny_dit_ckpts, tiny_vae_dir, sample_dir, 5))
    return set_paths(sample_dir)


@pytest.mark.slow
def test_npz_holds_exactly_the_pngs(one_process, tiny_vae_dir):
    folder, npz = one_process
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (NUM_IMAGES, 64, 64, 3) and arr.dtype == np.uint8
    assert sorted(name for name in os.listdir(folder) if name.endswith(".png")) == [f"{i:06d}.png" for i in range(NUM_IMAGES)]
    for i in range(NUM_IMAGES):
        np.testing.assert_array_equal(arr[i], np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png"))))
    # Every image has its own noise and label.
    assert len({arr[i].tobytes() for i in range(NUM_IMAGES)}) == NUM_IMAGES
    assert os.path.basename(folder) == f"DiT-S-8-0000010-size-64-vae-{tiny_vae_dir.name}-cfg-1.5-seed-0"


@pytest.mark.slow
def test_two_gloo_processes_with_another_batch_size_give_the_same_file(one_process, tiny_dit_ckpts, tiny_vae_dir, tmp_path):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run(launcher, ddp_args(tiny_dit_ckpts, tiny_vae_dir, tmp_path, 3))
    _, npz = set_paths(tmp_path)
    with open(npz, "rb") as mine, open(one_process[1], "rb") as reference:
        assert mine.read() == reference.read()


@pytest.mark.slow
def test_rerun_redoes_only_missing_and_truncated_pngs(one_process, tiny_dit_ckpts, tiny_vae_dir, tmp_path):
    sample_dir = tmp_path / "samples"
    folder = sample_dir / os.path.basename(one_process[0])
    shutil.copytree(one_process[0], folder)
    os.remove(folder / "000001.png")
    os.remove(folder / "000006.png")
    png = (folder / "000004.png").read_bytes()
    (folder / "000004.png").write_bytes(png[: len(png) // 2])
    kept = {name: (folder / name).stat().st_mtime_ns for name in ("000000.png", "000002.png", "000003.png", "000005.png")}

    run([sys.executable], ddp_args(tiny_dit_ckpts, tiny_vae_dir, sample_dir, 2))
    with open(f"{folder}.npz", "rb") as mine, open(one_process[1], "rb") as reference:
        assert mine.read() == reference.read()
    assert {name: (folder / name).stat().st_mtime_ns for name in kept} == kept, "valid PNGs were sampled again"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_model_call_has_one_shape_and_image_i_its_own_row(tiny_dit_ckpts, tiny_vae_dir, tmp_path, monkeypatch):
    """Float rounding may depend on the batch shape and on the row (kernel tiling): image i is
    always sampled at row i % micro-batch of a batch of micro-batch images."""
    calls = []

    def recording_denoise(model, diffusion, z, y, *args, **kwargs):
        calls.append((z.clone(), y.clone()))
        return denoise(model, diffusion, z, y, *args, **kwargs)

    monkeypatch.setattr(sample_ddp, "denoise", recording_denoise)
    sample_ddp.main(ddp_args(tiny_dit_ckpts, tiny_vae_dir, tmp_path, 3))
    assert len(calls) == 2  # blocks [0, 4) and [4, 7) + one padding row
    for block, (z, y) in enumerate(calls):
        assert z.shape == (MICRO_BATCH, 4, 8, 8)
        for row in range(MICRO_BATCH):
            index = block * MICRO_BATCH + row
            if index < NUM_IMAGES:
                generator = np.random.default_rng([0, index])
                np.testing.assert_array_equal(z[row].numpy(), generator.standard_normal((4, 8, 8), dtype=np.float32))
                assert y[row] == generator.integers(10)


@pytest.mark.slow
def test_image_i_comes_from_its_own_generator(one_process, tiny_dit_ckpts, tiny_vae_dir):
    """Image 5 rebuilt alone from numpy's generator seeded with [global_seed, 5], as documented:
    latent, then label, then one noise draw per step; guidance 1.5 on the first 3 eps channels."""
    generator = np.random.default_rng([0, 5])
    z = torch.from_numpy(generator.standard_normal((1, 4, 8, 8), dtype=np.float32))
    y = torch.tensor([int(generator.integers(10))])
    model = DiT_models["DiT-S/8"](input_size=8, num_classes=10)
    model.load_state_dict(torch.load(tiny_dit_ckpts["bare"], weights_only=True))
    model.eval()

    def noise_fn(x):
        noise = torch.from_numpy(generator.standard_normal((1, 4, 8, 8), dtype=np.float32))
        return torch.cat([noise, noise])

    x = torch.cat([z, z])
    labels = torch.cat([y, torch.tensor([10])])
    latents = create_sampler(STEPS, "ddpm").diffusion.p_sample_loop(
        model.forward_with_cfg, x.shape, x, clip_denoised=False, model_kwargs=dict(y=labels, cfg_scale=1.5), noise_fn=noise_fn
    )
    image = decode(load_vae("ema", torch.device("cpu"), str(tiny_vae_dir)), latents[:1])
    expected = torch.clamp(127.5 * image + 128.0, 0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    found = np.load(one_process[1])["arr_0"][5]
    # Another batch shape, so float noise may move a few pixels by one level.
    assert np.abs(found.astype(int) - expected).max() <= 1


@pytest.mark.slow
def test_folder_of_other_settings_is_refused_and_kept(one_process, tiny_dit_ckpts, tiny_vae_dir, tmp_path):
    sample_dir = tmp_path / "samples"
    folder = sample_dir / os.path.basename(one_process[0])
    shutil.copytree(one_process[0], folder)
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    with pytest.raises(SystemExit) as exit_info:
        sample_ddp.main(ddp_args(tiny_dit_ckpts, tiny_vae_dir, sample_dir, 4, "--num-sampling-steps", "6"))
    message = str(exit_info.value.code)
    assert message.startswith("sample_ddp.py: error: ") and "\n" not in message
    assert "num_sampling_steps 5 there, 6 now" in message
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--num-fid-samples", "0"], "--num-fid-samples must be at least 1, got 0"),
        (["--global-seed", "-1"], "--global-seed must be non-negative"),
        (["--image-size", "128"], "pos_embed expected (1, 4, 384) found (1, 1, 384)"),
        (["--cfg-scale", "nan"], "--cfg-scale must be a finite number, got nan"),
        (["--num-sampling-steps", "0"], "--num-sampling-steps must lie in [1, 1000]"),
        (["--per-proc-batch-size", "0"], "--per-proc-batch-size must be at least 1, got 0"),
        (["--num-classes", "0"], "--num-classes must be at least 1, got 0"),
    ],
)
def test_bad_input_fails_before_creating_anything(tiny_dit_ckpts, tiny_vae_dir, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        sample_ddp.main(ddp_args(tiny_dit_ckpts, tiny_vae_dir, tmp_path / "samples", 4, *extra))
    assert not (tmp_path / "samples").exists()


def test_deal_blocks_covers_every_missing_index_once():
    missing = [0, 1, 2, 5, 8, 9, 13, 20]
    shares = [sample_ddp.deal_blocks(missing, 4, 1, rank, 3) for rank in range(3)]
    dealt = [index for share in shares for block in share for index in block]
    assert sorted(dealt) == missing
    for share in shares:
        for block in share:
            assert len({index // 4 for index in block}) == 1, "a model call mixes blocks"


def test_sample_dir_that_is_a_file_is_refused(tiny_dit_ckpts, tiny_vae_dir, tmp_path):
    (tmp_path / "samples").write_text("x")
    expected = {
        tmp_path / "samples": f"--sample-dir {tmp_path / 'samples'} is a file, not a folder",
        tmp_path / "samples" / "deeper": (
            f"--sample-dir {tmp_path / 'samples' / 'deeper'} cannot be made: {tmp_path / 'samples'} is a file, not a folder"
        ),
    }
    for sample_dir, message in expected.items():
        with pytest.raises(SystemExit) as exit_info:
            sample_ddp.main(ddp_args(tiny_dit_ckpts, tiny_vae_dir, sample_dir, 4))
        assert str(exit_info.value.code) == f"sample_ddp.py: error: {message}"
    assert (tmp_path / "samples").read_text() == "x"


@pytest.mark.slow
def test_ddpm_folders_record_no_spacing(one_process):
    """ddpm and ddim ignore --timestep-spacing: their recipe leaves it out (None), so folders
    sampled before the flag existed are still resumed."""
    with open(os.path.join(one_process[0], sample_ddp.SETTINGS_FILE)) as f:
        assert json.load(f)["timestep_spacing"] is None


@pytest.fixture(scope="module")
def sde_one_process(tiny_dit_ckpts, tiny_vae_dir, tmp_path_factory):
    """The stochastic solver (noise at every step, from each image's generator), 5 images per turn."""
    sample_dir = tmp_path_factory.mktemp("sde_one_process")
    run([sys.executable], ddp_args(tiny_dit_ckpts, tiny_vae_dir, sample_dir, 5, "--sampler", "dpm-solver++-sde"))
    return set_paths(sample_dir)


@pytest.mark.slow
def test_solver_sets_are_identical_for_any_batch_size_and_process_count(sde_one_process, one_process, tiny_dit_ckpts, tiny_vae_dir, tmp_path):
    extra = ("--sampler", "dpm-solver++-sde")
    run([sys.executable], ddp_args(tiny_dit_ckpts, tiny_vae_dir, tmp_path / "one", 2, *extra))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run(launcher, ddp_args(tiny_dit_ckpts, tiny_vae_dir, tmp_path / "two", 3, *extra))
    reference = open(sde_one_process[1], "rb").read()
    for sample_dir in ("one", "two"):
        with open(set_paths(tmp_path / sample_dir)[1], "rb") as f:
            assert f.read() == reference
    # The solver really sampled: another set than ddpm's from the same seeds.
    assert np.abs(np.load(sde_one_process[1])["arr_0"].astype(int) - np.load(one_process[1])["arr_0"]).mean() > 1


def test_read_only_sample_dir_is_refused_before_loading(tiny_dit_ckpts, tiny_vae_dir, tmp_path, monkeypatch):
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_access = os.access
    # As root a chmod does not stop writing; os.access is what the check asks.
    monkeypatch.setattr(os, "access", lambda path, mode: path != str(read_only) and real_access(path, mode))
    monkeypatch.setattr(sample_ddp, "load_model", lambda *args: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_info:
        sample_ddp.main(ddp_args(tiny_dit_ckpts, tiny_vae_dir, read_only / "samples", 4))
    assert str(exit_info.value.code) == (
        f"sample_ddp.py: error: --sample-dir {read_only / 'samples'} is not writable ({read_only} is read-only or lacks write permission)"
    )
    assert os.listdir(read_only) == []


@pytest.mark.slow
def test_a_checkpoint_without_null_label_gives_one_unguided_set(tiny_vae_dir, tmp_path):
    """train.py --num-classes 1 --class-dropout-prob 0 weights: sampled unguided, with one line
    (from rank 0 only) when --cfg-scale asked for guidance; the recipe and the folder name
    record the scale in effect, 1, so the set is the same file for any process count and
    --cfg-scale, and a folder of it is resumed whatever --cfg-scale is passed."""
    ckpts = unconditional_checkpoints(tmp_path)
    one = run([sys.executable], ddp_args(ckpts, tiny_vae_dir, tmp_path / "one", 5, "--cfg-scale", "1"))
    assert "guidance is off" not in one.stderr
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = run(launcher, ddp_args(ckpts, tiny_vae_dir, tmp_path / "two", 3))  # default --cfg-scale 1.5
    assert two.stderr.count("--cfg-scale 1.5: guidance is off because the checkpoint has no null label") == 1
    folder, npz = set_paths(tmp_path / "one")
    assert os.path.basename(folder) == f"DiT-S-8-0000010-size-64-vae-{tiny_vae_dir.name}-cfg-1.0-seed-0"
    assert os.path.basename(set_paths(tmp_path / "two")[0]) == os.path.basename(folder)
    with open(npz, "rb") as mine, open(set_paths(tmp_path / "two")[1], "rb") as other:
        assert mine.read() == other.read()
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (NUM_IMAGES, 64, 64, 3) and len({image.tobytes() for image in arr}) == NUM_IMAGES
    with open(os.path.join(folder, sample_ddp.SETTINGS_FILE)) as f:
        assert json.load(f)["cfg_scale"] == 1.0

    kept = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in os.listdir(folder) if name.endswith(".png")}
    run([sys.executable], ddp_args(ckpts, tiny_vae_dir, tmp_path / "one", 5, "--cfg-scale", "4"))
    assert {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in kept} == kept, "valid PNGs were sampled again"


@pytest.mark.slow
def test_npz_holds_each_images_label_as_arr_1(one_process):
    """arr_1: image i's label, the one drawn from its own generator after its latent; the
    resumed and 2-process runs compare the whole file, arr_1 included, with this one."""
    labels = np.load(one_process[1])["arr_1"]
    expected = []
    for index in range(NUM_IMAGES):
        generator = np.random.default_rng([0, index])
        generator.standard_normal((4, 8, 8), dtype=np.float32)
        expected.append(generator.integers(10))
    assert labels.dtype == np.int64 and labels.tolist() == expected


@pytest.mark.slow
def test_a_training_checkpoint_needs_no_model_flags(one_process, tiny_dit_ckpts, tiny_vae_dir, tmp_path):
    """--model, --image-size and --num-classes from the checkpoint's args give the same set."""
    folder = tmp_path / "0000010.pt"
    checkpoint = torch.load(tiny_dit_ckpts["training"], weights_only=True)
    torch.save(dict(checkpoint, args={"model": "DiT-S/8", "image_size": 64, "num_classes": 10, "class_dropout_prob": 0.1}), folder)
    short = ddp_args(dict(tiny_dit_ckpts, training=folder), tiny_vae_dir, tmp_path / "samples", 5)[6:]
    assert short[0] == "--ckpt"
    sample_ddp.main(short)
    _, npz = set_paths(tmp_path / "samples")
    with open(npz, "rb") as mine, open(one_process[1], "rb") as reference:
        assert mine.read() == reference.read()


def test_raw_weights_go_to_their_own_folder(tiny_dit_ckpts):
    args, _ = sample_ddp.parse_args(["--ckpt", str(tiny_dit_ckpts["training"]), "--weights", "raw"])
    assert "-0000010-raw-size-" in sample_ddp.sample_folder(args)
    assert sample_ddp.recipe(args)["weights"] == "raw"


@pytest.mark.slow
def test_other_weights_behind_the_same_path_are_refused_and_the_same_weights_elsewhere_taken(one_process, tiny_dit_ckpts, tiny_vae_dir, tmp_path):
    from conftest import make_tiny_dit
    from util.checkpoints import content_digest

    sample_dir = tmp_path / "samples"
    folder = sample_dir / os.path.basename(one_process[0])
    shutil.copytree(one_process[0], folder)
    settings = json.loads((folder / sample_ddp.SETTINGS_FILE).read_text())
    weights = torch.load(tiny_dit_ckpts["training"], weights_only=True)["ema"]
    assert settings[sample_ddp.FINGERPRINT] == content_digest(weights)  # the EMA weights it sampled, by content

    moved = tmp_path / "staged" / "0000010.pt"  # the same file copied elsewhere: same folder name, same content
    moved.parent.mkdir()
    shutil.copy(tiny_dit_ckpts["training"], moved)
    sample_ddp.main(ddp_args(dict(tiny_dit_ckpts, training=moved), tiny_vae_dir, sample_dir, 4, "--num-fid-samples", "8"))
    assert len(np.load(f"{folder}.npz")["arr_0"]) == 8

    other = make_tiny_dit(seed=1)
    torch.save({"model": other, "ema": other, "args": {"model": "DiT-S/8", "image_size": 64}}, moved)  # other weights, same path
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    with pytest.raises(SystemExit) as exit_info:
        sample_ddp.main(ddp_args(dict(tiny_dit_ckpts, training=moved), tiny_vae_dir, sample_dir, 4, "--num-fid-samples", "9"))
    assert str(exit_info.value.code) == (
        f"sample_ddp.py: error: {folder} holds samples made with other weights (weights of content {content_digest(weights)} there, "
        f"{content_digest(other)} now in {moved}); pass another --sample-dir or remove the folder"
    )
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before


def test_a_disk_that_turns_read_only_is_one_sentence_naming_the_file(tiny_dit_ckpts, tiny_vae_dir, tmp_path, monkeypatch):
    import errno

    def read_only(self, f, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Image.Image, "save", read_only)
    with pytest.raises(SystemExit) as exit_info:
        sample_ddp.main(ddp_args(tiny_dit_ckpts, tiny_vae_dir, tmp_path / "samples", 4, "--num-fid-samples", "1"))
    folder, _ = set_paths(tmp_path / "samples")
    assert str(exit_info.value.code) == (
        f"sample_ddp.py: error: cannot write {folder}/000000.png: the folder is read-only or not writable (Read-only file system)"
    )


@pytest.mark.slow
def test_a_really_full_disk_is_one_sentence_naming_the_file(tiny_dit_ckpts, tiny_vae_dir, tmp_path):
    from conftest import tmpfs

    with tmpfs(tmp_path / "fs", "64k") as fs:
        with pytest.raises(SystemExit) as exit_info:
            sample_ddp.main(ddp_args(tiny_dit_ckpts, tiny_vae_dir, fs, 4))
        message = str(exit_info.value.code)
    assert re.fullmatch(
        rf"sample_ddp\.py: error: cannot write {re.escape(str(fs))}/\S+(\.png|\.npz): the disk is full \(No space left on device\); "
        "free some space and run again", message,
    ), message
