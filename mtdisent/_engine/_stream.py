"""The training data feed: a seeded, resumable stream of batches through a ``DataLoader``.

:class:`BatchStream` decides the order: seeded permutations, epoch after epoch, state ``(epoch, offset)``. The
:class:`TrainFeed` gives it to a ``DataLoader`` as its batch sampler (worker processes may fetch ahead) and keeps
its own copy advanced by the batches actually *consumed*, so a checkpoint records exactly what training has
seen, whatever the workers prefetched; a restored feed starts a new loader at that position. Random horizontal
flips are drawn in the main process from their own generator. Under ``torchrun`` every rank draws the same
global batch and takes its slice ``rank::world``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .._data import Batch, ContractView, DataError, _no_labels_message, make_loader
from ._distributed import DistInfo

__all__ = ["BatchStream", "TrainFeed"]


class BatchStream:
    """An endless stream of index batches: seeded permutations, epoch after epoch.

    The state is ``(epoch, offset)``; permutation ``e`` is ``randperm(n)`` under seed ``(seed, e)``, so a
    restored stream continues exactly where it stopped.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def next(self) -> torch.Tensor:
        """The next ``batch_size`` indices, continuing into the next epoch's permutation when needed."""
        parts, need = [], self.batch_size
        while need > 0:
            take = self._perm[self.offset : self.offset + need]
            parts.append(take)
            need -= len(take)
            self.offset += len(take)
            if self.offset >= self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(parts)

    def state_dict(self) -> dict[str, int]:
        """JSON-able position."""
        return {"epoch": self.epoch, "offset": self.offset, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore a position saved by :meth:`state_dict`."""
        if state["n"] != self.n:
            raise DataError(f"the training data has {self.n} samples but the checkpoint was made with {state['n']}")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._permutation(self.epoch)


class _StreamSampler:
    """A batch sampler replaying a :class:`BatchStream` from a saved position: this rank's slice of each batch."""

    def __init__(self, n: int, batch_size: int, seed: int, state: dict[str, int], rank: int, world: int) -> None:
        self.args, self.state, self.rank, self.world = (n, batch_size, seed), state, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        stream = BatchStream(*self.args)
        stream.load_state_dict(self.state)
        while True:
            yield stream.next()[self.rank :: self.world].tolist()


class TrainFeed:
    """Training batches on the device: the seeded stream, fetched by a ``DataLoader``, randomly flipped.

    Args:
        view: The training split through the data contract.
        batch_size: The global batch size (every rank trains on ``batch_size / world`` of it).
        seed: Seed of the order and the flips.
        hflip: Random horizontal flips.
        dist: The process's place in a distributed run.
        device: Where batches go.
        num_workers: DataLoader worker processes (0: fetch in this process).
    """

    def __init__(
        self,
        view: ContractView,
        batch_size: int,
        seed: int,
        hflip: bool,
        dist: DistInfo,
        device: torch.device,
        num_workers: int = 0,
    ) -> None:
        self.view, self.hflip, self.dist, self.device, self.num_workers = view, hflip, dist, device, num_workers
        self.stream = BatchStream(view.n, batch_size, seed)
        self.flip_rng = torch.Generator().manual_seed(seed + 7919)
        self.seed = seed
        self._batches: Iterator[Batch] | None = None
        # without a label table, whether every task has a label is known after one pass over the data
        self._labelled: dict[str, bool] | None = (
            None if view.table is not None or dist.enabled else dict.fromkeys(view.tasks, False)
        )

    def _start(self) -> Iterator[Batch]:
        sampler = _StreamSampler(
            self.view.n,
            self.stream.batch_size,
            self.stream.seed,
            self.stream.state_dict(),
            self.dist.rank,
            self.dist.world,
        )
        return make_loader(
            self.view,
            sampler,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            seed=self.seed * 1_000_003 + self.stream.epoch * 1009 + self.stream.offset,
        )

    def next(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The next batch ``(images (B, C, H, W), {task: (B,)})`` on the device, randomly flipped."""
        if self._batches is None:
            self._batches = self._start()
        indices = self.stream.next()  # the global batch, identical on every rank
        flip = torch.rand(len(indices), generator=self.flip_rng) < 0.5  # (B,)
        rank, world = self.dist.rank, self.dist.world
        x, y, got = next(self._batches)  # this rank's slice (B / world)
        if not torch.equal(got, indices[rank::world]):  # the loader replays the same stream: a cheap guard
            raise RuntimeError("the data loader's batch order departed from the training stream")
        if self.hflip:
            x = torch.where(flip[rank::world, None, None, None], x.flip(-1), x)
        if self._labelled is not None:
            self._check_labels(y)
        non_blocking = self.device.type == "cuda"
        return x.to(self.device, non_blocking=non_blocking), {k: v.to(self.device) for k, v in y.items()}

    def _check_labels(self, y: dict[str, torch.Tensor]) -> None:
        assert self._labelled is not None
        for t, v in y.items():
            self._labelled[t] = self._labelled[t] or bool((v >= 0).any())
        if self.stream.epoch >= 1:  # a full pass is done
            missing = [t for t, seen in self._labelled.items() if not seen]
            if missing:
                raise DataError(_no_labels_message(self.view.split, missing[0]))
            self._labelled = None

    def state_dict(self) -> dict[str, Any]:
        """The position (consumed batches) and the flip generator's state."""
        return {"stream": self.stream.state_dict(), "flip_rng": self.flip_rng.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the loader restarts there."""
        self.stream.load_state_dict(state["stream"])
        self.flip_rng.set_state(state["flip_rng"])
        self.close()

    def close(self) -> None:
        """Stop the loader (its worker processes); the next batch starts a new one."""
        if self._batches is not None:
            self._batches.close()  # type: ignore[attr-defined]
            self._batches = None
