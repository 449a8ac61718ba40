"""Pure helpers of the AMPS adapter: credentials in URIs, redaction, reconnect backoff."""

from __future__ import annotations

import threading

from ampsflow.adapters.amps import _Backoff, _redact, _with_credentials, default_client_name


class TestCredentials:
    def test_user_and_password_are_added(self) -> None:
        """User and password go into the URI's userinfo, URL-quoted."""
        assert "tcp://ops:p%40ss%3Aw@amps:9007/amps/json" == _with_credentials(
            "tcp://amps:9007/amps/json", "ops", "p@ss:w"
        )

    def test_no_user_leaves_uri(self) -> None:
        """Without a user the URI is unchanged."""
        assert "tcp://amps:9007/amps/json" == _with_credentials(
            "tcp://amps:9007/amps/json", None, None
        )

    def test_redaction_hides_password(self) -> None:
        """Redacted URIs keep the user and hide the password."""
        assert "tcp://ops:***@amps:9007/amps/json" == _redact(
            "tcp://ops:secret@amps:9007/amps/json"
        )

    def test_default_client_name_is_stable(self) -> None:
        """The default client name is the same on every call (publish store recovery)."""
        assert default_client_name("processor") == default_client_name("processor")


class TestBackoff:
    def test_first_attempt_does_not_wait(self) -> None:
        """The first connection attempt starts at once."""
        backoff = _Backoff(30.0, threading.Event)
        assert backoff.get_connect_wait_duration("tcp://a:1/amps/json") == 0

    def test_waits_are_capped_and_interruptible(self) -> None:
        """A set event ends every wait at once, however far the backoff has grown."""
        event = threading.Event()
        event.set()
        backoff = _Backoff(3600.0, lambda: event)
        results = [backoff.get_connect_wait_duration("tcp://a:1/amps/json") for _ in range(40)]
        assert [0] * 40 == results

    def test_ceiling_never_exceeds_the_maximum(self) -> None:
        """The delay before an attempt is at most the configured maximum."""
        waits: list[float] = []

        class Recorder(threading.Event):
            def wait(self, timeout: float | None = None) -> bool:
                waits.append(timeout or 0.0)
                return True

        backoff = _Backoff(2.0, Recorder)
        for _ in range(20):
            backoff.get_connect_wait_duration("tcp://a:1/amps/json")
        assert (True, True) == (max(waits) <= 2.0, min(waits) > 0)

    def test_reset_starts_over(self) -> None:
        """After a successful connection the next attempt starts at once again."""
        event = threading.Event()
        event.set()
        backoff = _Backoff(2.0, lambda: event)
        backoff.get_connect_wait_duration("u")
        backoff.get_connect_wait_duration("u")
        backoff.reset()
        assert backoff.get_connect_wait_duration("u") == 0
