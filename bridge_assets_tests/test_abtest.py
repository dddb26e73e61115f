"""A/B statistics without servers: power for a real gap, false promotions under no difference,
intervals and sample sizes."""

import numpy as np
import pytest
from scipy import stats

from bridge_assets.core.abtest import compare_variants, per_client_mae, required_clients, summarise


def arm(rng: np.random.Generator, clients: int, labels_per_client: int, scale: float, tag: str):
    """Errors of one arm: heavy-ish tails (t with 4 df) and clients that differ in how hard
    their houses are (a per-client scale), as sticky per-client assignment produces."""
    client_scale = rng.lognormal(0.0, 0.3, clients)
    ids = np.repeat([f"{tag}-{i}" for i in range(clients)], labels_per_client)
    errors = scale * np.repeat(client_scale, labels_per_client) * rng.standard_t(4, clients * labels_per_client)
    return errors, ids


def test_a_10_percent_mae_gap_is_found_with_2000_labels_per_arm():
    rng = np.random.default_rng(7)
    production = arm(rng, 400, 5, 1_000_000, "p")
    staging = arm(rng, 400, 5, 900_000, "s")  # 10% lower MAE
    report = compare_variants(*production, *staging, min_effect=0.05)
    assert report.production.labels == report.staging.labels == 2000
    assert report.verdict == "promote", report.reason
    assert report.difference < 0 and report.difference_ci[1] < 0 and report.p_value < 0.05
    assert report.relative_difference == pytest.approx(-0.10, abs=0.05)
    # Half the minimum effect needs four times the sample.
    ten = compare_variants(*production, *staging, min_effect=0.10)
    assert report.required_clients_per_arm == pytest.approx(4 * ten.required_clients_per_arm, rel=0.02)
    # The same gap the other way round keeps Production.
    assert compare_variants(*staging, *production).verdict == "keep"


def test_a_10_percent_mae_gap_is_found_in_at_least_80_percent_of_200_seeded_runs():
    """The power the README claims, not one lucky seed: 2,000 labels per arm (400 clients x 5),
    staging 10% better, the default minimum effect; never the wrong way round."""
    verdicts = []
    for seed in range(200):
        rng = np.random.default_rng(5000 + seed)
        report = compare_variants(*arm(rng, 400, 5, 1_000_000, "p"), *arm(rng, 400, 5, 900_000, "s"), min_effect=0.05)
        verdicts.append(report.verdict)
    assert verdicts.count("promote") >= 160, f"power {verdicts.count('promote') / 200:.1%} over 200 runs"
    assert verdicts.count("keep") == 0  # a better challenger is never judged worse


def test_no_real_difference_promotes_at_most_5_percent_of_200_seeded_runs():
    verdicts = []
    for seed in range(200):
        rng = np.random.default_rng(1000 + seed)
        report = compare_variants(*arm(rng, 200, 5, 1_000_000, "p"), *arm(rng, 200, 5, 1_000_000, "s"))
        verdicts.append(report.verdict)
    promoted = verdicts.count("promote")
    assert promoted <= 10, f"{promoted} of 200 null runs said promote"
    assert verdicts.count("inconclusive") + verdicts.count("keep") >= 190


def test_too_little_feedback_is_inconclusive_and_says_what_it_needs():
    rng = np.random.default_rng(3)
    report = compare_variants(*arm(rng, 20, 2, 1_000_000, "p"), *arm(rng, 20, 2, 950_000, "s"))
    assert report.verdict == "inconclusive" and "needs ~" in report.reason
    assert report.required_clients_per_arm > 20
    empty = compare_variants(*arm(rng, 20, 2, 1e6, "p"), np.array([]), np.array([]))
    assert empty.verdict == "inconclusive" and "too few clients" in empty.reason


def test_intervals_and_sample_size_match_textbook_values():
    rng = np.random.default_rng(5)
    errors = rng.normal(0, 1000, 5000)
    clients = np.arange(5000).astype(str)  # one label per client: the plain CI
    summary = summarise("production", errors, clients)
    low, high = summary.mae_ci
    se = np.abs(errors).std(ddof=1) / np.sqrt(5000)
    assert low == pytest.approx(summary.mae - 1.96 * se, rel=1e-3) and high == pytest.approx(summary.mae + 1.96 * se, rel=1e-3)
    assert summary.rmse == pytest.approx(np.sqrt(np.mean(errors**2)))
    assert summary.rmse_ci[0] < summary.rmse < summary.rmse_ci[1]
    # Two-sample z formula: 2 (z_.975 + z_.8)^2 sd^2 / effect^2 = 15.7 → 16 per arm for effect = sd.
    assert required_clients(1.0, 1.0, 0.05, 0.8) == 16
    assert per_client_mae(np.array([1.0, -3.0, 5.0]), np.array(["a", "a", "b"])).tolist() == [2.0, 5.0]
    # Welch's t as scipy computes it on per-client MAEs.
    a, b = rng.normal(10, 2, 50), rng.normal(11, 3, 40)
    report = compare_variants(a, np.arange(50).astype(str), b, np.arange(40).astype(str))
    expected = stats.ttest_ind(np.abs(b), np.abs(a), equal_var=False)
    assert report.t_statistic == pytest.approx(expected.statistic) and report.p_value == pytest.approx(expected.pvalue)
