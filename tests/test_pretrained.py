"""util/pretrained.py: find_model against a loopback HTTP server (fetch, resume, corrupt files,
offline), diffusers folders and the Hugging Face hub as sources (with util/diffusers_format.py's
mapping between diffusers' DiT layout and the original's), and load_weights for every source."""
from __future__ import annotations

import io
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from conftest import closed_port_url, load_golden_model, make_tiny_dit
from models import DiT, DiT_models
from util import pretrained
from util.diffusers_format import diffusers_to_official, official_to_diffusers

# A stand-in for a released checkpoint: DiT-S/8 for a latent of 8 with the default 1000 classes.
NAME = "DiT-S-8-64x64.pt"


class FileHandler(BaseHTTPRequestHandler):
    """GET /<name> of the server's files; honours `Range: bytes=N-` when the server allows
    ranges, and sends only half of the body of the first `cuts` responses."""

    def do_GET(self) -> None:
        server = self.server
        range_header = self.headers.get("Range")
        server.requests.append(range_header)
        data = server.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        start = int(range_header.removeprefix("bytes=").rstrip("-")) if range_header and server.ranges else 0
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cuts > 0:
            server.cuts -= 1
            body = body[: len(body) // 2]
            self.close_connection = True
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FileHandler)
    httpd.files, httpd.requests, httpd.ranges, httpd.cuts = {}, [], True, 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/models"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def released() -> tuple[dict, bytes]:
    state_dict = make_tiny_dit(num_classes=1000)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return state_dict, buffer.getvalue()


