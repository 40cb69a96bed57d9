#!/usr/bin/env bash
# One-shot GPU check of the fusion kernels (run from the repository root on an H100/H200,
# ltroute installed editable with its test extras; no network needed). About 5-8 minutes:
#   1. the CUDA tests: tests/test_fusion_kernel.py::TestCompiledKernel (compiled kernels vs
#      the reference at training-sized shapes, fp32/bf16/fp16) and the fusion tests;
#   2. kernel vs float64 reference at large shapes and dtypes, with NaN/+inf rows;
#   3. benchmarks/bench_fusion.py --quick (correctness gate, then GB/s, eager, compile);
#   4. a short DQRoute fit on CUDA (the kernel in a training loop, forward and backward);
# then prints one summary line per step and exits non-zero if any step failed.
# Never run here (the development machine has no GPU): untested on hardware.
#
# Usage: bash benchmarks/gpu_check.sh [OUTDIR]   (logs and the bench table go to OUTDIR)
set -uo pipefail
OUT="${1:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
declare -A STATUS
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  STATUS[$name]="rc=$rc in $((SECONDS - t0))s"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  >"$OUT/device.txt" 2>&1 || echo "nvidia-smi unavailable" >"$OUT/device.txt"
cat "$OUT/device.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: this script needs a GPU"; exit 2
fi

step cuda_tests 240 "$PY" -m pytest -q -p no:cacheprovider -x \
  tests/test_fusion_kernel.py::TestCompiledKernel tests/test_fusion.py

step large_shapes 120 "$PY" - <<'PY'
import torch
from ltroute.fusion import fuse_experts

fails = 0
dev = "cuda"
cases = [((65536, 3, 10), torch.float32), ((65536, 3, 10), torch.bfloat16),
         ((8192, 3, 100), torch.float32), ((4096, 8, 1000), torch.float32),
         ((4096, 8, 1000), torch.bfloat16), ((4096, 16, 1000), torch.float16),
         ((256, 4, 32000), torch.float32), ((256, 4, 32000), torch.bfloat16)]
for (B, K, C), dt in cases:
    g = torch.Generator(dev).manual_seed(B + K + C)
    Z = (3 * torch.randn(B, K, C, device=dev, generator=g)).to(dt)
    region = torch.rand(K, C, device=dev, generator=g) < 0.6
    region[:, 0] = True
    Z[0, 0, 0] = float("nan")
    Z[1, K - 1, C - 1] = float("inf")
    if not region[K - 1, C - 1]:
        region[K - 1, C - 1] = True
    kw = dict(region_mask=region, return_log_probs=True, check_masks=False)
    z_t = Z.detach().clone().requires_grad_()
    z_r = Z.detach().double().requires_grad_()
    tri = fuse_experts(z_t, backend="triton", **kw)
    ref = fuse_experts(z_r, backend="torch", **kw)  # float64 reference
    up = torch.randn(B, C, device=dev, generator=g)
    up[:2] = 0
    (gt,) = torch.autograd.grad(tri.probs[2:], z_t, up[2:])
    (gr,) = torch.autograd.grad(ref.probs[2:], z_r, up[2:].double())
    ok = bool(torch.isnan(tri.probs[:2]).all()) and bool(torch.isfinite(tri.probs[2:]).all())
    errs = []
    for a, b in ((tri.probs[2:], ref.probs[2:]), (tri.energy[2:], ref.energy[2:]),
                 (tri.weights[2:], ref.weights[2:]), (gt[2:], gr[2:])):
        b = b.detach().double()
        errs.append(float((a.detach().double() - b).abs().max()) / max(1.0, float(b.abs().max())))
    tol_grad = 1e-4 if dt == torch.float32 else 2e-2
    ok = ok and max(errs[:3]) <= 1e-4 and errs[3] <= tol_grad
    fails += not ok
    print("PASS" if ok else "FAIL", (B, K, C), dt, "rel err P E W dZ:",
          " ".join(f"{e:.1e}" for e in errs))
raise SystemExit(1 if fails else 0)
PY

step bench_quick 200 "$PY" benchmarks/bench_fusion.py --quick --out "$OUT/bench_fusion_quick.md"

step estimator_fit 120 "$PY" - <<'PY'
import numpy as np
import torch
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split

from ltroute import DQRouteClassifier

shares = np.geomspace(1, 0.05, 10)
X, y = make_classification(n_samples=6000, n_features=32, n_informative=16, n_classes=10,
                           n_clusters_per_class=1, weights=list(shares / shares.sum()),
                           random_state=0)
X = X.astype(np.float32)
X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
clf = DQRouteClassifier(max_epochs=5, batch_size=256, device="cuda", random_state=0)
clf.fit(X_tr, y_tr)
proba = clf.predict_proba(X_te)
acc = float((proba.argmax(1) == y_te).mean())
majority = float(np.bincount(y_te).max() / len(y_te))
ok = np.isfinite(proba).all() and np.allclose(proba.sum(1), 1, atol=1e-4) and acc > majority
print(f"DQRoute on CUDA, 5 epochs: test accuracy {acc:.3f} (majority class {majority:.3f}), "
      f"probabilities finite and normalised: {ok}")
raise SystemExit(0 if ok else 1)
PY

echo "=== summary ($(cat "$OUT/device.txt"))"
rc=0
for name in cuda_tests large_shapes bench_quick estimator_fit; do
  echo "$name: ${STATUS[$name]}"
  [[ "${STATUS[$name]}" == rc=0* ]] || rc=1
done
exit $rc
