"""util/checkpoints.py: atomic writes with the umask's mode, one-sentence errors on a full or
read-only disk that keep the previous file, stale temporaries removed, safe reads, clear errors
on bad files."""
from __future__ import annotations

import argparse
import errno
import os

import numpy as np
import pytest
import torch

from conftest import make_read_only, tmpfs
from util import checkpoints as checkpoint
from util.checkpoints import load_checkpoint, model_weights, remove_stale_temporaries, save_checkpoint
from util.files import WriteError


def test_round_trip_and_no_temp_files_left(tmp_path):
    path = tmp_path / "ckpt" / "0000010.pt"
    state = {"model": {"w": torch.arange(4.0)}, "ema": {"w": torch.ones(4)}, "args": {"lr": 1e-4}, "step": 10}
    save_checkpoint(state, str(path))
    loaded = load_checkpoint(str(path))
    assert torch.equal(loaded["model"]["w"], state["model"]["w"]) and loaded["step"] == 10
    assert os.listdir(path.parent) == ["0000010.pt"]
    assert model_weights(loaded) is loaded["ema"]
    assert model_weights(loaded["model"]) is loaded["model"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"w": torch.zeros(2)}, str(path))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"w": Unpicklable()}, str(path))
    assert torch.equal(load_checkpoint(str(path))["w"], torch.zeros(2))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_truncated_file_gets_one_clear_sentence(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"w": torch.randn(1000)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"could not read checkpoint .*ckpt\.pt: the file is corrupt"):
        load_checkpoint(str(path))


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_get_one_clear_sentence(tmp_path, seed):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_checkpoint(str(path))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"args": argparse.Namespace(lr=1.0)}, path)  # not loadable with weights_only
    with pytest.raises(ValueError, match="holds more than tensors and plain values"):
        load_checkpoint(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))


def test_missing_entries_and_setting_differences():
    from util.resume import missing_entries, setting_differences

    assert missing_entries({"model": 1, "step": 2}, ("model", "ema", "step")) == ["ema"]
    assert missing_entries([1, 2], ("model",)) == ["model"]  # not a dict: lacks everything
    saved, now = {"image_size": 256, "global_batch_size": 8}, {"image_size": 256, "global_batch_size": 4}
    assert setting_differences(saved, now, ("image_size", "global_batch_size")) == ["--global-batch-size 8 (now 4)"]
    assert setting_differences(saved, saved, ("image_size", "global_batch_size")) == []


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_checkpoints_are_group_readable_as_the_umask_allows(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        save_checkpoint({"w": torch.zeros(2)}, str(tmp_path / "c.pt"))
    finally:
        os.umask(previous)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == mode


def failing_save(error: BaseException):
    def save(obj, f) -> None:
        f.write(b"x" * 1000)  # part of a checkpoint, as a real failure leaves
        raise error

    return save


@pytest.mark.parametrize(
    "error,message",
    [
        (OSError(errno.ENOSPC, "No space left on device"), r"the disk is full \(No space left on device\); free some space"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), r"the disk is full \(Disk quota exceeded\)"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), r"the disk is full \(torch.save could not write all bytes\)"),
        (OSError(errno.EROFS, "Read-only file system"), r"the folder is read-only or not writable \(Read-only file system\)"),
        (OSError(errno.EACCES, "Permission denied"), r"the folder is read-only or not writable \(Permission denied\)"),
    ],
)
def test_write_errors_are_one_sentence_and_lose_nothing(tmp_path, monkeypatch, error, message):
    earlier = tmp_path / "0000001.pt"
    save_checkpoint({"w": torch.ones(3)}, str(earlier))
    path = tmp_path / "0000002.pt"
    monkeypatch.setattr(checkpoint.torch, "save", failing_save(error))
    with pytest.raises(WriteError, match=rf"^cannot write checkpoint {path}: {message}"):
        save_checkpoint({"w": torch.zeros(3)}, str(path))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["0000001.pt"]  # the temporary is gone, the earlier file kept
    assert torch.equal(load_checkpoint(str(earlier))["w"], torch.ones(3))


