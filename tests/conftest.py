import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def two_tasks():
    import mtdisent as md

    return md.Experiment(
        tasks=[md.Task(name="plane", classes=["3VV", "LVOT", "Abd"]), md.Task(name="shadow", num_classes=2)],
        backbone={"name": "dltk_residual", "args": {"filters": [4, 8, 16], "strides": [1, 2, 2]}},
        input_shape=(1, 16, 24),
        head={"hidden": [8]},
        adversary={"head": {"hidden": [8]}},
    )
