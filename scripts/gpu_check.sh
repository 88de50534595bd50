#!/usr/bin/env bash
# The GPU check: cost curves and decode speed of SmolLM2-135M, SmolLM2-1.7B and Llama-3.1-8B shapes with dummy
# weights in bfloat16, and the real SmolLM2-135M's acceptance projected onto this device (scripts/gpu_check.py).
#   scripts/gpu_check.sh OUTDIR                 on a GPU (about 8 minutes on one H200)
#   scripts/gpu_check.sh --device cpu OUTDIR    small shapes and settings on the CPU (the suite runs it)
# Needs python3 with torch and transformers, and this checkout (no Ray, no model hub). Writes OUTDIR/gpu_check.json
# and OUTDIR/gpu_check.md.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$( [ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3 )}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$python" "$here/scripts/gpu_check.py" "$@"
