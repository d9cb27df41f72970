#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels of the Python packages that the lent GPU machines
# lack; they have no internet, so benchmarks/gpu_checks.sh installs these from the folder.
#
#   bash benchmarks/fetch_gpu_wheels.sh            (where pip reaches PyPI; then carry .whl along)
#
# Their image (Python 3.12, torch, torchvision, numpy, Pillow, huggingface_hub, safetensors,
# regex, requests, filelock, tqdm, zipp, pytest, timm, scipy) lacks diffusers and its
# importlib_metadata (which needs lazy-importer), and torch-fidelity. All four are pure
# Python, so --no-deps wheels fit any Python and platform. Each is pinned to the version this
# machine's Python has installed (the one the tests passed with), or the newest without one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PACKAGES=(diffusers importlib_metadata lazy-importer torch-fidelity ${EXTRA_WHEELS:-})

pinned=()
for name in "${PACKAGES[@]}"; do
  version=$("$PYTHON" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
  pinned+=("$name${version:+==$version}")
done
mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --dest .whl "${pinned[@]}"
echo "wheels in .whl/ ($(du -sh .whl | cut -f1)): ${pinned[*]}"
