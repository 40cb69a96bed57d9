"""
Multi-process training with Hugging Face Accelerate
===================================================

ltroute's estimators are skorch nets, so skorch's ``AccelerateMixin`` spreads a fit over
several GPUs (or CPU processes): each process trains on its shard of every batch,
gradients are averaged, and predictions are gathered. Two details make it work:

- ``device=None``: Accelerate, not the estimator, places the model and the data;
- DQRoute's per-epoch difficulty statistics (three sums per class) are all-reduced
  across processes by :class:`ltroute.callbacks.DifficultyWeighting`, so every process
  computes the same class weights.

Launch it as the issue's command does, on a CPU-only machine::

    accelerate launch --cpu --num_processes 2 examples/distributed_accelerate.py

Accelerate 1.x starts a *single* process for ``--cpu`` unless MPI is installed
(``--mpirun_hostfile``); the script notices that it is not part of a process group and
starts ``--processes`` workers (default 2) itself through torch's elastic launcher
(``torchrun``), each of which forms the gloo process group through Accelerate. On GPUs,
launch it the usual way, which starts the processes directly::

    accelerate launch --multi_gpu --num_processes <number of GPUs> \
        examples/distributed_accelerate.py

Needs ``pip install accelerate`` (the ``distributed`` extra).
"""

# %%
import argparse
import os
import subprocess
import sys

import numpy as np
import torch
from accelerate import Accelerator
from skorch.hf import AccelerateMixin

from ltroute import DQRouteClassifier
from ltroute.datasets import load_letter_lt
from ltroute.metrics import group_accuracy

RANDOM_STATE = 0
EPOCHS = int(os.environ.get("LTROUTE_EXAMPLE_EPOCHS", 30))


class DistributedDQRoute(AccelerateMixin, DQRouteClassifier):
    """DQRoute trained through Accelerate (skorch's mixin goes first)."""


def relaunch_as_workers(n_processes: int) -> bool:
    """Start ``n_processes`` copies of this script with torchrun when this process is not
    part of a process group and no GPU is present; return whether it did."""
    if n_processes < 2 or "WORLD_SIZE" in os.environ or torch.cuda.is_available():
        return False
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(n_processes), __file__, "--processes", "1"]
    subprocess.run(command, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    return True


parser = argparse.ArgumentParser(description="DQRoute trained in several processes.")
parser.add_argument("--processes", type=int, default=2,
                    help="workers to start when not launched as a process group")
if relaunch_as_workers(parser.parse_args().processes):
    sys.exit(0)

# %%
# Every process loads the same data (same seed), builds the same estimator and calls
# ``fit``; Accelerate shards the batches. ``device=None`` is required by the mixin.
# On a machine without CUDA, ``cpu=True`` lets Accelerate form a gloo process group.
accelerator = Accelerator(cpu=not torch.cuda.is_available())
data = load_letter_lt(random_state=RANDOM_STATE)
clf = DistributedDQRoute(accelerator=accelerator, device=None, max_epochs=EPOCHS,
                         random_state=RANDOM_STATE)
clf.fit(data.X_train, data.y_train)

# %%
# ``predict`` gathers the shards, so every process holds all test predictions; the
# trained weights are identical in every process.
y_pred = clf.predict(data.X_test)
scores = group_accuracy(data.y_test, y_pred, class_counts=data.class_counts)
checksum = float(sum(p.detach().double().sum() for p in clf.module_.parameters()))
weights = np.round(clf.class_weights_, 4)
line = (f"process {accelerator.process_index}/{accelerator.num_processes}: "
        + "  ".join(f"{k} {100 * v:5.1f}" for k, v in scores.items())
        + f"  parameter checksum {checksum:.6f}  class-weight sum {weights.sum():.4f}")
for rank in range(accelerator.num_processes):  # one process at a time, in rank order
    if rank == accelerator.process_index:
        print(line, flush=True)
    accelerator.wait_for_everyone()
