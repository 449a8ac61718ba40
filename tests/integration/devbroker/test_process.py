"""``ampsflow devbroker`` as an operator runs it: startup errors and signals."""

from __future__ import annotations

import socket
import subprocess
import sys

from tests.integration.devbroker.conftest import REPO, BrokerProcess, free_port


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
