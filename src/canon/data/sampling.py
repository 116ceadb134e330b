"""Which samples, in which order, augmented how: what makes a training run resumable at any
step (a permutation per epoch fixed by (seed, epoch), this rank's share of it under torchrun,
each sample augmented under a seed of its own), and evaluation shards that count every image
exactly once."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler


def spread_seed(seed: int) -> int:
    """A run's seed spread out before an epoch, step or index is added to it (the samplers'
    orders, each sample's augmentation, a reseeded resume): runs seeded s and s + 1 (ensemble
    members) would otherwise draw each other's streams an epoch apart."""
    return seed * 1_000_003


class ShuffleSampler(Sampler[int]):
    """A random permutation per epoch drawn from (seed, epoch) alone, like DistributedSampler's
    shuffling on one process: `set_epoch(e)` before each epoch."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.length, self.seed, self.epoch = len(dataset), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(spread_seed(self.seed) + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def epoch_order(dataset_size: int, seed: int, rank: int = 0, world_size: int = 1) -> Sampler:
    """This rank's sample order: a permutation per epoch drawn from (seed, epoch), the same on
    every rank, sharded across ranks as DistributedSampler does (`.set_epoch(e)` before each
    epoch). On one process every index, in the permutation's order."""
    if world_size == 1:
        return ShuffleSampler(range(dataset_size), seed)
    return DistributedSampler(range(dataset_size), num_replicas=world_size, rank=rank,
                              shuffle=True, seed=spread_seed(seed))


class ShardSampler(Sampler[int]):
    """Rank r of w takes the contiguous indices [r*n//w, (r+1)*n//w): no padding, no repeats."""

    def __init__(self, dataset_size: int, rank: int, world_size: int) -> None:
        self.start = rank * dataset_size // world_size
        self.stop = (rank + 1) * dataset_size // world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


def eval_shard(dataset_size: int, rank: int, world_size: int) -> Sampler | None:
    """This rank's shard of an evaluation set (None for a single process): contiguous and
    disjoint, covering each image exactly once even when the set does not divide by the world
    size (torch's DistributedSampler pads the last shard with repeated images, which would
    bias the metrics)."""
    if world_size == 1:
        return None
    return ShardSampler(dataset_size, rank, world_size)


_MASK64 = 2**64 - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample `index`'s augmentation in `epoch` of a run seeded `seed`: (seed,
    epoch, index) in one 64-bit number, mixed by splitmix64's finaliser. torch's CPU generator
    keeps only a seed's low 32 bits, where the unmixed number gave sample i + 2 in epoch e + 2
    the draws of sample i in epoch e."""
    mixed = ((spread_seed(seed) + epoch) * 2_147_483_647 + index) & _MASK64
    mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (mixed ^ (mixed >> 31)) >> 1  # manual_seed takes at most 63 bits


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's global CPU generator seeded with `seed` inside, restored after (the
    transforms draw from it)."""
    with torch.random.fork_rng(devices=[]):
        # The CPU generator alone: torch.manual_seed also queues the seeding of every CUDA
        # device, recording a Python stack each time (about 100 us against 1 us).
        torch.default_generator.manual_seed(seed)
        yield


class SeededSamples(Dataset):
    """Index `epoch * n + i` -> sample i, augmented under a seed fixed by (seed, epoch, i).

    The augmentation a sample gets then does not depend on which worker process loads it, how
    many there are, or whether the run was interrupted. canon's transforms (and torchvision's)
    draw from torch's global generator, so seeding that one around each sample is enough; the
    caller's generator state is restored.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.size = dataset, seed, len(dataset)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int):
        epoch, index = divmod(key, self.size)
        with seeded(sample_seed(self.seed, epoch, index)):
            return self.dataset[index]


class EpochKeys(Sampler[int]):
    """The dataset keys the training loader reads this epoch, set before each epoch."""

    def __init__(self) -> None:
        self.keys: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class SeededOrder:
    """What a map-style training loader reads each epoch: `keys`, its sampler, set by
    `set_epoch(epoch, start)` to the SeededSamples keys of this rank's part of the epoch's
    permutation (epoch_order) from its sample `start` on (those before it a resumed run has
    taken), as canon.data.shards.ShardImages.set_epoch does for a stream."""

    def __init__(self, dataset_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.keys = dataset_size, EpochKeys()
        self.order = epoch_order(dataset_size, seed, rank, world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.order.set_epoch(epoch)
        self.keys.keys = [epoch * self.size + i for i in list(self.order)[start:]]
