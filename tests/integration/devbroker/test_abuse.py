"""Hostile clients: each is refused or cut off, with a counter and a short log line, while
the broker goes on serving the official Python client.

Framing and size limits (a command split over many WebSocket frames, huge headers), bad
logon fields, logon timeout, the connection limit, accept errors at the open-file limit, and
password checks that neither tell which users exist nor stall everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import AMPS
import pytest

from ampsflow.devbroker import auth
from ampsflow.devbroker.auth import Users, hash_password
from tests.integration.devbroker.conftest import (
    DEADLINE_S,
    REPO,
    free_port,
    wait_until,
)
from tests.integration.devbroker.test_limits import RawClient, count_frame, official_roundtrip

LONGEST_LOG_LINE = 1000
"""A log line about client input shows a bounded prefix of it, never the whole input."""


@pytest.fixture
def raw_clients() -> Iterator[list[RawClient]]:
    clients: list[RawClient] = []
    yield clients
    for client in clients:
        client.close()


def reply_or_eof(raw: RawClient) -> bytes | None:
    """The next frame, or None when the broker closed (or reset) the connection."""
    try:
        return raw.recv_frame()
    except ConnectionResetError:
        return None


def long_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage()[:200] for r in caplog.records if len(r.getMessage()) > LONGEST_LOG_LINE]


async def _ws_logged_on(
    session: aiohttp.ClientSession, url: str
) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(url, max_msg_size=0)
    await ws.send_str("text")
    await ws.send_bytes(count_frame(1))
    await ws.send_str('{"c":"logon","cid":"L","client_name":"ws-abuse","a":"processed"}')
    reply = await ws.receive(timeout=DEADLINE_S)
    assert json.loads(reply.data)["status"] == "success"
    return ws


class TestWebSocketCommandSize:
    def test_command_split_over_many_frames_is_cut_off_as_it_arrives(self, start_broker):
        """A command announcing 4,096 frames is closed once its frames pass max_frame_bytes,
        without waiting for (and buffering) the rest."""
        broker = start_broker(max_frame_bytes=1024 * 1024)

        async def attack() -> aiohttp.WSMsgType:
            async with aiohttp.ClientSession() as session:
                ws = await _ws_logged_on(session, broker.ws_uri)
                await ws.send_bytes(count_frame(4096))
                await ws.send_str('{"c":"p","t":"split"}')
                chunk = b"x" * 65536
                for _ in range(20):  # 1.25 MiB of the announced 256 MiB
                    await ws.send_bytes(chunk)
                reply = await ws.receive(timeout=DEADLINE_S)
                await ws.close()
                return reply.type

        closed_by = asyncio.run(attack())
        assert (
            closed_by,
            broker.counter("oversized_frames"),
            official_roundtrip(broker),
        ) == (aiohttp.WSMsgType.CLOSE, 1, '{"still":"serving"}')

    def test_oversized_websocket_header_closes_with_a_short_log_line(self, start_broker, caplog):
        """A header frame above max_header_bytes closes that WebSocket; the log shows a prefix."""
        caplog.set_level(logging.INFO)
        broker = start_broker()

        async def attack() -> aiohttp.WSMsgType:
            async with aiohttp.ClientSession() as session:
                ws = await _ws_logged_on(session, broker.ws_uri)
                await ws.send_bytes(count_frame(1))
                await ws.send_str('{"c":"flush","cid":"F","x":"' + "z" * 200_000 + '"}')
                while True:
                    reply = await ws.receive(timeout=DEADLINE_S)
                    if reply.type != aiohttp.WSMsgType.TEXT:
                        return reply.type

        assert (
            asyncio.run(attack()),
            broker.counter("oversized_headers"),
            long_records(caplog),
        ) == (aiohttp.WSMsgType.CLOSE, 1, [])


class TestHeaderSize:
    def test_huge_header_before_logon_is_refused_at_its_length(
        self, start_broker, raw_clients, caplog
    ):
        """A 15 MiB logon header is refused from its length prefix: closed, counted, no ack."""
        caplog.set_level(logging.INFO)
        broker = start_broker()
        raw = RawClient(broker.broker.tcp_port)
        raw_clients.append(raw)
        name = "a" * (15 * 1024 * 1024)
        with contextlib.suppress(OSError):  # the broker may close before all is sent
            raw.send({"c": "logon", "cid": "L", "client_name": name, "a": "processed"})
        assert (
            reply_or_eof(raw),
            broker.counter("oversized_frames"),
            broker.counter("logons"),
            long_records(caplog),
        ) == (None, 1, 0, [])
        assert official_roundtrip(broker) == '{"still":"serving"}'

    def test_header_over_the_cap_is_nacked_and_closed(self, start_broker, raw_clients, caplog):
        """After logon, a frame whose header passes max_header_bytes is nacked by its cid
        and the connection closed; only a prefix of it reaches the log."""
        caplog.set_level(logging.INFO)
        broker = start_broker()
        raw = RawClient(broker.broker.tcp_port)
        raw_clients.append(raw)
        raw.logon("big-header")
        header = {"c": "p", "cid": "X", "t": "h", "a": "processed", "x": "z" * 200_000}
        raw.send(header, b'{"n":1}')
        nack = raw.recv_header()
        assert (
            (nack["cid"], nack["status"]),
            raw.recv_frame(),
            broker.counter("oversized_headers"),
            broker.counter("published"),
            long_records(caplog),
        ) == (("X", "failure"), None, 1, 0, [])


class TestLogonFields:
    @pytest.mark.parametrize(
        "name",
        ["\ud800", "a\udfffb", "tab\tname", "x" * 2000],
        ids=["lone-surrogate", "inner-surrogate", "control-character", "too-long"],
    )
    def test_unusable_client_name_gets_a_failure_ack(self, start_broker, raw_clients, caplog, name):
        """A logon whose client name cannot be used is answered with 'invalid client name'
        and closed, without a traceback; other clients are unaffected."""
        broker = start_broker()
        raw = RawClient(broker.broker.tcp_port)
        raw_clients.append(raw)
        raw.send_raw(
            b'{"c":"logon","cid":"L","a":"processed","client_name":'
            + json.dumps(name).encode()
            + b"}"
        )
        ack = raw.recv_header()
        tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
        assert (
            (ack["cid"], ack["status"], ack["reason"]),
            raw.recv_frame(),
            broker.counter("bad_logons"),
            broker.counter("logons"),
            tracebacks,
        ) == (("L", "failure", "invalid client name"), None, 1, 0, [])
        assert official_roundtrip(broker) == '{"still":"serving"}'

    def test_surrogate_password_is_an_auth_failure(self, start_broker, raw_clients):
        """A password that is not valid text is checked like any other, and fails."""
        users = Users({"alice": hash_password("secret", iterations=1)})
        broker = start_broker(users=users)
        raw = RawClient(broker.broker.tcp_port)
        raw_clients.append(raw)
        raw.send_raw(b'{"c":"logon","cid":"L","a":"processed","user_id":"alice","pw":"\\ud800"}')
        ack = raw.recv_header()
        assert ((ack["status"], ack["reason"]), broker.counter("internal_errors")) == (
            ("failure", "auth failure"),
            0,
        )


class TestPublishFields:
    @pytest.mark.parametrize(
        ("fields", "reason"),
        [('"t":"\\ud800"', "invalid topic"), ('"t":"ok","x":"\\udfff"', "invalid header")],
        ids=["surrogate-topic", "surrogate-correlation-id"],
    )
    def test_publish_that_cannot_be_logged_is_nacked(
        self, start_broker, raw_clients, fields, reason
    ):
        """A publish whose topic or correlation id is not UTF-8 text is nacked and counted,
        without a traceback; the connection goes on."""
        broker = start_broker()
        raw = RawClient(broker.broker.tcp_port)
        raw_clients.append(raw)
        raw.logon("surrogates")
        raw.send_raw(b'{"c":"p","cid":"P","a":"processed",' + fields.encode() + b'}{"a":1}')
        nack = raw.recv_header()
        raw.send({"c": "flush", "cid": "F", "a": "processed"})
        assert (
            (nack["cid"], nack["status"], nack["reason"]),
            raw.recv_header()["status"],
            broker.counter("internal_errors"),
            broker.counter("published"),
        ) == (("P", "failure", reason), "success", 0, 0)


class TestConnectionLimits:
    def test_client_that_never_logs_on_is_closed(self, start_broker, raw_clients):
        """A connection that sends nothing is closed after logon_timeout_s, and counted."""
        broker = start_broker(logon_timeout_s=0.3)
        raw = RawClient(broker.broker.tcp_port)
        raw_clients.append(raw)
        assert (raw.recv_frame(), broker.counter("logon_timeouts")) == (None, 1)

    def test_logged_on_client_outlives_the_logon_timeout(self, start_broker, raw_clients):
        """The logon timeout applies only until the logon is answered."""
        broker = start_broker(logon_timeout_s=0.3)
        raw = RawClient(broker.broker.tcp_port)
        raw_clients.append(raw)
        raw.logon("patient")
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # three timeouts' worth, flushing now and then
            raw.send({"c": "flush", "cid": "F", "a": "processed"})
            assert raw.recv_header()["status"] == "success"
            time.sleep(0.1)
        assert broker.counter("logon_timeouts") == 0

    def test_connections_beyond_the_limit_are_refused(self, start_broker, raw_clients):
        """At max_connections a new TCP connection is closed at once and a WebSocket
        upgrade gets 503, both counted; once one closes, a new client gets in."""
        broker = start_broker(max_connections=3)
        for _ in range(3):
            raw_clients.append(RawClient(broker.broker.tcp_port))
        wait_until(lambda: broker.counter("connections_opened") == 3, "three connections")
        extra = RawClient(broker.broker.tcp_port)
        raw_clients.append(extra)

        async def ws_status() -> int:
            async with aiohttp.ClientSession() as session:
                try:
                    async with session.ws_connect(broker.ws_uri):
                        return 101
                except aiohttp.WSServerHandshakeError as exc:
                    return exc.status

        refused = (extra.recv_frame(), asyncio.run(ws_status()))
        raw_clients[0].close()
        wait_until(lambda: broker.counter("connections_closed") >= 1, "a connection to close")
        assert (
            refused,
            broker.counter("connections_refused"),
            official_roundtrip(broker),
        ) == ((None, 503), 2, '{"still":"serving"}')


ACCEPT_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[1])))
sys.argv = ["ampsflow", *sys.argv[2:]]
from ampsflow.cli import main
sys.exit(main())
"""


