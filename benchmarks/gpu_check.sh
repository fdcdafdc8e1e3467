#!/usr/bin/env bash
# The GPU checks in one command, for a machine with one NVIDIA GPU and a Python that already has torch (CUDA),
# transformers, accelerate and safetensors, and no network:
#
#     bash benchmarks/gpu_check.sh [WHEELS_DIR]
#
# 1. installs what hubmerge, its GPU tests and its editable install need and this Python lacks, from the wheels
#    in WHEELS_DIR only (benchmarks/README.md says how to fill it on a networked machine; without WHEELS_DIR
#    the script lists what is missing and stops), then hubmerge itself: `pip install --no-deps -e .`;
# 2. runs the tests marked `gpu` (`pytest -m gpu`: CPU and GPU outputs byte-identical for every method,
#    pinned reads, a one-process NCCL group);
# 3. runs benchmarks/gpu_bench.py: a 1 B bfloat16 model, T = 4 and 8, task_arithmetic, ties, tall_masks and
#    consensus on the GPU and on the CPU, and prints one table.
#
# About 6 minutes on an H200 machine with 16 cores; no benchmark run starts after 400 s, so the whole script
# ends within 8 minutes (runs left out are listed as skipped). PYTHON=... picks the interpreter (default:
# python3). Exit status: 0 when the tests and every run passed and the GPU outputs equal the CPU outputs.
set -euo pipefail

START=$(date +%s)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
WHEELS=${1:-}
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

"$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
print(f"gpu_check: Python {sys.version.split()[0]}, torch {torch.__version__}, {torch.cuda.get_device_name()}")
EOF

# What this Python lacks (or has at a version hubmerge does not accept): hubmerge's dependencies, the test
# runner and its property-testing library, and setuptools for the editable install. One requirement a line.
MISSING=$("$PY" - <<'EOF'
import importlib.metadata as metadata
import re
from pathlib import Path

from packaging.requirements import Requirement

text = Path("pyproject.toml").read_text()
try:
    import tomllib

    dependencies = tomllib.loads(text)["project"]["dependencies"]
except ModuleNotFoundError:  # Python 3.10: the dependency list by pattern
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    dependencies = re.findall(r'^\s*"([^"]+)"', block, re.M)
for spec in [*dependencies, "pytest>=8", "hypothesis>=6.100", "setuptools>=68"]:
    requirement = Requirement(spec)
    if requirement.marker is not None and not requirement.marker.evaluate():
        continue
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        print(spec)
        continue
    if not requirement.specifier.contains(version, prereleases=True):
        print(spec)
EOF
)

if [ -n "$MISSING" ]; then
    echo "gpu_check: to install: $(echo "$MISSING" | tr '\n' ' ')"
    if [ -z "$WHEELS" ]; then
        echo "gpu_check: no WHEELS_DIR given; put their wheels (and their dependencies') in a folder and pass it" >&2
        echo "           (benchmarks/README.md, section gpu_check.sh, lists them)" >&2
        exit 1
    fi
    mapfile -t REQUIREMENTS <<<"$MISSING"
    "$PY" -m pip install --no-index --find-links "$WHEELS" "${REQUIREMENTS[@]}"
fi
"$PY" -m pip install --no-index --no-deps --no-build-isolation -e . >/dev/null
"$PY" -c 'import hubmerge; print(f"gpu_check: hubmerge {hubmerge.__version__} installed")'

STATUS=0
echo
echo "== pytest -m gpu"
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)
"$PY" -m pytest -m gpu -q -p no:cacheprovider -rs "${GPU_TESTS[@]}" || STATUS=1

echo
echo "== benchmark ($(( $(date +%s) - START )) s so far)"
DEADLINE=$(( 400 - ($(date +%s) - START) ))
if [ "$DEADLINE" -lt 60 ]; then DEADLINE=60; fi
"$PY" benchmarks/gpu_bench.py --devices cuda cpu --deadline-s "$DEADLINE" || STATUS=1

echo
echo "gpu_check: done in $(( $(date +%s) - START )) s, exit status $STATUS"
exit "$STATUS"