@pytest.mark.parametrize(
    "code, kind",
    [(errno.ENOSPC, "full"), (errno.EDQUOT, "full"), (errno.EROFS, "read-only"), (errno.EACCES, "read-only"), (errno.EPERM, "read-only")],
)
def test_write_errors_are_told_apart_by_errno_whatever_the_text(code, kind):
    """The errno decides, not the OS's wording (which varies with the locale and the platform)."""
    from util.files import write_error_message

    message = write_error_message(OSError(code, "some localised text"), "f.pt")
    assert message is not None and (("the disk is full" in message) == (kind == "full"))
    assert write_error_message(OSError(errno.ENOENT, "No space left on device"), "f.pt") is None
    # torch.save's errno-less RuntimeError is the one case told by its text.
    assert "the disk is full" in write_error_message(RuntimeError("PytorchStreamWriter failed: file write failed"), "f.pt")


def test_other_errors_are_not_disguised(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint.torch, "save", failing_save(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="^something else$"):
        save_checkpoint({"w": torch.zeros(3)}, str(tmp_path / "c.pt"))
    assert os.listdir(tmp_path) == []


def test_a_really_full_disk(tmp_path):
    with tmpfs(tmp_path / "fs", "256k") as fs:
        save_checkpoint({"w": torch.ones(1000)}, str(fs / "0000001.pt"))
        with pytest.raises(WriteError, match=r"cannot write checkpoint .*0000002.pt: the disk is full"):
            save_checkpoint({"w": torch.zeros(100_000)}, str(fs / "0000002.pt"))  # 400 KB
        assert os.listdir(fs) == ["0000001.pt"]
        assert torch.equal(load_checkpoint(str(fs / "0000001.pt"))["w"], torch.ones(1000))


def test_a_really_read_only_folder(tmp_path):
    with tmpfs(tmp_path / "fs", "1m") as fs:
        save_checkpoint({"w": torch.ones(10)}, str(fs / "0000001.pt"))
        make_read_only(fs)
        with pytest.raises(WriteError, match=r"cannot write checkpoint .*0000002.pt: the folder is read-only or not writable"):
            save_checkpoint({"w": torch.zeros(10)}, str(fs / "0000002.pt"))
        assert os.listdir(fs) == ["0000001.pt"]
        assert torch.equal(load_checkpoint(str(fs / "0000001.pt"))["w"], torch.ones(10))


def test_stale_temporaries_are_removed(tmp_path):
    save_checkpoint({"w": torch.zeros(2)}, str(tmp_path / "0000005.pt"))
    for name in (".tmp-abc123.pt", ".tmp-x.pt"):
        (tmp_path / name).write_bytes(b"half a checkpoint")
    (tmp_path / ".tmp-notes.txt").write_text("not ours")
    removed = remove_stale_temporaries(str(tmp_path))
    assert [os.path.basename(p) for p in removed] == [".tmp-abc123.pt", ".tmp-x.pt"]
    assert sorted(os.listdir(tmp_path)) == [".tmp-notes.txt", "0000005.pt"]
    assert remove_stale_temporaries(str(tmp_path / "missing")) == []


def nan_over_tensor_bytes(path, tensor: torch.Tensor, count: int = 1024) -> None:
    """Overwrite the first `count` floats of `tensor`'s bytes inside the file with NaN, as a bad
    disk block or a damaged copy does (4 KB for 1024 floats); the zip structure stays intact."""
    data = bytearray(path.read_bytes())
    needle = tensor.reshape(-1)[:count].numpy().tobytes()
    assert data.count(needle) == 1, "the tensor's bytes must occur once in the file"
    start = data.find(needle)
    data[start : start + len(needle)] = np.full(count, np.nan, dtype=np.float32).tobytes()
    path.write_bytes(bytes(data))


def test_checkpoints_carry_a_checksum_of_their_content_that_loading_drops(tmp_path):
    from util.checkpoints import CHECKSUM_KEY, content_digest

    state = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "args": {"lr": 1e-4, "betas": (0.9, 0.999)}, "step": 3}
    save_checkpoint(state, str(tmp_path / "c.pt"))
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    assert list(raw) == ["model", "args", "step", CHECKSUM_KEY]
    assert raw[CHECKSUM_KEY].startswith("sha256:") and len(raw[CHECKSUM_KEY]) == len("sha256:") + 64
    loaded = load_checkpoint(str(tmp_path / "c.pt"))
    assert list(loaded) == ["model", "args", "step"] and torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert raw[CHECKSUM_KEY] == content_digest(loaded) == content_digest(state)
    save_checkpoint(raw, str(tmp_path / "again.pt"))  # a loaded file saved again gets its checksum anew
    assert torch.load(tmp_path / "again.pt", weights_only=True)[CHECKSUM_KEY] == raw[CHECKSUM_KEY]


