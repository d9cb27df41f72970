"""benchmarks/benchmark.py: the FLOP count behind MFU, and the variant names."""
from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from benchmark import forward_macs, parse_variant  # noqa: E402


# Forward GFLOPs per image as the DiT paper counts them (multiply-adds), at 256 px unless noted.
@pytest.mark.parametrize(
    "model,image_size,paper_gmacs",
    [("DiT-XL/2", 256, 118.6), ("DiT-XL/2", 512, 524.6), ("DiT-S/2", 256, 6.06), ("DiT-B/4", 256, 5.56), ("DiT-S/8", 256, 0.36)],
)
def test_forward_macs_match_the_paper(model, image_size, paper_gmacs):
    # The paper rounds to 1 or 2 decimals; allow that rounding or 0.1%, whichever is larger.
    assert forward_macs(model, image_size) / 1e9 == pytest.approx(paper_gmacs, rel=1e-3, abs=0.005)


def test_variant_names():
    assert parse_variant("reference") == {"precision": "fp32", "compile": False, "plain-attn": True, "loop-opt": True}
    assert parse_variant("bf16+compile") == {"precision": "bf16", "compile": True, "plain-attn": False, "loop-opt": False}
    with pytest.raises(SystemExit, match=r"bad variant 'bf16\+fast'"):
        parse_variant("bf16+fast")
