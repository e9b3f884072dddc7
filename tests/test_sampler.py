"""Set schedules and shard splitting (pure functions; the loader tests cover them end to end)."""

from collections import Counter

import pytest

from data_pipeline.sampler import batches_per_rank, set_schedule, split_shards


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


@pytest.mark.parametrize("n_shards,total", [(7, 3), (3, 3), (2, 5)])
def test_split_shards_covers_every_sample_exactly_once(n_shards, total):
    shards = [f"s{i}.tar" for i in range(n_shards)]
    samples_per_shard = 4
    seen = Counter()
    for g in range(total):
        mine, mod, rem = split_shards(shards, g, total, seed=0, epoch=0, set_name="det")
        assert mine, "a worker must never starve"
        idx = 0
        for s in mine:
            for k in range(samples_per_shard):
                if idx % mod == rem:
                    seen[(s, k)] += 1
                idx += 1
    assert set(seen) == {(s, k) for s in shards for k in range(samples_per_shard)}
    assert set(seen.values()) == {1}


def test_split_shards_order_depends_on_epoch():
    shards = [f"s{i}.tar" for i in range(16)]
    a = split_shards(shards, 0, 2, seed=0, epoch=0, set_name="det")[0]
    b = split_shards(shards, 0, 2, seed=0, epoch=1, set_name="det")[0]
    assert a != b
