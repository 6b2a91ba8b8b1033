#!/usr/bin/env bash
# GPU check of the extraction engine (issue 17) on one NVIDIA H200 with 16 CPU cores, in under 8 minutes:
# for ResNet-50-trunc and for a ViT-L/16 with UNI's architecture (random weights), the pure forward rate
# against `wsikit extract` end to end on one large slide (19,200 tiles) and on 50 small slides (500 tiles
# each), with the goals: ViT-L end to end ≥ 0.9× its pure forward, ResNet-50-trunc ≥ 0.8×.
#
# The device image (/work/.library/device/KINDS.md) has Python 3.12 with torch, torchvision, timm, h5py,
# tifffile, opencv, scikit-image, scipy, typer, rich, pyyaml, safetensors and huggingface_hub, but not
# these (41 MB of wheels). Prepare them once, on the machine without the GPU, in the repository root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     openslide-python==1.4.7 openslide-bin==4.0.1.2 simplejpeg==1.9.0 imagecodecs==2026.3.6 \
#     zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 tiffslide==3.0.1 \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#
# then run it with the device tool, carrying the wheels (its output and JSON files come back from $OUT):
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#
# wsikit itself is not installed there: a folder of links (/tmp/pkg/wsikit → wsikit/, wsikit/cli → cli/)
# goes first on PYTHONPATH, and every command runs outside the checkout.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/gpu_check_out}"
WORK=/tmp/gpu_check
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

stamp "installing the carried wheels"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  "$REPO"/.whl/*.whl || { echo "no wheels in $REPO/.whl: see this script's header"; exit 1; }
mkdir -p /tmp/pkg/wsikit
for f in "$REPO"/wsikit/*; do ln -sfn "$f" /tmp/pkg/wsikit/; done
ln -sfn "$REPO/cli" /tmp/pkg/wsikit/cli
export PYTHONPATH=/tmp/pkg:/tmp/site
cd "$WORK"  # `python -m` puts the working folder first on sys.path: never the checkout

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'EOF' || exit 1
import os, torch, torchvision, timm
import wsikit
from wsikit.runtime import allotted_cpus, default_workers
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
      f"wsikit {wsikit.__file__}; {torch.cuda.get_device_name()}; {allotted_cpus()} CPUs, "
      f"{default_workers(torch.device('cuda'))} reading workers by default")
EOF

BENCH="python3 $REPO/benchmarks/bench_extract.py"
for enc in uni resnet50-trunc; do
  stamp "$enc: one large slide"
  timeout 170 $BENCH single --encoder "$enc" --tiles 19200 --rounds 1 --forward-seconds 10 \
    --workdir "$WORK" --json "$OUT/${enc}_single.json" 2>&1 | tail -8
  stamp "$enc: 50 small slides"
  timeout 130 $BENCH cohort --encoder "$enc" --slides 50 --tiles-per-slide 500 --rounds 1 --forward-seconds 10 \
    --workdir "$WORK" --json "$OUT/${enc}_cohort.json" 2>&1 | tail -8
done

stamp "summary (goals: uni ≥ 0.9, resnet50-trunc ≥ 0.8 of the pure forward)"
python3 - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    row = r["rounds"][0]
    fwd = statistics.mean(f["tiles_s"] for f in row["forward"])
    after = row["after"]
    stage = after["tiles"] / after["printed_s"] if "printed_s" in after else float("nan")
    goal = 0.9 if path.name.startswith("uni") else 0.8
    print(f"{path.stem:24s} forward {fwd:8.0f} tiles/s | end to end {stage:8.0f} tiles/s = {stage / fwd:.2f}× "
          f"(goal {goal}: {'met' if stage / fwd >= goal else 'NOT met'}) | whole command {r['tiles'] / after['wall']:.0f} tiles/s")
EOF
stamp "done"
