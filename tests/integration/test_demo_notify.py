"""``ampsflow demo`` keeps reading its children's sd_notify sockets for their whole life.

A unix datagram socket queues only a few datagrams (``net.unix.max_dgram_qlen``,
10 by default); when nobody reads, the sender blocks in ``sendto``, i.e. a
service reporting ``STATUS=`` lines (reconnects, a stalled publish) would hang
inside sd_notify. The child here is a stand-in service that becomes ready, then
sends thousands of ``STATUS=`` lines the way ``sdnotify`` does (blocking sends),
then says so in a file and waits for SIGTERM.
"""

from __future__ import annotations

import io
import sys
import textwrap
from pathlib import Path

import pytest

from ampsflow.services.demo import NOTIFY_LINES_KEPT, Demo
from tests.support.processes import wait_for

STATUS_LINES = 5000

CHILD = textwrap.dedent(
    """
    import os, signal, socket, sys, time
    done = os.environ["DEMO_TEST_DONE"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.connect(os.environ["NOTIFY_SOCKET"])
    sock.send(b"READY=1")
    for i in range({lines}):
        sock.send(b"STATUS=retrying, attempt %d" % i)
    open(done, "w").close()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    time.sleep(60)
    """
).format(lines=STATUS_LINES)


def test_a_child_sending_many_status_lines_after_ready_never_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every STATUS= line is taken after READY=1, the child carries on, and it stops cleanly."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    done = tmp_path / "done"
    monkeypatch.setenv("DEMO_TEST_DONE", str(done))
    (tmp_path / "logs").mkdir()
    # The demo runs COMMAND NAME --config PATH; the stand-in ignores its arguments.
    demo = Demo(
        tmp_path, tmp_path / "unused.yaml", io.StringIO(), command=(sys.executable, str(script))
    )
    try:
        child = demo.start("flooder")
        demo.wait_until(child, lambda c: c.is_ready)
        wait_for(done.exists, timeout_s=30, what=f"the child to send {STATUS_LINES} STATUS= lines")
        wait_for(
            lambda: f"STATUS=retrying, attempt {STATUS_LINES - 1}" in child.messages,
            timeout_s=10,
            what="the last STATUS= line",
        )
    finally:
        demo.stop()
    assert (child.process.returncode, len(child.messages)) == (0, NOTIFY_LINES_KEPT)
