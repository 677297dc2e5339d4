"""Child process for the fault-injection tests: trains the toy experiment, dying where told.

Usage: python fault_worker.py OUT_DIR MODE N
  MODE none       train normally (resume=True)
  MODE replace    SIGKILL itself at the N-th os.replace (inside a checkpoint or model write)
  MODE fsync      SIGKILL itself at the N-th file fsync (files written, not yet renamed)
  MODE slow       sleep 0.25 s per iteration so the parent can signal it at a random moment
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import ToyDataset, toy_experiment  # noqa: E402

import mtdisent as md  # noqa: E402
from mtdisent._engine import _checkpoint  # noqa: E402

ITERATIONS = 8


def experiment():
    return toy_experiment(training={"iterations": ITERATIONS, "checkpoint_every": 1, "keep_last": 2})


def data():
    return {"train": ToyDataset(), "val": ToyDataset(40, seed=1)}


def die_on_call(module, name, n):
    original = getattr(module, name)
    count = {"calls": 0}

    def wrapper(*args, **kwargs):
        count["calls"] += 1
        if count["calls"] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


class SlowDown(md.Callback):
    """Makes each iteration last 0.25 s longer, so the parent can signal the run at a random moment."""

    def on_iteration_end(self, loop, metrics):
        time.sleep(0.25)


def main():
    out, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "replace":
        die_on_call(_checkpoint.os, "replace", n)
    elif mode == "fsync":
        die_on_call(_checkpoint, "_fsync_file", n)
    callbacks = [SlowDown()] if mode == "slow" else []
    try:
        md.train(experiment(), data=data(), out_dir=out, resume=True, quiet=True, callbacks=callbacks)
    except md.TrainingInterrupted as exc:
        print(f"INTERRUPTED {exc.iteration}", flush=True)
        sys.exit(128 + exc.signal)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
