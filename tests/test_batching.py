"""TensorBatches: DistributedSampler's order and sharding, one gather per batch, resumable mid-epoch."""

import pytest
import torch
from torch.utils.data import DistributedSampler, TensorDataset

from noisy_lightning.batching import TensorBatches


def rows_served(batches: TensorBatches) -> list[int]:
    return torch.cat([batch[0] for batch in batches]).tolist()


@pytest.mark.parametrize("num_replicas", [1, 2, 3])
@pytest.mark.parametrize("shuffle", [False, True])
def test_training_order_is_distributed_samplers(num_replicas: int, shuffle: bool) -> None:
    total, epoch = 23, 4
    for rank in range(num_replicas):
        batches = TensorBatches(
            (torch.arange(total),), 5, shuffle=shuffle, seed=11, num_replicas=num_replicas, rank=rank, pad=True
        )
        batches.set_epoch(epoch)
        sampler = DistributedSampler(
            TensorDataset(torch.arange(total)), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=11
        )
        sampler.set_epoch(epoch)
        assert rows_served(batches) == list(sampler)
        assert len(batches) == -(-len(sampler) // 5)


def test_evaluation_shards_cover_every_row_exactly_once() -> None:
    shards = [TensorBatches((torch.arange(23),), 4, num_replicas=3, rank=rank, pad=False) for rank in range(3)]
    served = sorted(row for shard in shards for row in rows_served(shard))
    assert served == list(range(23))
    assert [shard.num_rows for shard in shards] == [8, 8, 7]


def test_order_depends_on_seed_and_epoch_only() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        batches = TensorBatches((torch.arange(50),), 7, shuffle=True, seed=seed)
        batches.set_epoch(epoch)
        torch.manual_seed(epoch * 1000 + 17)  # the global RNG must not matter
        return rows_served(batches)

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)
    assert sorted(order(0, 1)) == list(range(50))


def test_every_tensor_is_cut_by_the_same_rows() -> None:
    images, labels = torch.randn(30, 4), torch.arange(30) % 3
    for x, y, index in TensorBatches((images, labels, torch.arange(30)), 8, shuffle=True, seed=2):
        assert torch.equal(x, images[index]) and torch.equal(y, labels[index])


def test_resuming_from_a_mid_epoch_state_serves_the_rest_of_that_epoch() -> None:
    uninterrupted = TensorBatches((torch.arange(40),), 6, shuffle=True, seed=5)
    uninterrupted.set_epoch(3)
    expected = [batch[0].tolist() for batch in uninterrupted]

    interrupted = TensorBatches((torch.arange(40),), 6, shuffle=True, seed=5)
    interrupted.set_epoch(3)
    iterator = iter(interrupted)
    first = [next(iterator)[0].tolist() for _ in range(2)]
    state = interrupted.state_dict()
    assert state == {"epoch": 3, "batches_served": 2}

    resumed = TensorBatches((torch.arange(40),), 6, shuffle=True, seed=5)
    resumed.load_state_dict(state)
    resumed.set_epoch(3)
    assert first + [batch[0].tolist() for batch in resumed] == expected
    # the skip applies once: the next pass over the same epoch is whole again
    assert [batch[0].tolist() for batch in resumed] == expected


def test_a_state_from_an_earlier_epoch_does_not_skip_anything() -> None:
    batches = TensorBatches((torch.arange(12),), 5, shuffle=True, seed=0)
    batches.load_state_dict({"epoch": 1, "batches_served": 3})
    batches.set_epoch(2)
    assert sorted(rows_served(batches)) == list(range(12))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": 4, "rank": 2, "num_replicas": 2}, r"rank must be in \[0, num_replicas=2\)"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TensorBatches((torch.arange(3),), **kwargs)


def test_tensors_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="same first dimension"):
        TensorBatches((torch.arange(3), torch.arange(4)), 2)
