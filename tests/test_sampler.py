"""Set schedules and the split of frames over workers (pure functions; the loader tests cover them end to end)."""

from collections import Counter

import pytest

from data_pipeline.loading.sampler import batches_per_rank, frame_ranges, frames_needed, set_schedule, split_frames


def test_round_robin_takes_one_batch_from_each_set_in_turn():
    sched = set_schedule({"det": 3, "seg": 3, "track": 3}, "round_robin", seed=0, epoch=0)
    assert sched == ["det", "seg", "track"] * 3


def test_round_robin_spreads_small_set_and_never_oversamples():
    sched = set_schedule({"det": 12, "seg": 3, "track": 6}, "round_robin", seed=0, epoch=0)
    assert Counter(sched) == {"det": 12, "seg": 3, "track": 6}
    seg_steps = [i for i, s in enumerate(sched) if s == "seg"]
    # Spread out: one seg batch in each third of the epoch, not all at the start.
    n = len(sched)
    assert [int(3 * i / n) for i in seg_steps] == [0, 1, 2]
    # No long stretch without a seg or track batch at the start (not "det first").
    assert "track" in sched[:4]


@pytest.mark.parametrize("mode", ["none", "uniform", "weighted"])
def test_stochastic_modes_are_seeded_by_seed_and_epoch(mode):
    counts = {"det": 20, "seg": 5, "track": 10}
    a = set_schedule(counts, mode, seed=1, epoch=2)
    assert a == set_schedule(counts, mode, seed=1, epoch=2)
    assert len(a) == 35
    assert a != set_schedule(counts, mode, seed=1, epoch=3)


def test_none_mode_is_a_permutation_of_all_batches():
    counts = {"det": 20, "seg": 5, "track": 10}
    assert Counter(set_schedule(counts, "none", seed=0, epoch=0)) == counts


def test_weighted_mode_follows_set_sizes():
    counts = {"det": 900, "seg": 100}
    c = Counter(set_schedule(counts, "weighted", seed=0, epoch=0))
    assert 800 < c["det"] < 980
    u = Counter(set_schedule(counts, "uniform", seed=0, epoch=0))
    assert 400 < u["seg"] < 600  # uniform oversamples the small set


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="bogus"):
        set_schedule({"det": 1}, "bogus", seed=0, epoch=0)


def test_batches_per_rank_drops_the_partial_batch():
    assert batches_per_rank(25, world_size=3, batch_size=4) == 2
    assert batches_per_rank(5, world_size=3, batch_size=4) == 0


@pytest.mark.parametrize("needs,available", [([4, 4, 4], 12), ([6, 2, 8, 0, 2], 21), ([1], 1), ([3, 5], 9), ([0, 0], 7)])
def test_frame_ranges_are_contiguous_and_hold_each_need(needs, available):
    ranges = frame_ranges(needs, available)
    assert len(ranges) == len(needs)
    assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    if sum(needs):
        assert ranges[-1][1] == available
    assert all(hi - lo >= n for (lo, hi), n in zip(ranges, needs))


@pytest.mark.parametrize("shard_frames", [(4, 4, 4, 4, 4, 1), (32, 8), (1, 9, 2, 7, 3)])
@pytest.mark.parametrize("workers", [1, 3, 8])
def test_split_frames_gives_each_frame_to_at_most_one_worker_and_each_worker_its_need(shard_frames, workers):
    total = sum(shard_frames)
    needs = [total // workers - (g % 2) for g in range(workers)]  # unequal needs, as hand-offs make them
    seen = Counter()
    for g in range(workers):
        part = split_frames(shard_frames, needs, g, seed=0, epoch=3, set_name="det")
        assert sum(stop - start for _, start, stop in part) >= needs[g]
        for shard, start, stop in part:
            assert 0 <= start < stop <= shard_frames[shard]
            seen.update((shard, k) for k in range(start, stop))
    assert set(seen.values()) <= {1}
    assert len(seen) == total, "the surplus is spread over the workers, not left out"


def test_split_frames_order_depends_on_the_epoch():
    shards = [5] * 16
    a = split_frames(shards, [40, 40], 0, seed=0, epoch=0, set_name="det")
    b = split_frames(shards, [40, 40], 0, seed=0, epoch=1, set_name="det")
    assert a != b


def test_frames_needed_counts_each_workers_steps_per_set_on_every_rank():
    schedule = ["det", "seg", "det", "track", "det"]
    needs = frames_needed(schedule, [[range(0, 1), range(2, 4)], [range(1, 2), range(4, 5)]], world_size=2, batch_size=3)
    assert needs == {"det": [6, 3, 6, 3], "seg": [0, 3, 0, 3], "track": [3, 0, 3, 0]}


@pytest.mark.parametrize(("shards", "size", "workers"), [(70, 100, 32), (700, 10, 32), (20, 50, 64)])
def test_split_frames_reads_each_shard_about_once(shards, size, workers):
    # a worker that must read its first shard from the start (required tasks), its other shards
    # only as far as it needs: the frames read per epoch stay near 1 + G / (2 S) times the set's
    # (README, ARCHITECTURE)
    total = shards * size
    read = 0
    for g in range(workers):
        part = split_frames([size] * shards, [total // workers] * workers, g, seed=1, epoch=0, set_name="seg")
        read += part[0][1] + sum(stop - start for _, start, stop in part)
        assert len(part) <= -(-total // workers // size) + 1, "a worker's range is contiguous"
    assert read / total <= 1 + workers / (2 * shards) + 0.05
