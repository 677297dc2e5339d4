"""Run under torchrun by the distributed tests: trains the toy experiment and saves each rank's weights.

Usage: torchrun --standalone --nproc_per_node=2 ddp_worker.py OUT_DIR MODEL ITERATIONS [resume]
  MODEL plain  a BatchNorm-free model (comparable with a single process bit for bit, up to float sums)
  MODEL plain_projection  the same with the gradient-projection objective (gradients averaged by hand)
  MODEL plain_erase_after  plain with erasure fitted after training and the heads retrained (Lever.finish)
  MODEL dltk   the default DLTK encoder with BatchNorm
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from conftest import ToyDataset, toy_experiment  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import mtdisent as md  # noqa: E402


class PlainEncoder(torch.nn.Module):
    def __init__(self, in_channels, width=6):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, width, 3, padding=1)
        self.num_features = width

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


if "ddp_plain" not in md.backbones.names():
    md.register("backbone", "ddp_plain", PlainEncoder)


def experiment(model, iterations):
    if model in ("plain", "plain_projection", "plain_erase_after"):
        objective = "projection" if model == "plain_projection" else "minmax"
        after = {"name": "erasure", "args": {"fit": "after", "retrain_epochs": 2, "min_count": 5}}
        return toy_experiment(
            levers=[after] if model == "plain_erase_after" else [],
            backbone="ddp_plain",
            head={"hidden": [8], "batchnorm": False},
            adversary={"head": {"hidden": [8], "batchnorm": False}, "steps": 2, "weight": 0.1, "objective": objective},
            training={"iterations": iterations, "batch_size": 20, "checkpoint_every": 3, "hflip": True},
        )
    return toy_experiment(training={"iterations": iterations, "batch_size": 20, "checkpoint_every": 3})


def data():
    return {"train": ToyDataset(), "val": ToyDataset(40, seed=1)}


def main():
    out, model, iterations = sys.argv[1], sys.argv[2], int(sys.argv[3])
    run = md.train(experiment(model, iterations), data=data(), out_dir=out, resume="resume" in sys.argv, quiet=True)
    rank = int(os.environ["RANK"])
    save_file({k: v.contiguous() for k, v in run.model.state_dict().items()}, f"{out}/rank{rank}.safetensors")


if __name__ == "__main__":
    main()