@pytest.fixture
def workdir(tmp_path, monkeypatch, server):
    """Run in an empty folder, with NAME registered as a released checkpoint served by `server`."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(pretrained.PRETRAINED_MODELS, NAME, ("DiT-S/8", 8))
    monkeypatch.setenv(pretrained.BASE_URL_ENV, server.url)
    return tmp_path


def serve(server, data: bytes) -> None:
    server.files[f"models/{NAME}"] = data


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_default_address_is_the_official_one(monkeypatch):
    monkeypatch.delenv(pretrained.BASE_URL_ENV, raising=False)
    assert pretrained.pretrained_url("DiT-XL-2-256x256.pt") == "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
    assert set(pretrained.PRETRAINED_MODELS) == {"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"}


def test_downloads_once_into_pretrained_models(workdir, server, released):
    state_dict, data = released
    serve(server, data)
    assert_same_weights(pretrained.find_model(NAME), state_dict)
    path = workdir / "pretrained_models" / NAME
    assert path.read_bytes() == data
    assert sorted(os.listdir(path.parent)) == [NAME]  # no .part left behind
    assert server.requests == [None]

    assert_same_weights(pretrained.find_model(NAME), state_dict)
    assert server.requests == [None], "a present file must not be downloaded again"


def test_cut_off_transfer_is_resumed_with_a_range_request(workdir, server, released):
    state_dict, data = released
    serve(server, data)
    server.cuts = 1
    assert_same_weights(pretrained.find_model(NAME), state_dict)
    assert server.requests == [None, f"bytes={len(data) // 2}-"]
    assert (workdir / "pretrained_models" / NAME).read_bytes() == data


def test_partial_file_of_an_earlier_run_is_resumed(workdir, server, released):
    state_dict, data = released
    serve(server, data)
    (workdir / "pretrained_models").mkdir()
    (workdir / "pretrained_models" / f"{NAME}.part").write_bytes(data[:1000])
    assert_same_weights(pretrained.find_model(NAME), state_dict)
    assert server.requests == ["bytes=1000-"]


def test_server_without_ranges_starts_over(workdir, server, released):
    state_dict, data = released
    serve(server, data)
    server.ranges = False
    (workdir / "pretrained_models").mkdir()
    (workdir / "pretrained_models" / f"{NAME}.part").write_bytes(b"x" * 1000)
    assert_same_weights(pretrained.find_model(NAME), state_dict)
    assert (workdir / "pretrained_models" / NAME).read_bytes() == data


@pytest.mark.parametrize("content", ["garbage", "wrong model"])
def test_corrupt_download_is_set_aside_with_a_clear_message(workdir, server, tiny_dit_ckpts, content):
    # "wrong model": a valid checkpoint with 10 classes where the released model has 1000.
    garbage = np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    data = garbage if content == "garbage" else tiny_dit_ckpts["bare"].read_bytes()
    serve(server, data)
    with pytest.raises(ValueError) as error:
        pretrained.find_model(NAME)
    message = str(error.value)
    assert f"{server.url}/{NAME}" in message and "or use a local checkpoint instead" in message
    if content == "wrong model":
        assert "y_embedder.embedding_table.weight expected (1001, 384) found (11, 384)" in message
    folder = workdir / "pretrained_models"
    assert sorted(os.listdir(folder)) == [f"{NAME}.corrupt"]
    assert (folder / f"{NAME}.corrupt").read_bytes() == data


def test_corrupt_file_already_in_place_is_named(workdir, server):
    (workdir / "pretrained_models").mkdir()
    (workdir / "pretrained_models" / NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"delete pretrained_models/{NAME} to download it again"):
        pretrained.find_model(NAME)
    assert server.requests == []


def test_offline_gives_one_sentence_naming_the_address_and_the_local_path(workdir, monkeypatch):
    url = closed_port_url()
    monkeypatch.setenv(pretrained.BASE_URL_ENV, url)
    with pytest.raises(pretrained.WeightsError) as error:
        pretrained.find_model(NAME)
    message = str(error.value)
    assert "\n" not in message
    assert f"could not download {url}/{NAME}" in message
    assert f"put the file at {os.path.join('pretrained_models', NAME)}" in message
    assert "or use a local checkpoint instead" in message
    assert not (workdir / "pretrained_models" / NAME).exists()


def test_http_error_names_the_status(workdir, server):
    with pytest.raises(pretrained.WeightsError, match=f"could not download {server.url}/{NAME} \\(HTTP Error 404"):
        pretrained.find_model(NAME)


def test_local_checkpoint_gives_its_ema_weights(tiny_dit_ckpts):
    ema = torch.load(tiny_dit_ckpts["bare"], weights_only=True)
    assert_same_weights(pretrained.find_model(str(tiny_dit_ckpts["training"])), ema)
    assert_same_weights(pretrained.find_model(str(tiny_dit_ckpts["bare"])), ema)


def test_missing_local_checkpoint(tmp_path):
    with pytest.raises(pretrained.WeightsError, match="does not exist; use a checkpoint file or diffusers DiT folder"):
        pretrained.find_model(str(tmp_path / "nope.pt"))


# ---------------------------------------------------------------- diffusers layout and the hub

@pytest.fixture(scope="module")
def golden():
    """The reference's tiny DiT (official keys, real sin-cos pos_embed) and its inputs."""
    return load_golden_model("model_tiny")


def diffusers_dit(config: dict):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=config["num_heads"], attention_head_dim=config["hidden_size"] // config["num_heads"],
        in_channels=config["in_channels"], out_channels=2 * config["in_channels"], num_layers=config["depth"],
        sample_size=config["input_size"], patch_size=config["patch_size"], num_embeds_ada_norm=config["num_classes"],
    )


def save_as_diffusers(golden, folder, safe_serialization: bool = True):
    model, data = golden
    transformer = diffusers_dit(data["config"])
    transformer.load_state_dict(official_to_diffusers(model.state_dict()), strict=True)
    transformer.save_pretrained(folder, safe_serialization=safe_serialization)
    return transformer


