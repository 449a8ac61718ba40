"""``ampsflow devbroker`` as an operator runs it: startup errors and signals."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import AMPS
import pytest

from ampsflow.devbroker.auth import hash_password
from tests.integration.devbroker.conftest import REPO, BrokerProcess, free_port, wait_until


def run_devbroker(tmp_path, data_dir, tcp_port=None, extra=()) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "ampsflow.yaml"
    config.write_text("logging:\n  level: info\n", encoding="utf-8")
    return subprocess.run(
        [
            sys.executable, "-m", "ampsflow", "devbroker", "--config", str(config),
            "--tcp", f"127.0.0.1:{tcp_port or free_port()}",
            "--websocket", f"127.0.0.1:{free_port()}",
            "--data-dir", str(data_dir), *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )  # fmt: skip


class TestStartup:
    def test_unusable_data_dir_exits_1_with_one_line(self, tmp_path):
        """A data dir that cannot be created exits 1 with one clear line on stderr."""
        blocker = tmp_path / "file"
        blocker.write_text("not a directory", encoding="utf-8")
        done = run_devbroker(tmp_path, blocker / "data")
        lines = [
            line for line in done.stderr.splitlines() if line.startswith("ampsflow devbroker:")
        ]
        assert (done.returncode, len(lines)) == (1, 1)
        assert "cannot use transaction log directory" in lines[0]

    def test_data_dir_in_use_exits_1(self, broker_process: BrokerProcess, tmp_path):
        """A second broker on the same data dir refuses to start."""
        done = run_devbroker(tmp_path, broker_process.data_dir)
        assert done.returncode == 1
        assert "in use by another process" in done.stderr

    def test_port_in_use_exits_1(self, tmp_path):
        """A TCP port that is already taken exits 1 with a clear line."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            done = run_devbroker(tmp_path, tmp_path / "data", tcp_port=taken.getsockname()[1])
        assert done.returncode == 1
        assert "address already in use" in done.stderr.lower()

    def test_unreadable_users_file_exits_1(self, tmp_path):
        """A users file that cannot be read exits 1 naming the file."""
        missing = tmp_path / "no-such-users"
        done = run_devbroker(tmp_path, tmp_path / "data", extra=("--users-file", str(missing)))
        assert done.returncode == 1
        assert f"cannot read users file {missing}" in done.stderr


def logon(uri: str, user: str, password: str) -> None:
    client = AMPS.Client(f"hup-{user}")
    try:
        client.connect(uri.replace("tcp://", f"tcp://{user}:{password}@"))
        client.logon(5000)
    finally:
        client.close()


class TestReload:
    def test_sighup_keeps_serving(self, broker_process: BrokerProcess):
        """SIGHUP (systemctl reload, logrotate) does not stop the broker; clients still log on."""
        assert broker_process.proc is not None
        broker_process.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload:" in broker_process.output(), "the reload log line")
        client = AMPS.Client("after-hup")
        client.connect(broker_process.tcp_uri)
        client.logon(5000)
        client.close()
        assert broker_process.proc.poll() is None

    def test_sighup_rereads_the_users_file(self, tmp_path):
        """A user added to the users file can log on after SIGHUP, without a restart."""
        users = tmp_path / "users"
        users.write_text(f"alice:{hash_password('a-pw', iterations=1000)}\n", encoding="utf-8")
        proc = BrokerProcess(tmp_path)
        proc.config.write_text(f"devbroker:\n  users_file: {users}\n", encoding="utf-8")
        try:
            proc.start()
            with pytest.raises(AMPS.AuthenticationException):
                logon(proc.tcp_uri, "bob", "b-pw")
            with users.open("a", encoding="utf-8") as f:
                f.write(f"bob:{hash_password('b-pw', iterations=1000)}\n")
            assert proc.proc is not None
            proc.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "reload: 2 users" in proc.output(), "the users reload")
            logon(proc.tcp_uri, "bob", "b-pw")
        finally:
            proc.cleanup()
