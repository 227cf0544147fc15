"""A batch iterator that can stop and resume at the exact batch, and shards data across ranks.

Every epoch is a permutation drawn from ``seed + epoch``; rank ``r`` of ``W`` takes positions
``r, r + W, r + 2W, ...`` of it, so ``W`` processes with batch ``b`` see exactly the items one
process with batch ``W * b`` would. The state is ``(epoch, batches taken)``; items must be a
function of their index (and of the epoch, through ``dataset.set_epoch`` if the dataset has it),
which is what makes the resumed stream identical.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, default_collate


class ResumableLoader:
    """Infinite iterator over batches of a map-style dataset.

    Args:
        dataset: ``len(dataset)`` and ``dataset[i]``.
        batch_size: items per batch on this process.
        seed: base seed of the epoch permutations.
        collate_fn: list of items -> batch (default: torch's ``default_collate``).
        shuffle: permute each epoch (False: dataset order).
        drop_last: drop the last incomplete batch of an epoch (otherwise it is yielded short).
        rank, world_size: this process's shard.
        num_workers: worker processes for loading (torch ``DataLoader``).
    """

    def __init__(self, dataset, batch_size: int, *, seed: int = 0, collate_fn=None, shuffle: bool = True,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1, num_workers: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"ResumableLoader: batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"ResumableLoader: rank {rank} outside world_size {world_size}")
        n = len(dataset)
        per_rank = n // world_size
        if per_rank < (batch_size if drop_last else 1):
            raise ValueError(f"ResumableLoader: the dataset has {n} items, too few for {world_size} "
                             f"process(es) with batch_size {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.collate_fn = collate_fn or default_collate
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.epoch = 0
        self.position = 0  # batches already yielded in this epoch

    def batches_per_epoch(self) -> int:
        per_rank = len(self.dataset) // self.world_size
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The index lists of this rank's batches in ``epoch``."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        mine = order[: (n // self.world_size) * self.world_size][self.rank :: self.world_size]
        return [mine[i : i + self.batch_size] for i in range(0, self.batches_per_epoch() * self.batch_size, self.batch_size)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"ResumableLoader: checkpoint was made with seed {state['seed']}, this run uses {self.seed}")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])

    def __iter__(self):
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            batches = self.epoch_batches(self.epoch)[self.position :]
            if self.num_workers > 0:
                loader = DataLoader(self.dataset, batch_sampler=batches, collate_fn=self.collate_fn,
                                    num_workers=self.num_workers)
                stream = iter(loader)
            else:
                stream = (self.collate_fn([self.dataset[i] for i in idx]) for idx in batches)
            for batch in stream:
                self.position += 1
                yield batch
            self.epoch += 1
            self.position = 0