class TestAcceptErrors:
    def test_accept_errors_at_the_fd_limit_are_logged_a_few_times(self, tmp_path: Path):
        """A broker at its open-file limit logs a handful of one-line accept errors (not a
        traceback per attempt) and serves again once the connections go away."""
        tcp, ws = free_port(), free_port()
        config = tmp_path / "ampsflow.yaml"
        config.write_text("logging:\n  level: info\n", encoding="utf-8")
        log_path = tmp_path / "broker.log"
        limit = 48
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", ACCEPT_SCRIPT, str(limit), "devbroker",
                 "--config", str(config), "--tcp", f"127.0.0.1:{tcp}",
                 "--websocket", f"127.0.0.1:{ws}", "--data-dir", str(tmp_path / "data")],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        flood: list[socket.socket] = []
        try:
            wait_until(lambda: b"listening on" in log_path.read_bytes(), "the broker to listen")
            for i in range(3 * limit):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", tcp if i % 2 else ws))
                flood.append(s)
            wait_until(
                lambda: b"cannot accept connections" in log_path.read_bytes(), "an accept error"
            )
            time.sleep(1.5)  # the interval asyncio retries accept() at; let it fail for a while
            for s in flood:
                s.close()
            flood.clear()
            client = AMPS.Client("after-flood")
            got: list[str] = []
            deadline = time.monotonic() + DEADLINE_S
            while True:  # the broker accepts again within asyncio's one-second retry
                try:
                    client.connect(f"tcp://127.0.0.1:{tcp}/amps/json")
                    break
                except AMPS.AMPSException:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            client.logon()
            client.subscribe(lambda m: got.append(m.get_data()), "after")
            client.publish("after", '{"ok":1}')
            wait_until(lambda: bool(got), "a message after the flood")
            client.close()
            alive = proc.poll() is None
        finally:
            for s in flood:
                s.close()
            proc.terminate()
            proc.wait(DEADLINE_S)
        text = log_path.read_text(encoding="utf-8", errors="replace")
        assert (
            alive,
            text.count("socket.accept() out of system resource"),
            text.count("Too many open files") <= 3,
            text.count("cannot accept connections") <= 3,
            "accept_errors=0" in text,
        ) == (True, 0, True, True, False)