def test_mapping_covers_diffusers_dit_and_stock_diffusers_differs_only_in_the_timestep_shift(golden):
    """Every key and shape of diffusers' DiT is filled (strict load); its forward equals ours
    once its timestep embedding uses DiT's frequency shift 0, and differs with its stock shift 1."""
    model, data = golden
    transformer = diffusers_dit(data["config"]).eval()
    transformer.load_state_dict(official_to_diffusers(model.state_dict()), strict=True)
    with torch.no_grad():
        ours = model(data["x"], data["t"], data["y"])
        stock = transformer(data["x"], timestep=data["t"], class_labels=data["y"]).sample
        for module in transformer.modules():
            if hasattr(module, "downscale_freq_shift"):
                module.downscale_freq_shift = 0
        shifted = transformer(data["x"], timestep=data["t"], class_labels=data["y"]).sample
    assert torch.allclose(shifted, ours, atol=1e-5 * ours.abs().max().item())
    assert (stock - ours).abs().max() > 1e-2 * ours.abs().max()


def test_round_trip_is_exact(golden):
    model, data = golden
    state_dict = model.state_dict()
    config = dict(diffusers_dit(data["config"]).config)
    back = diffusers_to_official(official_to_diffusers(state_dict), config)
    assert_same_weights(back, state_dict)  # pos_embed too: the same float64 sin-cos table


@pytest.mark.parametrize("layout", ["safetensors", "bin", "pipeline"])
def test_diffusers_folder_loads_strictly_with_bitwise_equal_outputs(golden, tmp_path, layout):
    model, data = golden
    folder = tmp_path / "transformer" if layout == "pipeline" else tmp_path / "dit"
    save_as_diffusers(golden, folder, safe_serialization=layout != "bin")
    state_dict = pretrained.find_model(str(tmp_path if layout == "pipeline" else folder))
    loaded = DiT(**data["config"]).eval()
    loaded.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        assert torch.equal(loaded(data["x"], data["t"], data["y"]), model(data["x"], data["t"], data["y"]))


def test_folders_that_are_not_a_diffusers_dit_fail_in_one_sentence(golden, tmp_path):
    with pytest.raises(ValueError, match=r"is a folder but not a diffusers DiT \(config.json with"):
        pretrained.find_model(str(tmp_path))
    folder = tmp_path / "dit"
    save_as_diffusers(golden, folder)
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    weights["transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"] += 1
    save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError) as error:
        pretrained.find_model(str(folder))
    assert str(error.value) == f"{folder} is not a DiT in diffusers' layout: block 1's copy of t_embedder.mlp.0 differs from block 0's, which a DiT never has"


class FakeHub:
    """hf_hub_download served from local folders {repo: folder}; records what was asked."""

    def __init__(self, repos: dict):
        self.repos, self.requests = repos, []

    def __call__(self, repo_id, filename, subfolder=None, **kwargs):
        from huggingface_hub.errors import EntryNotFoundError

        self.requests.append((repo_id, subfolder, filename))
        path = self.repos[repo_id] / subfolder / filename
        if not path.exists():
            raise EntryNotFoundError(f"{filename} is not in {repo_id}")
        return str(path)


def test_hub_name_loads_the_transformer_subfolder_and_falls_back_to_the_bin(golden, tmp_path, monkeypatch):
    import huggingface_hub

    save_as_diffusers(golden, tmp_path / "repo" / "transformer", safe_serialization=False)
    hub = FakeHub({"facebook/DiT-tiny": tmp_path / "repo"})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    assert_same_weights(pretrained.find_model("hf:facebook/DiT-tiny"), golden[0].state_dict())
    assert [name for *_, name in hub.requests] == ["config.json", *pretrained.WEIGHT_FILES]
    assert {subfolder for _, subfolder, _ in hub.requests} == {"transformer"}


