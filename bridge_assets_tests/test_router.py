"""The A/B router as a pure function: the split follows the weight, each client stays on its
side, a larger weight only moves clients to staging, and the salt reshuffles."""

import pytest

from serving.router import ExperimentConfig, assign

CLIENTS = [f"client-{i}" for i in range(5_000)]


@pytest.mark.parametrize("weight", [0.1, 0.25, 0.5, 0.9])
def test_the_split_is_within_three_points_of_the_weight_and_sticky(weight):
    first = [assign("exp-1", client, weight) for client in CLIENTS]
    share = first.count("staging") / len(CLIENTS)
    assert abs(share - weight) <= 0.03, share
    assert [assign("exp-1", client, weight) for client in CLIENTS] == first  # sticky per client


def test_a_larger_weight_only_moves_clients_from_production_to_staging():
    before = {c: assign("exp-1", c, 0.1) for c in CLIENTS}
    after = {c: assign("exp-1", c, 0.5) for c in CLIENTS}
    moved = [c for c in CLIENTS if before[c] != after[c]]
    assert moved and all(before[c] == "production" and after[c] == "staging" for c in moved)


def test_weights_zero_and_one_send_everyone_one_way_and_a_new_salt_reshuffles():
    assert {assign("s", c, 0.0) for c in CLIENTS} == {"production"}
    assert {assign("s", c, 1.0) for c in CLIENTS} == {"staging"}
    one = [assign("salt-a", c, 0.5) for c in CLIENTS]
    other = [assign("salt-b", c, 0.5) for c in CLIENTS]
    assert 0.4 < sum(a != b for a, b in zip(one, other, strict=True)) / len(CLIENTS) < 0.6  # independent halves


def test_an_experiment_refuses_a_weight_outside_zero_to_one():
    assert ExperimentConfig("s", 0.3).variant_for("client-1") == assign("s", "client-1", 0.3)
    with pytest.raises(ValueError, match="staging_weight"):
        ExperimentConfig("s", 1.5)


def test_the_canary_share_keeps_the_previous_version_for_its_clients_and_takes_none_from_staging():
    """During a post-deploy watch the previous version keeps 10% of clients: from production's
    side only (a staging client stays on staging), sticky, and gone when the watch ends."""
    during = {c: assign("s", c, 0.5, 0.1) for c in CLIENTS}
    without = {c: assign("s", c, 0.5) for c in CLIENTS}
    share = sum(v == "previous" for v in during.values()) / len(CLIENTS)
    assert abs(share - 0.1) <= 0.03, share
    assert all(without[c] == "production" for c in CLIENTS if during[c] == "previous")
    assert all(during[c] == without[c] for c in CLIENTS if during[c] != "previous")
    assert {c: assign("s", c, 0.5, 0.1) for c in CLIENTS} == during  # sticky
    with pytest.raises(ValueError, match="must not exceed 1"):
        ExperimentConfig("s", 0.95, 0.1)
