#!/usr/bin/env bash
# One GPU lease's share of the CIFAR-10-LT recipe (benchmarks/cifar_lt.py, ResNet-32,
# 200 epochs, five methods side by side), resumable across leases: every fit saves its
# state after each epoch (cifar_lt.py --resume-dir), the next lease continues it, and the
# fragment becomes the recipe's table once every fit has finished. Run from the
# repository root on the lent machine, as one command:
#
#   bash benchmarks/gpu_lease.sh ARCHIVE STATE_TAR SECONDS [OUT]
#
# ARCHIVE    the CIFAR-10 JPEG archive (cifar10-jpeg.tar.gz), unpacked to /tmp/data
# STATE_TAR  the previous lease's state.tar.gz (absent for the first lease)
# SECONDS    the wall-clock this command may take in all; the fits are stopped about 40 s
#            before it, so that their state and the fragment can be written
# OUT        where state.tar.gz, the fragment and the logs go (default: $OUT; six files,
#            within the device tool's eight)
#
# Environment: DEVICE (default cuda), NAME (the fragment, default cifar_lt_gpu) and
# CIFAR_LT_ARGS (extra arguments, e.g. for a smoke test on a CPU: "--backbone convnet
# --epochs 2").
#
# Without skorch on the machine, a wheel in .whl/ is installed to /tmp/site; the project
# itself with `pip install --no-deps --no-build-isolation -e .`. Afterwards keep
# OUT/state.tar.gz as the next lease's STATE_TAR.
set -u
ARCHIVE=$1 STATE_TAR=$2 SECONDS_ALLOWED=$3 DEST=${4:-${OUT:?give OUT}}
STATE_DIR=/tmp/cifar_lt_state
START=$SECONDS
export PYTHONUNBUFFERED=1
if ! python3 -c "import skorch" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$DEST/install.log" 2>&1 \
    || { tail -20 "$DEST/install.log"; exit 4; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$DEST/device.txt"
[ -d /tmp/data/cifar10-jpeg ] || { mkdir -p /tmp/data && tar xzf "$ARCHIVE" -C /tmp/data; } || exit 5
mkdir -p "$STATE_DIR"
[ -f "$STATE_TAR" ] && tar xzf "$STATE_TAR" -C "$STATE_DIR"
ls "$STATE_DIR"
LIMIT=$(python3 -c "print(round(($SECONDS_ALLOWED - 40 - ($SECONDS - $START)) / 60, 2))")
echo "setup done at $((SECONDS - START)) s; fits stop after $LIMIT min"
(while true; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader; sleep 30; done) \
    > "$DEST/smi.log" 2>&1 &
SMI=$!
timeout $((SECONDS_ALLOWED - 10 - (SECONDS - START))) python3 benchmarks/cifar_lt.py \
    /tmp/data/cifar10-jpeg --device "${DEVICE:-cuda}" --jobs 5 --time-limit "$LIMIT" \
    --resume-dir "$STATE_DIR" --epoch-log /tmp/cifar_lt_epochs --name "${NAME:-cifar_lt_gpu}" \
    ${CIFAR_LT_ARGS:-} > "$DEST/cifar.log" 2>&1
echo "cifar_lt.py rc=$? at $((SECONDS - START)) s"
kill $SMI
tar czf "$DEST/state.tar.gz" -C "$STATE_DIR" .
cp "benchmarks/results/${NAME:-cifar_lt_gpu}.md" "$DEST/" 2>/dev/null
grep -v Warning "$DEST/cifar.log" | tail -8
grep "^| " "$DEST/${NAME:-cifar_lt_gpu}.md" 2>/dev/null
