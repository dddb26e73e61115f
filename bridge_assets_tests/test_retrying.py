"""The one poll and the one retry every supervisor, the deploy path, the alerts and the demo use."""

import logging
import time

import pytest

from bridge_assets.monitoring.alerts import LoopEvent, send_alert
from bridge_assets.retrying import poll, retried
from bridge_assets_tests.webhook import alert_sink
from serving.processes import free_port


def test_poll_returns_the_first_truthy_value_or_none_at_the_deadline():
    answers = iter([None, 0, "", "ready", "later"])
    assert poll(lambda: next(answers), timeout=5, every=0.01) == "ready"
    started = time.monotonic()
    assert poll(lambda: False, timeout=0.2, every=0.05) is None
    assert time.monotonic() - started >= 0.2
    assert poll(lambda: "at once", timeout=0) == "at once"  # checked once even with no time left


def test_poll_lets_the_condition_give_up_early():
    def exited() -> bool:
        raise RuntimeError("the server exited while starting")

    with pytest.raises(RuntimeError, match="exited"):
        poll(exited, timeout=60)


def test_retried_tries_again_only_on_the_named_errors_with_doubling_waits():
    calls = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError(f"attempt {len(calls)}")
        return "done"

    assert retried(flaky, 3, retry_on=ConnectionError, backoff=0.05) == "done" and len(calls) == 3
    assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.1  # the waits double

    calls.clear()
    with pytest.raises(ConnectionError, match="attempt 2"):
        retried(flaky, 2, retry_on=ConnectionError)  # the last error propagates
    with pytest.raises(ValueError, match="not retried"):
        retried(lambda: (_ for _ in ()).throw(ValueError("not retried")), 5, retry_on=ConnectionError)
    with pytest.raises(ValueError, match="at least 1"):
        retried(lambda: None, 0)


def test_an_alert_is_retried_through_an_endpoint_s_bad_moment_and_given_up_on_with_a_warning(caplog):
    event = LoopEvent("gates_failed", "v4 failed the baseline gate", "housing-price", "4", {"gate": "baseline"})
    with alert_sink(failures=2) as sink:
        assert send_alert(sink.url, event, attempts=3, backoff=0.01)
        assert sink.refused == 2 and sink.kinds() == ["gates_failed"]
    with alert_sink(failures=3) as sink, caplog.at_level(logging.WARNING):
        assert not send_alert(sink.url, event, attempts=3, backoff=0.01)
        assert sink.refused == 3 and sink.received == []
    assert "not delivered" in caplog.text and "HTTP 503" in caplog.text
    assert not send_alert(f"http://127.0.0.1:{free_port()}/hook", event, attempts=2, backoff=0.01)  # refused
