"""The prefetch planners' calibration (scheduler.planners._Feedback): batched counting, learning, link limits."""

import numpy as np
import pytest

from scheduler.planners import Adaptive, PlanContext, PreSched, TopKPrefetch

NUM_EXPERTS, TOP_K = 16, 2


def context(step, pos, num_positions, scores, resident, num_slots=64, transfer_s=1e-3, compute_s=1e-3):
    return PlanContext(step=step, pos=pos, num_positions=num_positions, layer_of_pos=tuple(range(10, 10 + num_positions)),
                       top_k=TOP_K, num_slots=num_slots, scores=scores, resident=resident, transfer_s=transfer_s,
                       layer_compute_s=compute_s)


def drive(planner, steps, num_positions, seed=0):
    """Random scores, residency and routing through feedback and plan, as the engine calls them."""
    rng = np.random.default_rng(seed)
    for step in range(steps):
        pos = step % num_positions
        planner.feedback(pos, np.sort(rng.choice(NUM_EXPERTS, TOP_K, replace=False)))
        h = planner.horizon
        planner.plan(context(step, pos, num_positions, rng.random((h, NUM_EXPERTS)).astype(np.float32),
                             rng.random((h, NUM_EXPERTS)) < 0.4))
    planner.flush()
    return planner


@pytest.mark.parametrize("make, num_positions", [(lambda: PreSched(horizon=2), 3), (Adaptive, 5), (TopKPrefetch, 4)])
def test_batched_counts_equal_counting_each_outcome_at_once(make, num_positions):
    """The rank counts depend only on the rankings and outcomes, so batching them (with positions replanned
    before their queued outcomes are counted: 3 positions, horizon 2) must count exactly what counting each
    outcome at once does; only the probabilities the plans read lag."""
    at_once, batched = make(), make()
    at_once.FLUSH_EVERY, batched.FLUSH_EVERY = 1, 1000
    drive(at_once, 300, num_positions)
    drive(batched, 300, num_positions)
    for name in ("used", "seen", "used_absent", "seen_absent"):
        np.testing.assert_array_equal(getattr(at_once, name), getattr(batched, name), err_msg=name)
    assert at_once.seen[0, 0] == 299  # every outcome after the first plan was counted
    assert at_once.recall == pytest.approx(batched.recall)


def test_calibration_learns_which_ranks_are_used():
    """A predictor whose best guess is always used and whose second is never: after feedback, P(rank 0)
    approaches 1 and P(rank 1) approaches 0 (the prior is 0.85 for both)."""
    planner = PreSched()
    resident = np.zeros((1, NUM_EXPERTS), bool)
    for step in range(200):
        pos = step % 4
        scores = np.linspace(1, 0, NUM_EXPERTS, dtype=np.float32)[None]  # expert e ranked e
        planner.feedback(pos, np.array([0, 5]))  # rank 0 used, rank 1 never
        planner.plan(context(step, pos, 4, scores, resident))
    planner.flush()
    probs = planner.rank_probabilities(TOP_K)[0]
    assert probs[0] > 0.98 and probs[1] < 0.02 and 0.9 < probs[5] < 1.0
    keys, _ = planner.plan(context(200, 0, 4, scores, resident))
    assert (11, 0) in keys and (11, 1) not in keys  # layer of position 1; the never-used guess is not fetched


def test_presched_fits_prefetches_to_the_link_and_the_slots():
    """With a link four times slower than a layer's compute, one transfer (plus the one in flight) fits
    before the next layer: PreSched admits at most that many, and never more than the free slots."""
    planner = PreSched(horizon=1)
    scores = np.linspace(1, 0, NUM_EXPERTS, dtype=np.float32)[None]
    absent = np.zeros((1, NUM_EXPERTS), bool)
    slow = planner.plan(context(0, 0, 4, scores, absent, transfer_s=4e-3, compute_s=1e-3))[0]
    fast = PreSched(horizon=1).plan(context(0, 0, 4, scores, absent, transfer_s=1e-4, compute_s=1e-3))[0]
    tight = PreSched(horizon=1).plan(context(0, 0, 4, scores, absent, num_slots=TOP_K + 1, transfer_s=1e-4))[0]
    assert len(slow) == 1 and len(fast) == TOP_K and len(tight) == 1
    assert fast == [(11, 0), (11, 1)]  # likeliest first