def _blocking_derive(release: threading.Event, calls: list[bytes], in_flight: list[int]):
    lock = threading.Lock()
    peak = [0]

    def derive(password: bytes, salt: bytes, iterations: int) -> bytes:
        with lock:
            calls.append(password)
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            release.wait(DEADLINE_S)
            return b"never matches"
        finally:
            with lock:
                in_flight[0] -= 1

    return derive, peak


class TestPasswordChecks:
    def test_unknown_user_costs_a_key_derivation_like_a_known_one(self, start_broker, monkeypatch):
        """Both a wrong password for a known user and any password for an unknown user run
        exactly one key derivation, so neither answers sooner."""
        users = Users({"alice": hash_password("secret", iterations=1)})
        calls: list[tuple[bytes, int]] = []
        real = auth.derive_key

        def counting(password: bytes, salt: bytes, iterations: int) -> bytes:
            calls.append((password, iterations))
            return real(password, salt, iterations)

        monkeypatch.setattr(auth, "derive_key", counting)
        broker = start_broker(users=users)
        answers = []
        for user in ("alice", "mallory"):
            raw = RawClient(broker.broker.tcp_port)
            raw.send({"c": "logon", "cid": "L", "a": "processed", "user_id": user, "pw": "guess"})
            answers.append(raw.recv_header()["reason"])
            raw.close()
        assert (answers, calls) == (["auth failure"] * 2, [(b"guess", 1), (b"guess", 1)])

    def test_checks_run_off_the_loop_a_bounded_number_at_a_time(self, start_broker, monkeypatch):
        """While 12 logons wait on slow password checks, at most max_concurrent_logons run
        and an already logged-on client still publishes and receives."""
        release = threading.Event()
        calls: list[bytes] = []
        in_flight = [0]
        derive, peak = _blocking_derive(release, calls, in_flight)
        users = Users({"alice": hash_password("secret", iterations=1)})
        broker = start_broker(users=users, max_concurrent_logons=2)
        canary = AMPS.Client("canary")
        canary.connect(f"tcp://alice:secret@127.0.0.1:{broker.broker.tcp_port}/amps/json")
        canary.logon()
        monkeypatch.setattr(auth, "derive_key", derive)
        attackers = []
        try:
            for i in range(12):
                raw = RawClient(broker.broker.tcp_port)
                attackers.append(raw)
                raw.send({"c": "logon", "cid": str(i), "user_id": "alice", "pw": f"bad{i}"})
            wait_until(lambda: len(calls) == 2, "two password checks to start")
            got: list[str] = []
            canary.subscribe(lambda m: got.append(m.get_data()), "canary")
            canary.publish("canary", '{"alive":1}')
            wait_until(lambda: bool(got), "the canary's message while logons wait")
            during = (len(calls), peak[0])
        finally:
            release.set()
            canary.close()
        for raw in attackers:
            assert raw.recv_header()["reason"] == "auth failure"
            raw.close()
        assert (during, peak[0], len(calls)) == ((2, 2), 2, 12)


