"""Fetch DiT checkpoints ahead of sampling: the released files into pretrained_models/,
hf:OWNER/REPO names into the Hugging Face cache (see util/pretrained.py for every source).

  python download.py                          # fetch both released checkpoints
  python download.py hf:facebook/DiT-XL-2-256 # fill the hub cache instead

`from download import find_model` gives the loader itself.
"""
from __future__ import annotations

import argparse
import os
import sys

from util.checkpoints import WeightsError
from util.pretrained import PRETRAINED_DIR, PRETRAINED_MODELS, find_model

__all__ = ["find_model", "main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Fetch DiT checkpoints ahead of sampling: the released files into pretrained_models/, "
        "hf:OWNER/REPO names into the Hugging Face cache.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("names", nargs="*", default=list(PRETRAINED_MODELS), help="released file names or hf:OWNER/REPO[/SUBFOLDER]")
    args = parser.parse_args(argv)
    for name in args.names:
        try:
            find_model(name)
        except WeightsError as error:  # a local checkpoint is named like any other source
            sys.exit(f"download.py: error: {error.sentence(f'name {error.instead}' if error.instead else None)}")
        except OSError as error:
            sys.exit(f"download.py: error: {error}")
        print(f"{os.path.join(PRETRAINED_DIR, name) if name in PRETRAINED_MODELS else name} is ready")


if __name__ == "__main__":
    main()
