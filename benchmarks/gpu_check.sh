#!/usr/bin/env bash
# GPU checks of issue #18, on one CUDA GPU, in under 8 minutes (the steps' time limits add up to under 8 minutes):
#   1. the CUDA-only tests (mamba-ssm kernels against the plain scan): they must run, none may be skipped;
#   2. the fused Swin-v2 window attention against transformers' eager one on CUDA (float32 within 1e-4, bfloat16);
#   3. regions/s of xT (released "hyper" context) against its region encoder alone, bfloat16, 8,192² image;
#   4. a bfloat16 29,000 × 25,000 px predict (benchmarks/gigapixel.py's xT child) with its peak CUDA memory.
# Run from the repository root with the project's environment active:  bash benchmarks/gpu_check.sh
# Any missing piece (no GPU, no mamba-ssm, a skipped test) is an error, never a silent skip.
set -euo pipefail

cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

step "0. preconditions"
timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || fail "nvidia-smi did not run"
timeout 20 "$PYTHON" - <<'EOF' || fail "torch without CUDA, or mamba-ssm / causal-conv1d missing (pip install xt-hf[mamba])"
import torch
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
import causal_conv1d  # noqa: F401
import mamba_ssm  # noqa: F401
from xt_hf.context_mamba import selective_scan_fn
assert selective_scan_fn is not None, "xt_hf did not pick up mamba-ssm's selective_scan_fn"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "on", torch.cuda.get_device_name())
EOF

step "1. CUDA-only tests (must run, none skipped)"
timeout 90 "$PYTHON" -m pytest -o addopts="" -p no:cacheprovider -q -rs tests/test_context_mamba.py -k cuda \
    --junitxml="$WORK/cuda.xml" || fail "CUDA tests"
"$PYTHON" - "$WORK/cuda.xml" <<'EOF' || fail "a CUDA test was skipped or none ran"
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
tests, skipped = int(suite.get("tests")), int(suite.get("skipped"))
print(f"{tests} CUDA tests, {skipped} skipped")
assert tests > 0 and skipped == 0
EOF

step "2. fused Swin-v2 window attention against eager, on CUDA"
timeout 60 "$PYTHON" - <<'EOF' || fail "fused attention on CUDA"
import copy
import sys
import torch
sys.path.insert(0, "benchmarks")
from overhead_and_memory import swin_t_xt_config
from xt_hf import XTForImageClassification
from xt_hf.swinv2_attention import set_swinv2_attention

torch.manual_seed(0)
fused = XTForImageClassification(swin_t_xt_config(context=False)).xt.region_encoder.backbone.cuda().eval()
eager = copy.deepcopy(fused)
set_swinv2_attention(eager, "eager")
regions = torch.randn(8, 3, 256, 256, device="cuda")
with torch.inference_mode():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    reference = eager(regions).feature_maps[-1]
    delta = (fused(regions).feature_maps[-1] - reference).abs().max().item()
    print(f"float32 max|Δ| {delta:.2e} (features up to {reference.abs().max().item():.1f})")
    assert delta <= 1e-4, delta
    eager16, fused16 = eager.to(torch.bfloat16), fused.to(torch.bfloat16)
    error = {name: (model(regions.bfloat16()).feature_maps[-1].float() - reference).abs().mean().item()
             for name, model in (("eager", eager16), ("sdpa", fused16))}
    print(f"bfloat16 mean|Δ| against float32: eager {error['eager']:.3e}, sdpa {error['sdpa']:.3e}")
    assert error["sdpa"] <= 1.1 * error["eager"], error
EOF

step "3. regions/s: xT against its region encoder alone (bfloat16, 8,192²)"
timeout 90 "$PYTHON" - <<'EOF' || fail "regions/s"
import sys
import torch
sys.path.insert(0, "benchmarks")
from overhead_and_memory import measure_overhead

result = measure_overhead(8192, 3, torch.device("cuda"), torch.bfloat16, region_batch_size=64)
regions, seconds = result["regions"], result["seconds"]
print(f"{regions} regions of 256², region_batch_size 64, median of 3")
print(f"region encoder alone  {regions / seconds['backbone']:8.1f} regions/s")
print(f"xT, no context        {regions / seconds['xt_no_context']:8.1f} regions/s")
print(f"xT, released context  {regions / seconds['xt_released_context']:8.1f} regions/s  "
      f"(time ratio {result['ratio_xt_released_context']:.3f})")
EOF

step "4. bfloat16 predict of a 29,000 × 25,000 px image, peak CUDA memory"
timeout 60 "$PYTHON" -c "
import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks')
from gigapixel import write_image
write_image(Path('$WORK/image.npy'), 29000, 25000)" || fail "writing the test image"
timeout 130 "$PYTHON" benchmarks/gigapixel.py --child xt "$WORK/image.npy" --device cuda --dtype bfloat16 \
    | tee "$WORK/predict.json" || fail "29,000 × 25,000 predict"
"$PYTHON" - "$WORK/predict.json" <<'EOF' || fail "29,000 × 25,000 predict gave no result"
import json
import sys
result = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(f"{result['height']} × {result['width']} px: {result['seconds']:.1f} s, "
      f"peak CUDA memory {result['peak_gib']:.2f} GiB")
EOF

echo; echo "gpu_check: all GPU checks passed"
