#!/usr/bin/env bash
# Every CUDA path of srdistill on one GPU, in under 8 minutes; one line per path:
#
#   PASS|FAIL|SKIP <path> <seconds> <detail>
#
# Paths: the device itself; `pytest -m gpu tests/run/test_gpu.py` (CLIP on the GPU, bf16-autocast SR
# training, DeepSpeed fine-tuning of a random-init DiT-S/2 with DDIM sampling on GPU actors, Ray
# placement of every model stage with `device: auto`, faiss k-means on the GPU when faiss-gpu is
# installed), each test its own line with its own time; and `srdistill train --gpus 1` (Ray Train,
# one GPU worker, NCCL, bf16) through the CLI. Exit status 1 if any line is FAIL.
#
#   bench/gpu_check.sh            # from anywhere; the repository's .venv if there is one
#   PYTHON=/opt/venv/bin/python bench/gpu_check.sh
#
# Offline by default (HF_HUB_OFFLINE=1): CLIP uses real weights only if they are in the HF cache.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
BIN=$(dirname "$PY")
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export SRDISTILL_DATA=${SRDISTILL_DATA:-$PWD/data}  # Set5 for the evaluate stage (vendored)
OUT=$(mktemp -d /tmp/srdistill-gpu-check.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
STATUS=0

line() {  # status path seconds detail
  printf '%s %s %s %s\n' "$1" "$2" "$3" "$4"
  [ "$1" = FAIL ] && STATUS=1
  return 0
}

# --- the device -----------------------------------------------------------------------------
t0=$SECONDS
if device=$("$PY" -c 'import torch; assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(torch.cuda.get_device_name(0).replace(" ", "_"), f"torch={torch.__version__}", f"cuda={torch.version.cuda}",
      f"bf16={torch.cuda.is_bf16_supported()}")' 2>"$OUT/cuda.err"); then
  line PASS cuda $((SECONDS - t0)) "$device"
else
  line SKIP cuda $((SECONDS - t0)) "no CUDA device: $(tail -1 "$OUT/cuda.err" | tr ' ' '_' | cut -c1-120)"
fi

# --- pytest -m gpu: one line per test -------------------------------------------------------
t0=$SECONDS
timeout 420 "$PY" -m pytest -m gpu -rA -q -p no:cacheprovider --junitxml="$OUT/gpu.xml" tests/run/test_gpu.py \
  >"$OUT/pytest.log" 2>&1
rc=$?
if [ ! -s "$OUT/gpu.xml" ]; then
  line FAIL pytest-gpu $((SECONDS - t0)) "rc=$rc, no report (timeout 420 s?): $(tail -1 "$OUT/pytest.log" | cut -c1-160)"
else
  "$PY" - "$OUT/gpu.xml" <<'EOF' || STATUS=1
import sys
import xml.etree.ElementTree as ET

NAMES = {  # test -> the path it checks
    "test_clip_embeds_on_the_gpu_as_on_the_cpu": "clip-gpu",
    "test_bf16_autocast_sr_training": "train-bf16-autocast",
    "test_deepspeed_finetunes_a_dit_s_on_the_gpu_and_gpu_actors_sample_it": "deepspeed-dit-s+sampling",
    "test_auto_places_every_model_stage_on_the_gpu": "ray-placement",
    "test_faiss_kmeans_on_the_gpu": "faiss-gpu",
}
failed = False
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    name = case.get("name", "?")
    seconds = round(float(case.get("time", 0)))
    bad = case.find("failure") if case.find("failure") is not None else case.find("error")
    skipped = case.find("skipped")
    if bad is not None:
        status, detail = "FAIL", (bad.get("message") or "failed").splitlines()[0]
        failed = True
    elif skipped is not None:
        status, detail = "SKIP", (skipped.get("message") or "skipped").splitlines()[0]
    else:
        status, detail = "PASS", "ok"
    print(status, NAMES.get(name, name), seconds, detail.replace(" ", "_")[:160])
sys.exit(1 if failed else 0)
EOF
fi

# --- srdistill train --gpus 1: Ray Train with one GPU worker, NCCL, bf16 ---------------------
t0=$SECONDS
if [ -z "${device:-}" ]; then
  line SKIP cli-train-gpus 0 "no CUDA device"
elif timeout 240 "$BIN/srdistill" train --input data/T91/HR --out "$OUT/cli-train" --preset tiny --gpus 1 \
     --model edsr-baseline --iterations 50 --set train.amp=bf16 >"$OUT/cli-train.log" 2>&1 \
     && [ -s "$OUT/cli-train/model.safetensors" ]; then
  line PASS cli-train-gpus $((SECONDS - t0)) "$(tail -1 "$OUT/cli-train/log.jsonl" | tr -d ' ' | cut -c1-120)"
else
  line FAIL cli-train-gpus $((SECONDS - t0)) "$(grep -m1 -E 'Error|error' "$OUT/cli-train.log" | tr ' ' '_' | cut -c1-160)"
fi

exit $STATUS