class TestFilters:
    def test_backtracking_regex_filter_does_not_stall_the_broker(self, start_broker):
        """A LIKE filter that backtracks exponentially in PCRE (^(a+)+$ on 40 a's and a b)
        is evaluated in linear time: the subscriber gets the matching message right after,
        and everyone else is served."""
        broker = start_broker()
        got: list[str] = []
        client = AMPS.Client("regex-sub")
        client.connect(broker.tcp_uri)
        client.logon()
        try:
            client.subscribe(lambda m: got.append(m.get_data()), "rx", "/s LIKE '^(a+)+$'")
            client.publish("rx", json.dumps({"s": "a" * 40 + "b"}))
            client.publish("rx", '{"s":"aaa"}')
            wait_until(lambda: bool(got), "the matching message")
            assert (got, official_roundtrip(broker)) == (['{"s":"aaa"}'], '{"still":"serving"}')
        finally:
            client.close()

    @pytest.mark.parametrize(
        "text",
        [
            "/a = 1 OR " * 1700 + "/a = 2",
            "/a IN (" + ",".join(["1"] * 1001) + ")",
            "/a LIKE '(x)\\1'",
        ],
        ids=["longer-than-max_filter_bytes", "in-list-over-max", "backreference"],
    )
    def test_filter_over_the_limits_is_a_bad_filter(self, start_broker, text):
        """Filters beyond the size, IN-list and RE2 limits raise BadFilterException in the
        official client; the connection stays usable."""
        broker = start_broker()
        client = AMPS.Client("filter-limits")
        client.connect(broker.tcp_uri)
        client.logon()
        try:
            with pytest.raises(AMPS.BadFilterException):
                client.subscribe(lambda _m: None, "limits", text)
            client.publish("limits", "{}")
            client.publish_flush(5000)
        finally:
            client.close()
        assert broker.counter("published") == 1
