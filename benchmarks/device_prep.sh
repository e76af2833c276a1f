#!/usr/bin/env bash
# Prepares what benchmarks/gpu_suite.py needs on a lent GPU machine that has torch but no internet
# and must receive at most 64 MiB (the device tool's limit): the maskdit dependencies missing from
# its image as Python 3.12 wheels in .whl/, and the bundled Inception network (87 MB) stored as
# fp16 in .inc/ (43 MB; its speed does not depend on the weights). Both folders are git-ignored
# through .git/info/exclude. With REFERENCE=<a git dir of Anima-Lab/MaskDiT> (e.g. the search tool's fetch
# mirror) it also puts the reference code in .ref/MaskDiT and timm (no dependencies) in .ref/timm, for the
# suite's side-by-side section. Then, on the device (carry: .whl .inc .ref):
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   python3 -c "import torch; torch.jit.save(torch.jit.load('.inc/inception_fp16.pt').float(), '/tmp/inc.pt')"
#   python3 benchmarks/gpu_suite.py --out $OUT --inception /tmp/inc.pt --reference .ref/MaskDiT --timm .ref/timm
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
for d in .whl .inc .ref; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
version() { "$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pkgs=()
for name in pydantic pydantic_core annotated-types typing-inspection typing_extensions diffusers importlib_metadata zipp; do
    pkgs+=("$name==$(version "$name")")
done
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    plat+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl "${pkgs[@]}"
mkdir -p .inc
"$py" -c "
import torch
from maskdit.evaluation import inception
torch.jit.save(torch.jit.load(str(inception.bundled_weights_path())).half(), '.inc/inception_fp16.pt')"
if [ -n "${REFERENCE:-}" ]; then
    rm -rf .ref && mkdir -p .ref/MaskDiT
    git --git-dir "$REFERENCE" archive HEAD | tar -x -C .ref/MaskDiT
    python3 -m pip install -q --no-deps --target .ref/timm timm
fi
du -sh .whl .inc .ref 2>/dev/null || true
