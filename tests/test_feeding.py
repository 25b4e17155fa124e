"""Normalisation statistics and the batch feeder (latent_ddpm/feeding.py). All data is tiny."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from latent_ddpm.data import DataError, dataset_from_arrays
from latent_ddpm.feeding import LatentFeeder, LatentStats, compute_stats

#: 53 samples: with batch 4 and 2 ranks there are 6 global batches and 5 samples dropped.
N, C, H, W = 53, 3, 4, 4


@pytest.fixture(scope="module")
def xy():
    rng = np.random.default_rng(1)
    scale, offset = np.array([2.0, 5.0, 0.5]), np.array([0.5, -1.0, 3.0])
    x = rng.standard_normal((N, C, H, W)) * scale[:, None, None] + offset[:, None, None]
    return x.astype(np.float32), np.arange(N) % 5


@pytest.fixture(scope="module")
def ds(xy):
    return dataset_from_arrays(*xy)


# ----------------------------------------------------------------------------- statistics

def test_channel_stats_match_numpy(ds, xy, monkeypatch):
    import latent_ddpm.feeding as feeding
    calls = []  # force several chunks so that the streaming merge is exercised
    real = feeding.iter_chunks
    monkeypatch.setattr(feeding, "iter_chunks", lambda d, rows=None, **k: calls.append(1) or real(d, rows=7, **k))
    stats = compute_stats(ds, "channel")
    x = xy[0].astype(np.float64)
    np.testing.assert_allclose(stats.mean, x.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(stats.std, x.std(axis=(0, 2, 3)), rtol=1e-10)
    assert stats.mode == "channel" and calls


def test_global_scaling_and_none(ds, xy):
    x = xy[0].astype(np.float64)
    glob = compute_stats(ds, "global")
    np.testing.assert_allclose(glob.mean, [x.mean()] * C, rtol=1e-10)
    np.testing.assert_allclose(glob.std, [x.std()] * C, rtol=1e-10)
    scaled = compute_stats(ds, scaling_factor=0.18215)
    assert scaled.mode == "scale" and scaled.mean == [0.0] * C
    np.testing.assert_allclose(scaled.std, [1 / 0.18215] * C)
    none = compute_stats(ds, "none")
    t = torch.randn(2, C, H, W)
    assert none.mean is None and none.normalize(t) is t
    with pytest.raises(DataError, match="unknown normalisation mode"):
        compute_stats(ds, "pixel")


def test_stats_normalize_round_trip_and_json(ds, xy):
    stats = compute_stats(ds)
    x = torch.from_numpy(xy[0])
    z = stats.normalize(x)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(C), atol=1e-5)
    assert torch.allclose(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(C), atol=1e-5)
    assert torch.allclose(stats.denormalize(z), x, atol=1e-5)
    assert torch.allclose(stats.normalize(x[0]), z[0])  # (C, H, W) works too
    again = LatentStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats


# ----------------------------------------------------------------------------- feeder

def test_two_ranks_disjoint_and_complete(ds):
    feeders = [LatentFeeder(ds, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(feeders[0]) == len(feeders[1]) == N // 8
    idx = [torch.cat(f.rank_indices(epoch=5)) for f in feeders]
    assert not set(idx[0].tolist()) & set(idx[1].tolist())
    perm, _ = feeders[0].epoch_order(5)
    assert sorted(idx[0].tolist() + idx[1].tolist()) == sorted(perm[:len(feeders[0]) * 8].tolist())
    # and the batches really hold those samples
    x = torch.cat([b[0] for b in feeders[1].epoch_batches(5)])
    assert torch.equal(x, feeders[1].latents[idx[1]])


@pytest.mark.parametrize("start_step", [0, 3])
def test_layouts_of_one_global_batch_feed_the_same_samples_per_step(ds, start_step):
    # What lets a resume change the processes, batch size and accumulation together (checkpointing.BATCH_LAYOUT):
    # with the same product, every optimizer step (resumed at any step) sees the same samples.
    def per_step(batch: int, world: int, accumulation: int) -> list[list[int]]:
        feeders = [LatentFeeder(ds, batch, seed=3, rank=r, world_size=world) for r in range(world)]
        steps = len(feeders[0]) // accumulation
        ranks = [f.rank_indices(epoch=2, start_batch=start_step * accumulation) for f in feeders]
        return [sorted(torch.cat([r[(s - start_step) * accumulation + i] for r in ranks for i in range(accumulation)])
                       .tolist()) for s in range(start_step, steps)]

    reference = per_step(8, 1, 1)
    assert len(reference) == N // 8 - start_step
    for layout in [(4, 2, 1), (4, 1, 2), (2, 2, 2), (1, 4, 2)]:
        assert per_step(*layout) == reference, layout
    assert per_step(4, 1, 1)[:1] != reference[:1]  # another global batch: other steps


def test_order_depends_on_seed_and_epoch(ds):
    f = LatentFeeder(ds, 4, seed=3)
    assert torch.equal(f.epoch_order(1)[0], LatentFeeder(ds, 4, seed=3).epoch_order(1)[0])
    assert not torch.equal(f.epoch_order(1)[0], f.epoch_order(2)[0])
    assert not torch.equal(f.epoch_order(1)[0], LatentFeeder(ds, 4, seed=4).epoch_order(1)[0])


@pytest.mark.parametrize("in_memory", [True, False])
def test_resume_mid_epoch_gives_the_tail(ds, in_memory):
    f = LatentFeeder(ds, 5, seed=0, random_flip=True, in_memory=in_memory)
    full = list(f.epoch_batches(2))
    tail = list(f.epoch_batches(2, start_batch=4))
    assert len(tail) == len(full) - 4
    for (a, la), (b, lb) in zip(full[4:], tail, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_in_memory_and_dataloader_paths_identical(ds):
    kw = dict(seed=7, rank=1, world_size=2, random_flip=True)
    mem = LatentFeeder(ds, 3, in_memory=True, **kw)
    auto_disk = LatentFeeder(ds, 3, memory_budget_bytes=0, num_workers=1, **kw)
    assert mem.in_memory and not auto_disk.in_memory
    a, b = list(mem.epoch_batches(1)), list(auto_disk.epoch_batches(1))
    assert len(a) == len(b) == len(mem)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.dtype == xb.dtype == torch.float32 and ya.dtype == yb.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_the_dataloader_path_leaves_the_global_generator_alone(ds, num_workers):
    # Dropout draws from torch's global generator. A DataLoader took its workers' base seed from it at every epoch
    # start, and once more at a resume mid-epoch: a streamed run with dropout resumed off the uninterrupted run's
    # dropout masks, and trained otherwise than the same run with its data in memory.
    f = LatentFeeder(ds, 4, seed=0, in_memory=False, num_workers=num_workers)
    before = torch.get_rng_state()
    assert len(list(f.epoch_batches(0))) == len(f) and len(list(f.epoch_batches(1, start_batch=3))) == len(f) - 3
    assert torch.equal(before, torch.get_rng_state())


def test_flip_is_deterministic_and_per_sample(ds, xy):
    plain = LatentFeeder(ds, 4, seed=9)
    flip = LatentFeeder(ds, 4, seed=9, random_flip=True)
    assert torch.equal(torch.cat([x for x, _ in flip.epoch_batches(0)]),
                       torch.cat([x for x, _ in LatentFeeder(ds, 4, seed=9, random_flip=True).epoch_batches(0)]))
    idx = torch.cat(flip.rank_indices(0))
    _, flags = flip.epoch_order(0)
    got = torch.cat([x for x, _ in flip.epoch_batches(0)])
    raw = torch.from_numpy(xy[0])[idx]
    expect = torch.where(flags[idx].view(-1, 1, 1, 1), raw.flip(-1), raw)
    assert torch.equal(got, expect) and 0 < flags[idx].sum() < len(idx)
    assert torch.equal(torch.cat([x for x, _ in plain.epoch_batches(0)]), raw)  # off by default


def test_unlabelled_and_too_small(xy):
    ds = dataset_from_arrays(xy[0])
    x, y = next(LatentFeeder(ds, 4, seed=0).epoch_batches(0))
    assert y is None and x.shape == (4, C, H, W)
    with pytest.raises(DataError, match="fewer than one global batch"):
        LatentFeeder(ds, 30, seed=0, world_size=2)
