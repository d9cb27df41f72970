"""download.find_model against a loopback HTTP server: fetch, resume, corrupt files, offline."""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from conftest import REPO, make_tiny_dit

import download

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
    monkeypatch.setitem(download.PRETRAINED_MODELS, NAME, ("DiT-S/8", 8))
    monkeypatch.setenv(download.BASE_URL_ENV, server.url)
    return tmp_path


def serve(server, data: bytes) -> None:
    server.files[f"models/{NAME}"] = data


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_default_address_is_the_official_one(monkeypatch):
    monkeypatch.delenv(download.BASE_URL_ENV, raising=False)
    assert download.pretrained_url("DiT-XL-2-256x256.pt") == "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt"
    assert set(download.PRETRAINED_MODELS) == {"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"}


def test_downloads_once_into_pretrained_models(workdir, server, released):
    state_dict, data = released
    serve(server, data)
    assert_same_weights(download.find_model(NAME), state_dict)
    path = workdir / "pretrained_models" / NAME
    assert path.read_bytes() == data
    assert sorted(os.listdir(path.parent)) == [NAME]  # no .part left behind
    assert server.requests == [None]

    assert_same_weights(download.find_model(NAME), state_dict)
    assert server.requests == [None], "a present file must not be downloaded again"


def test_cut_off_transfer_is_resumed_with_a_range_request(workdir, server, released):
    state_dict, data = released
    serve(server, data)
    server.cuts = 1
    assert_same_weights(download.find_model(NAME), state_dict)
    assert server.requests == [None, f"bytes={len(data) // 2}-"]
    assert (workdir / "pretrained_models" / NAME).read_bytes() == data


def test_partial_file_of_an_earlier_run_is_resumed(workdir, server, released):
    state_dict, data = released
    serve(server, data)
    (workdir / "pretrained_models").mkdir()
    (workdir / "pretrained_models" / f"{NAME}.part").write_bytes(data[:1000])
    assert_same_weights(download.find_model(NAME), state_dict)
    assert server.requests == ["bytes=1000-"]


def test_server_without_ranges_starts_over(workdir, server, released):
    state_dict, data = released
    serve(server, data)
    server.ranges = False
    (workdir / "pretrained_models").mkdir()
    (workdir / "pretrained_models" / f"{NAME}.part").write_bytes(b"x" * 1000)
    assert_same_weights(download.find_model(NAME), state_dict)
    assert (workdir / "pretrained_models" / NAME).read_bytes() == data


@pytest.mark.parametrize("content", ["garbage", "wrong model"])
def test_corrupt_download_is_set_aside_with_a_clear_message(workdir, server, tiny_dit_ckpts, content):
    # "wrong model": a valid checkpoint with 10 classes where the released model has 1000.
    garbage = np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8).tobytes()
    data = garbage if content == "garbage" else tiny_dit_ckpts["bare"].read_bytes()
    serve(server, data)
    with pytest.raises(ValueError) as error:
        download.find_model(NAME)
    message = str(error.value)
    assert f"{server.url}/{NAME}" in message and "--ckpt PATH" in message
    if content == "wrong model":
        assert "y_embedder.embedding_table.weight expected (1001, 384) found (11, 384)" in message
    folder = workdir / "pretrained_models"
    assert sorted(os.listdir(folder)) == [f"{NAME}.corrupt"]
    assert (folder / f"{NAME}.corrupt").read_bytes() == data


def test_corrupt_file_already_in_place_is_named(workdir, server):
    (workdir / "pretrained_models").mkdir()
    (workdir / "pretrained_models" / NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"delete pretrained_models/{NAME} to download it again"):
        download.find_model(NAME)
    assert server.requests == []


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/models"


def test_offline_gives_one_sentence_naming_the_address_and_the_local_path(workdir, monkeypatch):
    url = closed_port_url()
    monkeypatch.setenv(download.BASE_URL_ENV, url)
    with pytest.raises(RuntimeError) as error:
        download.find_model(NAME)
    message = str(error.value)
    assert "\n" not in message
    assert f"could not download {url}/{NAME}" in message
    assert f"put the file at {os.path.join('pretrained_models', NAME)}" in message
    assert "--ckpt PATH" in message
    assert not (workdir / "pretrained_models" / NAME).exists()


def test_http_error_names_the_status(workdir, server):
    with pytest.raises(RuntimeError, match=f"could not download {server.url}/{NAME} \\(HTTP Error 404"):
        download.find_model(NAME)


def test_local_checkpoint_gives_its_ema_weights(tiny_dit_ckpts):
    ema = torch.load(tiny_dit_ckpts["bare"], weights_only=True)
    assert_same_weights(download.find_model(str(tiny_dit_ckpts["training"])), ema)
    assert_same_weights(download.find_model(str(tiny_dit_ckpts["bare"])), ema)


def test_missing_local_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; pass --ckpt PATH"):
        download.find_model(str(tmp_path / "nope.pt"))


def test_cli_reports_an_impossible_download_in_one_line(tmp_path):
    env = dict(os.environ, DIT_DOWNLOAD_URL=closed_port_url())
    result = subprocess.run(
        [sys.executable, str(REPO / "download.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("download.py: error: could not download") and "DiT-XL-2-256x256.pt" in last_line
    assert "Traceback" not in result.stderr
