"""HttpTeacher against real loopback HTTP servers: retries with backoff on 5xx / 429 /
timeouts / dropped connections / malformed replies, no retry on other 4xx, the concurrency
bound, and the API key taken from the environment variable named in the config."""

from __future__ import annotations

import socket

import pytest

from safer_dist.synth.teachers import HttpTeacher
from tests.stub_openai import StubServer


def teacher(url, **kw):
    kw = {"max_retries": 3, "backoff_s": 0.0, "max_backoff_s": 0.0, "timeout_s": 5.0, **kw}
    return HttpTeacher(url, "stub-model", **kw)


def test_retries_server_errors_then_succeeds():
    with StubServer(reply=lambda u: f"echo: {u}", plan=[503, 500, "ok"]) as s:
        (c,) = teacher(s.base_url).generate(["hello"], max_new_tokens=8, temperature=0.0)
        assert c.text == "echo: hello" and c.error is None and c.attempts == 3
        assert len(s.requests) == 3
        assert s.requests[0] == {"model": "stub-model", "messages": [{"role": "user", "content": "hello"}],
                                 "max_tokens": 8, "temperature": 0.0, "stream": False}


def test_429_honours_retry_after():
    with StubServer(plan=[429], retry_after="0") as s:
        # Retry-After: 0 wins over a 30 s backoff (the test would take 15 s+ otherwise).
        (c,) = teacher(s.base_url, backoff_s=30.0, max_backoff_s=60.0).generate(["x"], max_new_tokens=4, temperature=0.0)
        assert c.text == "ok" and c.attempts == 2


def test_dropped_and_garbled_replies_are_retried():
    with StubServer(plan=["drop", "garbage"]) as s:
        (c,) = teacher(s.base_url).generate(["x"], max_new_tokens=4, temperature=0.0)
        assert c.text == "ok" and c.attempts == 3, c


def test_client_errors_are_not_retried():
    with StubServer(plan=[400]) as s:
        (c,) = teacher(s.base_url).generate(["x"], max_new_tokens=4, temperature=0.0)
        assert c.text is None and c.attempts == 1 and len(s.requests) == 1
        assert "HTTP 400" in c.error and "scripted failure 400" in c.error


def test_timeout_then_retry():
    with StubServer(plan=["hang"]) as s:
        (c,) = teacher(s.base_url, timeout_s=0.3).generate(["x"], max_new_tokens=4, temperature=0.0)
        assert c.text == "ok" and c.attempts == 2 and len(s.requests) == 2


def test_gives_up_after_max_retries_with_the_last_error():
    with StubServer(plan=[503] * 10) as s:
        (c,) = teacher(s.base_url, max_retries=2).generate(["x"], max_new_tokens=4, temperature=0.0)
        assert c.text is None and c.attempts == 3 and len(s.requests) == 3 and "HTTP 503" in c.error


def test_unreachable_endpoint_is_an_error_per_prompt():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    outs = teacher(f"http://127.0.0.1:{port}/v1", max_retries=1).generate(["a", "b"], max_new_tokens=4, temperature=0.0)
    assert [o.text for o in outs] == [None, None]
    assert all("cannot reach" in o.error and o.attempts == 2 for o in outs)


def test_concurrency_is_bounded_and_order_kept():
    # every request waits until 3 are in flight (no timing): a bound of 3 shows as exactly 3
    with StubServer(reply=lambda u: u.upper(), hold_s=0.01, hold_until_inflight=3) as s:
        prompts = [f"p{i}" for i in range(9)]
        outs = teacher(s.base_url, max_concurrency=3).generate(prompts, max_new_tokens=4, temperature=0.0)
        assert [o.text for o in outs] == [p.upper() for p in prompts]
        assert s.max_inflight == 3


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    monkeypatch.setenv("SAFER_TEST_KEY", "sk-test-123")
    with StubServer() as s:
        teacher(s.base_url, api_key_env="SAFER_TEST_KEY").generate(["x"], max_new_tokens=4, temperature=0.0)
        assert s.headers[0]["Authorization"] == "Bearer sk-test-123"
    with StubServer() as s:
        teacher(s.base_url).generate(["x"], max_new_tokens=4, temperature=0.0)
        assert "Authorization" not in s.headers[0]
    monkeypatch.delenv("SAFER_TEST_KEY")
    with pytest.raises(ValueError, match="SAFER_TEST_KEY is not set"):
        teacher("http://127.0.0.1:1/v1", api_key_env="SAFER_TEST_KEY")


def test_backoff_doubles_with_jitter_and_is_capped():
    t = teacher("http://127.0.0.1:1/v1", backoff_s=1.0, max_backoff_s=5.0)
    delays = [t._delay(a, None) for a in range(5)]
    for a, d in enumerate(delays):
        full = min(5.0, 2.0**a)
        assert 0.5 * full <= d <= full
    assert t._delay(0, 100.0) == 5.0  # Retry-After is capped too
