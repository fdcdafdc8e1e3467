#!/usr/bin/env bash
# Train the text suite's eight LoRA adapters (finetune_lora.py) on a GPU machine. Run in the repository root:
#
#   OUT=/some/out benchmarks/text_suite/lora_gpu.sh WHEELS_DIR CACHE_DIR [finetune_lora.py options]
#
# WHEELS_DIR: wheels to install (peft-0.21.2-py3-none-any.whl); CACHE_DIR: holds base/ and data/ like
# .cache/text_suite (if base/model.safetensors is missing, base/model.safetensors.part* are concatenated;
# BASE_SHA256, if set, is checked).
# The wheels go with `pip install --target` into a temporary folder put on PYTHONPATH: no venv, nothing changed
# in the system Python (no PEP 668 issue), and they shadow a preinstalled peft. The adapters' config names the
# base `.cache/text_suite/base`, as on the development machine. Results: CACHE_DIR/lora/, packed into
# "$OUT/lora.tar" (one file: the device returns at most 8 files), plus "$OUT/finetune_lora_report.json".
set -euo pipefail
wheels=${1:?usage: lora_gpu.sh WHEELS_DIR CACHE_DIR}
cache=${2:?usage: lora_gpu.sh WHEELS_DIR CACHE_DIR}
: "${OUT:?set OUT to the output folder}"
python=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)

site=$(mktemp -d)
"$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$wheels"/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
"$python" -c 'import sys, torch, transformers, peft
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| peft", peft.__version__, "from", peft.__file__)
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'

weights="$cache/base/model.safetensors"
if [[ ! -f $weights ]]; then
    cat "$weights".part* >"$weights"
fi
sha256sum "$weights"
if [[ -n ${BASE_SHA256:-} ]]; then echo "$BASE_SHA256  $weights" | sha256sum -c -; fi
echo "setup: $(($(date +%s) - start)) s"

"$python" benchmarks/text_suite/finetune_lora.py --device "${DEVICE:-cuda}" --cache "$cache" \
    --base-ref .cache/text_suite/base "${@:3}"
echo "training: $(($(date +%s) - start)) s since start"

mkdir -p "$OUT"
tar -C "$cache" -cf "$OUT/lora.tar" lora
cp "$cache/lora/finetune_lora_report.json" "$OUT/"
ls -la "$OUT"
echo "total: $(($(date +%s) - start)) s"
