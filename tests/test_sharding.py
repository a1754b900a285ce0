"""Data-parallel sharding of every kind of data (docs/distributed.md), in one process.

With ``shard=(rank, world)`` and a per-rank batch size B, rank r gets rows ``[r*B, (r+1)*B)``
of the global batch that one process takes with batch ``world * B``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from adasap.data import TensorImageSet, evaluation_source, load_dataset, training_source


def level_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with level i: a batch shows which images it holds."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 6, 6)
    return images.contiguous(), torch.arange(n) % 4


def data_of(kind: str, n: int = 21):
    images, labels = level_images(n)
    if kind == "image_set":
        return TensorImageSet(images, labels)
    if kind == "pair":
        return images, labels
    return TensorDataset(images.float() / 255, labels)


def epochs(data, batch_size: int, shard=(0, 1), augment=True) -> list:
    source = training_source(data, batch_size=batch_size, seed=3, shard=shard, augment=augment)
    return [list(source.epoch(epoch)) for epoch in (0, 1)], len(source)


@pytest.mark.parametrize("kind", ["image_set", "pair", "dataset"])
def test_each_rank_trains_on_its_rows_of_the_global_batch(kind):
    data = data_of(kind)
    whole, steps = epochs(data, 6)  # one process, global batch 2 x 3
    parts = [epochs(data, 3, shard=(rank, 2)) for rank in (0, 1)]
    assert steps == parts[0][1] == parts[1][1] == 3  # 21 // 6: every rank as many steps
    for epoch, batches in enumerate(whole):
        for step, (x, y) in enumerate(batches):
            for rank, (theirs, _) in enumerate(parts):
                mine_x, mine_y = theirs[epoch][step]
                rows = slice(3 * rank, 3 * rank + 3)
                assert torch.equal(mine_x, x[rows]) and torch.equal(
                    mine_y, y[rows]
                )  # augmented too
    assert not torch.equal(whole[0][0][1], whole[1][0][1])  # a new order every epoch


@pytest.mark.parametrize("kind", ["image_set", "pair", "dataset"])
def test_evaluation_shards_hold_every_image_once(kind):
    data = data_of(kind, 23)
    seen = []
    for rank in range(3):
        for x, _ in evaluation_source(data, batch_size=4, shard=(rank, 3)).epoch(0):
            seen += (x[:, 0, 0, 0] * 255).round().long().tolist()
    assert sorted(seen) == list(range(23))


def test_image_folders_load_only_their_rank_s_images(tmp_path):
    from PIL import Image

    for split, n in (("train", 6), ("val", 2)):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                level = 20 * i + (100 if cls == "b" else 0)
                pixels = np.full((8, 8, 3), level, dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    train = load_dataset(f"imagefolder:{tmp_path}", image_size=8, num_workers=0).train
    whole = epochs(train, 4, augment=False)[0][0]
    parts = [epochs(train, 2, shard=(rank, 2), augment=False)[0][0] for rank in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole) == len(train) // 4
    for step, (x, y) in enumerate(whole):
        for rank in (0, 1):
            assert torch.equal(parts[rank][step][0], x[2 * rank : 2 * rank + 2])
            assert torch.equal(parts[rank][step][1], y[2 * rank : 2 * rank + 2])


def test_lists_and_loaders_are_shared_out_batch_by_batch():
    images, labels = level_images(10)
    listed = [(images[i : i + 2], labels[i : i + 2]) for i in range(0, 10, 2)]  # 5 batches
    firsts = []
    for rank in (0, 1):
        source = training_source(listed, batch_size=2, shard=(rank, 2))
        assert len(source) == 2  # as many steps on every rank: the fifth batch is left out
        firsts.append([int(x[0, 0, 0, 0] * 255) for x, _ in source.epoch(0)])
    assert firsts == [[0, 4], [2, 6]]
    evaluated = [
        [int(x[0, 0, 0, 0] * 255) for x, _ in evaluation_source(listed, shard=(r, 2)).epoch(0)]
        for r in (0, 1)
    ]
    assert evaluated == [[0, 4, 8], [2, 6]]  # evaluation: every batch once


def test_a_loader_with_a_distributed_sampler_is_used_as_given():
    dataset = TensorDataset(*level_images(8))
    sampler = DistributedSampler(dataset, num_replicas=2, rank=1, shuffle=False)
    loader = DataLoader(dataset, batch_size=2, sampler=sampler)
    source = training_source(loader, batch_size=2, shard=(1, 2))
    assert len(source) == len(loader) == 2
    assert [y.tolist() for _, y in source.epoch(0)] == [y.tolist() for _, y in loader]
