"""download.py: the script exports the loader, prints its help without downloading, and reports an
impossible download in one line that names the local alternative."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, closed_port_url
from util import pretrained


def test_the_download_script_exports_the_loader():
    from download import find_model

    assert find_model is pretrained.find_model


@pytest.mark.slow
def test_cli_reports_an_impossible_download_in_one_line(tmp_path):
    env = dict(os.environ, DIT_DOWNLOAD_URL=closed_port_url())
    result = subprocess.run(
        [sys.executable, str(REPO / "download.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("download.py: error: could not download") and "DiT-XL-2-256x256.pt" in last_line
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_help_prints_help_and_downloads_nothing(tmp_path):
    env = dict(os.environ, DIT_DOWNLOAD_URL=closed_port_url())
    result = subprocess.run(
        [sys.executable, str(REPO / "download.py"), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: download.py")
    assert "hf:OWNER/REPO" in result.stdout
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_cli_names_a_local_checkpoint_as_the_alternative(tmp_path):
    env = dict(os.environ, DIT_DOWNLOAD_URL=closed_port_url())
    result = subprocess.run(
        [sys.executable, str(REPO / "download.py"), "DiT-XL-2-256x256.pt", str(tmp_path / "nope.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    last_line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "--ckpt" not in last_line
    assert last_line.endswith("or name a local checkpoint")