@pytest.mark.slow
def test_hub_is_the_fallback_when_the_original_address_fails(workdir, monkeypatch, tmp_path):
    import huggingface_hub

    state_dict = make_tiny_dit(num_classes=1000)
    model = DiT_models["DiT-S/8"](input_size=8)
    model.load_state_dict(state_dict)
    config = dict(num_heads=6, hidden_size=384, in_channels=4, depth=12, input_size=8, patch_size=8, num_classes=1000)
    save_as_diffusers((model, {"config": config}), tmp_path / "repo" / "transformer")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", FakeHub({"facebook/DiT-S-8-64": tmp_path / "repo"}))
    monkeypatch.setitem(pretrained.HUB_REPOS, NAME, "facebook/DiT-S-8-64")
    monkeypatch.setenv(pretrained.BASE_URL_ENV, closed_port_url())
    assert_same_weights(pretrained.find_model(NAME), state_dict)


def test_offline_with_the_hub_fallback_gives_one_sentence(workdir, monkeypatch):
    """Real huggingface_hub, offline (tests set HF_HUB_OFFLINE) and a repo not in the cache."""
    url = closed_port_url()
    monkeypatch.setenv(pretrained.BASE_URL_ENV, url)
    monkeypatch.setitem(pretrained.HUB_REPOS, NAME, "nobody/not-cached-dit")
    with pytest.raises(pretrained.WeightsError) as error:
        pretrained.find_model(NAME)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"could not download {url}/{NAME} (") and "nor hf:nobody/not-cached-dit from the Hugging Face hub" in message
    assert "HF_ENDPOINT" in message and "or use a local checkpoint instead" in message
    with pytest.raises(pretrained.WeightsError, match=r"^nobody/not-cached-dit/transformer is not in the Hugging Face cache and the hub at \S+ could not be reached"):
        pretrained.find_model("hf:nobody/not-cached-dit")


# ---------------------------------------------------------------- one loader for every source

def test_load_weights_takes_every_source(workdir, server, released, tiny_dit_ckpts, golden, tmp_path, monkeypatch):
    """A released name (from the loopback server), a train.py checkpoint file, a bare file, a
    state dict, a diffusers folder and an hf: name all come through load_weights."""
    import huggingface_hub

    state_dict, data = released
    serve(server, data)
    assert_same_weights(pretrained.load_weights(NAME).ema, state_dict)

    training = torch.load(tiny_dit_ckpts["training"], weights_only=True)
    from_file = pretrained.load_weights(str(tiny_dit_ckpts["training"]))
    assert_same_weights(from_file.ema, training["ema"])
    assert_same_weights(from_file.select("raw"), training["model"])
    assert from_file.args == {"model": "DiT-S/8", "image_size": 64}
    bare = pretrained.load_weights(str(tiny_dit_ckpts["bare"]))
    assert bare.raw is None and bare.args == {}
    assert_same_weights(pretrained.load_weights(training).select("raw"), training["model"])
    assert_same_weights(pretrained.load_weights(training["ema"]).ema, training["ema"])

    save_as_diffusers(golden, tmp_path / "repo" / "transformer")
    assert_same_weights(pretrained.load_weights(str(tmp_path / "repo")).ema, golden[0].state_dict())
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", FakeHub({"someone/tiny": tmp_path / "repo"}))
    assert_same_weights(pretrained.load_weights("hf:someone/tiny").ema, golden[0].state_dict())


def test_raw_weights_of_a_file_without_a_raw_copy_is_one_sentence(tiny_dit_ckpts):
    bare = pretrained.load_weights(str(tiny_dit_ckpts["bare"]))
    with pytest.raises(pretrained.WeightsError, match="holds one set of weights, not a training checkpoint's raw copy"):
        bare.select("raw")


def test_weights_errors_name_no_flag_and_take_the_scripts_flag(tmp_path):
    with pytest.raises(pretrained.WeightsError) as error:
        pretrained.load_weights(str(tmp_path / "nope.pt"))
    assert "--" not in str(error.value)
    assert error.value.with_flag("--init-from PATH").startswith(f"checkpoint {tmp_path / 'nope.pt'} does not exist; pass --init-from PATH to a checkpoint file")
