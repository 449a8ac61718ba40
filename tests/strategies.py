"""Hypothesis strategies shared by the property tests, and the test profiles.

Profiles: ``ci`` (the default; bounded so the suite stays fast) and ``long``
for a deeper run, e.g. ``HYPOTHESIS_PROFILE=long python -m pytest
tests/integration/test_marker_server.py -k property``.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "long",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# -- HTTP requests to the marker ---------------------------------------------------

HOSTILE_HOSTS = (
    "evil.example",
    "evil.example:8080",
    "127.0.0.1.evil.example",
    "localhost.evil.example:80",
    "[::2]:8080",
    "",
    " ",
    "a b",
    "127.0.0.1:99999",
    "127.0.0.1:x",
    "[::1",
    "xn--80ak6aa92e.com",
    "@127.0.0.1",
)
"""Host header values the default marker must refuse."""

HOSTILE_ORIGINS = (
    "http://evil.example",
    "https://evil.example:8080",
    "null",
    "file://",
    "http://127.0.0.1.evil.example",
    "http://127.0.0.1:1",
    "javascript:alert(1)",
    "http://user@127.0.0.1",
    "",
)
"""Origin values that are not the marker's own."""

CONTENT_TYPES = (
    "application/x-protobuf",
    "application/protobuf",
    "application/x-protobuf; charset=binary",
    "application/json",
    "text/plain",
    "multipart/form-data; boundary=x",
    "application/x-www-form-urlencoded",
    "application/x-protobufx",
    "",
)

CONTENT_ENCODINGS = ("identity", "gzip", "GZIP", "deflate", "br", "zstd", "gzip, gzip", "x")


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One request to send as raw bytes (so no client normalises it).

    ``None`` for a header means it is not sent.
    """

    method: str
    path: str
    host: str | None
    origin: str | None
    content_type: str | None
    content_encoding: str | None
    body: bytes

    def raw(self, *, port: int) -> bytes:
        """The request on the wire; ``{port}`` in the Host is replaced by ``port``."""
        lines = [f"{self.method} {self.path} HTTP/1.1"]
        if self.host is not None:
            lines.append(f"Host: {self.host.replace('{port}', str(port))}")
        if self.origin is not None:
            lines.append(f"Origin: {self.origin.replace('{port}', str(port))}")
        if self.content_type is not None:
            lines.append(f"Content-Type: {self.content_type}")
        if self.content_encoding is not None:
            lines.append(f"Content-Encoding: {self.content_encoding}")
        lines.append(f"Content-Length: {len(self.body)}")
        lines.append("Connection: close")
        head = "\r\n".join(lines) + "\r\n\r\n"
        return head.encode("latin-1", "replace") + self.body


def http_requests(
    *, own_hosts: tuple[str, ...], bodies: st.SearchStrategy[bytes]
) -> st.SearchStrategy[HttpRequest]:
    """Requests mixing the marker's own Host/Origin with hostile ones.

    ``own_hosts`` are Host values the marker accepts (``{port}`` is replaced
    with the marker's port when the request is sent); own origins are built
    from them.
    """
    hosts = st.one_of(st.sampled_from(own_hosts), st.sampled_from(HOSTILE_HOSTS), st.none())
    own_origins = tuple(f"http://{h}" for h in own_hosts)
    origins = st.one_of(st.none(), st.sampled_from(own_origins), st.sampled_from(HOSTILE_ORIGINS))
    maybe_gzip = st.tuples(bodies, st.booleans()).map(
        lambda pair: gzip.compress(pair[0], mtime=0) if pair[1] else pair[0]
    )
    return st.builds(
        HttpRequest,
        method=st.sampled_from(("POST", "POST", "POST", "GET", "PUT", "OPTIONS", "DELETE")),
        path=st.sampled_from(("/v1/traces", "/v1/traces", "/", "/healthz", "/v1/traces/", "/v1")),
        host=hosts,
        origin=origins,
        content_type=st.one_of(st.none(), st.sampled_from(CONTENT_TYPES)),
        content_encoding=st.one_of(st.none(), st.sampled_from(CONTENT_ENCODINGS)),
        body=maybe_gzip,
    )


# -- devbroker queues ---------------------------------------------------------------

QUEUE_OPERATION_NAMES = (
    "offer",
    "subscribe",
    "unsubscribe",
    "ack",
    "cancel",
    "expire",
    "advance",
    "dispatch",
)

queue_operation = st.tuples(
    st.sampled_from(QUEUE_OPERATION_NAMES),
    st.integers(min_value=0, max_value=30),
    st.integers(min_value=0, max_value=5),
)
"""What can happen to a devbroker queue, ``(name, a, b)``: ``a`` picks a message or a
subscription, ``b`` a count or a time step."""

queue_operations = st.lists(queue_operation, max_size=120)
"""Sequences of queue events, for the property tests of :mod:`ampsflow.devbroker.queues`."""