def test_the_content_digest_tells_every_change_apart_and_nothing_else():
    from util.checkpoints import content_digest

    w = torch.arange(12.0).reshape(3, 4)
    base = content_digest({"w": w, "step": 1})
    assert content_digest({"w": w.clone(), "step": 1}) == base  # other memory, same content
    assert content_digest({"w": w.t().contiguous().t(), "step": 1}) == base  # non-contiguous layout
    changed = [
        {"w": w.double(), "step": 1}, {"w": w.reshape(4, 3), "step": 1}, {"w": w + (w == 5), "step": 1},
        {"w": w, "step": 2}, {"v": w, "step": 1}, {"step": 1, "w": w}, {"w": w, "step": "1"}, {"w": [w], "step": 1},
        {"w": (w,), "step": 1},
    ]
    digests = {content_digest(value) for value in changed}
    assert base not in digests and len(digests) == len(changed)


def test_a_damaged_weight_inside_the_file_fails_its_checksum_in_one_sentence(tmp_path):
    from util.checkpoints import ChecksumError

    path = tmp_path / "0000003.pt"
    ema = {"w": torch.randn(4096)}
    save_checkpoint({"model": {"w": torch.randn(4096)}, "ema": ema, "step": 3}, str(path))
    nan_over_tensor_bytes(path, ema["w"])
    # torch's zip reader checks no CRC: the file loads, with 1024 NaNs in the EMA weight.
    assert torch.load(path, weights_only=True)["ema"]["w"].isnan().sum() == 1024
    with pytest.raises(ChecksumError) as error:
        load_checkpoint(str(path))
    assert str(error.value) == (
        f"checkpoint {path}: its content does not match the checksum written with it (the file changed after it was saved); "
        "use another checkpoint instead"
    )
    assert error.value.with_flag("--ckpt PATH").endswith("saved); pass --ckpt PATH to another checkpoint")


def test_files_without_a_checksum_load_as_before(tmp_path):
    state = {"model": {"w": torch.ones(3)}, "ema": {"w": torch.zeros(3)}, "args": {"lr": 1e-4}}
    torch.save(state, tmp_path / "original.pt")  # the original train.py's format
    torch.save(state["ema"], tmp_path / "bare.pt")  # a released or exported state dict
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # torch < 1.6's format, not mappable
    for name in ("original.pt", "legacy.pt"):
        loaded = load_checkpoint(str(tmp_path / name))
        assert list(loaded) == list(state) and torch.equal(loaded["ema"]["w"], state["ema"]["w"])
    assert list(load_checkpoint(str(tmp_path / "bare.pt"))) == ["w"]


def test_checkpoint_errors_cross_processes_whole():
    import pickle

    from util.checkpoints import CheckpointError, ChecksumError

    for error in (CheckpointError("x failed", remedy="delete it", instead="a checkpoint"), ChecksumError("y", instead="another")):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and copy.with_flag("--resume PATH") == error.with_flag("--resume PATH")
