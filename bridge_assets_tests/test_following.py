"""Deployment follows the registry: the follower's decisions on each look at the service,
without Dagster or a service (the sensor's wiring is tested against a real Serve in
test_promotion_serving)."""

from bridge_assets.ml.following import FollowState, follow, refused

WANTED = {"production": "2", "staging": "3"}
RETRY = 300.0


def _look(state: FollowState, status: str = "serving", served: dict | None = None, now: float = 1000.0, in_flight: bool = False):
    return follow(state, WANTED, status, WANTED if served is None else served, "no answer", in_flight, now, RETRY)


def test_a_service_in_line_is_reported_once_then_remembered():
    first = _look(FollowState())
    assert (first.action, first.state.in_line) == ("report_in_line", WANTED)
    again = _look(first.state)
    assert again.action == "in_line" and again.state == first.state
    assert FollowState.from_json(again.state.to_json()) == again.state


def test_a_service_serving_other_versions_is_redeployed_once_per_retry_period():
    deploy = _look(FollowState(), served={"production": "1"})
    assert (deploy.action, deploy.drifted, deploy.state.requested_at) == ("deploy", False, 1000.0)
    waiting = _look(deploy.state, served={"production": "1"}, now=1000.0 + RETRY - 1)
    assert waiting.action == "none" and "requested 299 s ago" in waiting.reason
    assert _look(deploy.state, served={"production": "1"}, now=1000.0 + RETRY).action == "deploy"
    other_answer = _look(deploy.state, served={"production": "4"}, now=1001.0)
    assert other_answer.action == "deploy"  # the service changed again: not the request already made


def test_nothing_is_requested_while_a_deployment_runs():
    decision = _look(FollowState(), served={"production": "1"}, in_flight=True)
    assert decision.action == "none" and decision.state == FollowState()


def test_a_service_that_was_in_line_and_drifted_is_said_to_have_drifted():
    in_line = _look(FollowState()).state
    drifted = _look(in_line, served={"production": "9"})
    assert (drifted.action, drifted.drifted) == ("deploy", True)
    assert "serves {'production': '9'} where the registry says" in drifted.reason
    moved = follow(in_line, {"production": "4"}, "serving", {"production": "2"}, "", False, 1000.0, RETRY)
    assert (moved.action, moved.drifted) == ("deploy", False)  # the registry moved: a deploy, not a drift


def test_an_unreachable_service_is_reported_once_per_registry_state_and_never_deployed_to():
    for status in ("down", "unreadable"):
        reported = _look(FollowState(), status=status, served={})
        assert reported.action == "report_unreachable" and "no answer" in reported.reason
        assert _look(reported.state, status=status, served={}).action == "none"
        changed = follow(reported.state, {"production": "5"}, status, {}, "no answer", False, 1000.0, RETRY)
        assert changed.action == "report_unreachable"
    back = _look(_look(FollowState(), status="down", served={}).state)
    assert back.action == "report_in_line"  # recovery is said too


def test_a_refused_version_is_reported_once_and_forgotten_once_the_service_is_in_line():
    first = refused(FollowState(), "7", "v7 has no passing gate record")
    assert (first.action, first.state.refused) == ("report_refused", "7")
    assert refused(first.state, "7", "same").action == "none"
    assert refused(first.state, "8", "another").action == "report_refused"
    in_line = _look(first.state).state
    assert in_line.refused is None and refused(in_line, "7", "again").action == "report_refused"
