"""Install ampsflow like an operator would, on a real systemd booted in a container.

A Debian bookworm root file system is made once per run with debootstrap (from the
mirror this machine's apt uses) and copied for each scenario. Each copy boots with
``systemd-nspawn`` (systemd as PID 1); commands run inside it through ``nsenter``.
The container shares the host's network, so apt reaches the mirror, pip reaches the
package index, and every service is moved to free loopback ports first.

Scenarios: the Debian package (``apt install ./ampsflow_*.deb``: start, publish,
reload, a reload that raises the log level and one with a broken file, every unit
up for more than twice its ``WatchdogSec`` with ``NRestarts=0``, stop, upgrade
keeping an edited config, remove, purge) and the pip install
(``pip install`` + ``ampsflow setup-system``). Both send a real message through the
devbroker, processor and persister running under the shipped, sandboxed units.

Environment:
    AMPSFLOW_DEB: use this .deb instead of building one with packaging/build-deb.
    AMPSFLOW_SYSTEM_CACHE: keep the debootstrapped root file system here across runs.
    AMPSFLOW_DEBIAN_MIRROR: Debian mirror (default: the URIs: line of the apt sources).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import free_port

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
ROOTFS_PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates"
SERVICES = (
    "ampsflow-devbroker.service",
    "ampsflow-processor.service",
    "ampsflow-persister.service",
    "ampsflow-marker.service",
)
DEB_VENV = "/opt/venvs/ampsflow"
PIP_VENV = "/opt/ampsflow"
JSONL = "/var/lib/ampsflow/messages.jsonl"
CONFIG = "/etc/ampsflow/ampsflow.yaml"
TOOLS = (
    ("systemd-nspawn", "systemd-container"),
    ("debootstrap", "debootstrap"),
    ("nsenter", "util-linux"),
    ("dpkg-buildpackage", "dpkg-dev"),
    ("dh_virtualenv", "dh-virtualenv"),
)
CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}


def _why_nspawn_cannot_run() -> str | None:
    if sys.platform != "linux":
        return "systemd-nspawn needs Linux"
    if os.geteuid() != 0:
        return "booting a container with systemd-nspawn needs root"
    for tool, package in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    return None


def debian_mirror() -> str:
    """The Debian mirror this machine's apt uses for the suite (deb822 or one-line)."""
    if os.environ.get("AMPSFLOW_DEBIAN_MIRROR"):
        return os.environ["AMPSFLOW_DEBIAN_MIRROR"]
    for sources in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in sources.read_text(encoding="utf-8").split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines() if ":" in line and line[0] != "#"
            )
            if SUITE in fields.get("Suites", "").split() and "URIs" in fields:
                return fields["URIs"].split()[0]
    sources_list = Path("/etc/apt/sources.list")
    if sources_list.exists():
        for line in sources_list.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                return parts[1]
    return "http://deb.debian.org/debian"


def wait_for(what: str, predicate: object, timeout_s: float = 60.0) -> None:
    """Poll ``predicate()`` until true; fail naming ``what`` at the deadline."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


def container_init(nspawn_pid: int) -> int | None:
    """The host pid of the container's systemd: a descendant of ``nspawn_pid`` named
    ``systemd`` whose pid in its own namespace is 1 (``None`` while it is not there)."""
    pending = [nspawn_pid]
    while pending:
        pid = pending.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        namespaced = fields.get("NSpid", "").split()
        if fields.get("Name", "").strip() == "systemd" and namespaced[-1:] == ["1"]:
            return pid
        pending.extend(int(child) for child in children)
    return None


def timespan_us(value: str) -> int:
    """A systemd time span (``30s``, ``1min 30s``, ``500ms``) in microseconds."""
    units = {"us": 1, "ms": 1000, "s": 1_000_000, "min": 60_000_000, "h": 3_600_000_000}
    total = 0.0
    for number, unit in re.findall(r"([0-9.]+)\s*(us|ms|min|s|h)", value):
        total += float(number) * units[unit]
    return int(total)


class Container:
    """A copy of the root file system booted with systemd-nspawn."""

    def __init__(self, root: Path, bind: Path, log: Path) -> None:
        self.root = root
        self.bind = bind
        self.log = log
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self) -> None:
        """Boot and wait until systemd reports running (or degraded)."""
        with self.log.open("wb") as log:
            # --register=no/--keep-unit: no machined or host systemd is needed.
            self.nspawn = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--register=no",
                    "--keep-unit",
                    "--quiet",
                    "-D",
                    str(self.root),
                    "--boot",
                    "--console=pipe",
                    f"--bind-ro={self.bind}:/mnt/in",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        pid = self.nspawn.pid

        def leader_found() -> bool:
            if self.nspawn is not None and self.nspawn.poll() is not None:
                pytest.fail(f"systemd-nspawn exited: {self.log.read_text(errors='replace')}")
            self.leader = container_init(pid) or 0
            return bool(self.leader)

        # systemd-nspawn forks intermediate children before the container's init
        # execs; only a process named systemd that is PID 1 in its namespace is it.
        wait_for("the container's systemd (PID 1)", leader_found, 30)

        def booted() -> bool:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            return state in ("running", "degraded")

        wait_for("the container to boot", booted, 120)

    def run(
        self, *command: str, check: bool = True, timeout_s: float = 900
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (as root, with a clean environment)."""
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--", *command],
            env=CLEAN_ENV,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"{' '.join(command)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
            )
        return result

    def show(self, unit: str, prop: str) -> str:
        """One property of a unit (``systemctl show -p``)."""
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def active(self, unit: str) -> str:
        """``systemctl is-active`` of the unit."""
        return self.run("systemctl", "is-active", unit, check=False).stdout.strip()

    def read(self, path: str) -> str:
        """A file's text inside the container ('' when missing)."""
        return self.run("sh", "-c", f"cat {path} 2>/dev/null || true").stdout

    def shutdown(self) -> None:
        """Power off, or kill systemd-nspawn when it does not stop in time."""
        if self.nspawn is None or self.nspawn.poll() is not None:
            return
        if self.leader:
            self.run("systemctl", "poweroff", check=False, timeout_s=30)
        try:
            self.nspawn.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.nspawn.terminate()
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait()


@pytest.fixture(scope="module")
def base_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A debootstrapped bookworm with systemd and Python, made once per run."""
    reason = _why_nspawn_cannot_run()
    if reason is not None:
        pytest.skip(reason)
    cache = os.environ.get("AMPSFLOW_SYSTEM_CACHE")
    cache_dir = Path(cache) if cache else tmp_path_factory.mktemp("rootfs-cache")
    rootfs = cache_dir / f"{SUITE}-rootfs"
    done = rootfs / ".ampsflow-rootfs-complete"
    if not done.exists():
        partial = cache_dir / f"{SUITE}-rootfs.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(rootfs, ignore_errors=True)
        subprocess.run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={ROOTFS_PACKAGES}",
                SUITE,
                str(partial),
                debian_mirror(),
            ],
            check=True,
            capture_output=True,
        )
        partial.rename(rootfs)
        done.touch()
    probe = subprocess.run(
        ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "-D", str(rootfs), "true"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"systemd-nspawn cannot run containers here: {probe.stderr.strip()}")
    return rootfs


def _missing_build_tool() -> str | None:
    for tool, package in (
        ("dpkg-buildpackage", "dpkg-dev"),
        ("dh_virtualenv", "dh-virtualenv"),
        ("dh", "debhelper"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    return None


@pytest.fixture(scope="module")
def built_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``packaging/build-deb`` output (or ``$AMPSFLOW_DEB``), built once per run."""
    out = tmp_path_factory.mktemp("deb")
    given = os.environ.get("AMPSFLOW_DEB")
    if given:
        fields = subprocess.run(
            ["dpkg-deb", "--showformat=${Version}_${Architecture}", "--show", given],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split("\t")[-1]
        shutil.copy(given, out / f"ampsflow_{fields}.deb")
    else:
        reason = _missing_build_tool()
        if reason is not None:
            pytest.skip(reason)
        build = subprocess.run(
            [str(REPO / "packaging" / "build-deb"), "--out", str(out)],
            capture_output=True,
            text=True,
            check=False,
        )
        if build.returncode != 0:
            pytest.fail(
                f"packaging/build-deb failed:\n{build.stdout[-6000:]}\n{build.stderr[-6000:]}"
            )
    (deb,) = out.glob("ampsflow_*_amd64.deb")
    return deb


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, base_rootfs: Path, built_deb: Path) -> Path:
    """The .deb, an upgrade of it with a bumped version, and the wheel, in one directory.

    The upgrade is the same build repacked as ``<version>+upgrade1``: dpkg treats it
    as any newer version (conffiles, maintainer scripts, try-restart of the units).
    """
    del base_rootfs  # made only where the containers can run
    out = tmp_path_factory.mktemp("artifacts")
    shutil.copy(built_deb, out)
    deb = out / built_deb.name
    version = deb.name.split("_")[1]
    tree = tmp_path_factory.mktemp("repack") / "tree"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = tree / "DEBIAN" / "control"
    control.write_text(
        control.read_text(encoding="utf-8").replace(
            f"Version: {version}\n", f"Version: {version}+upgrade1\n"
        ),
        encoding="utf-8",
    )
    upgrade = out / f"ampsflow_{version}+upgrade1_amd64.deb"
    subprocess.run(
        ["dpkg-deb", "-Zgzip", "-z1", "--root-owner-group", "-b", str(tree), str(upgrade)],
        check=True,
        capture_output=True,
    )
    shutil.rmtree(tree)
    # Like the .deb build: this machine's pip configuration is ignored.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    if "PIP_CERT" in os.environ:
        env["PIP_CERT"] = os.environ["PIP_CERT"]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        env=env,
    )
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if ca.exists():
        shutil.copy(ca, out / "ca-certificates.crt")
    for mode_fix in out.iterdir():
        mode_fix.chmod(0o644)
    out.chmod(0o755)
    return out


@pytest.fixture
def container(base_rootfs: Path, artifacts: Path, tmp_path: Path) -> Iterator[Container]:
    """A fresh copy of the root file system, booted, removed afterwards.

    The container's journal is saved as ``journal.txt`` in the test's tmp_path.
    """
    root = tmp_path / "rootfs"
    subprocess.run(["cp", "-a", "--reflink=auto", str(base_rootfs), str(root)], check=True)
    box = Container(root, artifacts, tmp_path / "nspawn.log")
    try:
        box.boot()
        yield box
    finally:
        if box.leader:
            journal = box.run("journalctl", "--no-pager", "-n", "300", check=False).stdout
            (tmp_path / "journal.txt").write_text(journal, encoding="utf-8")
        box.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def move_to_free_ports(box: Container, python: str) -> None:
    """Edit the config like an operator: every listener and upstream on a free port."""
    tcp, ws, web, otlp = (free_port() for _ in range(4))
    edits = {
        "tcp://127.0.0.1:9007/amps/json": f"tcp://127.0.0.1:{tcp}/amps/json",
        "tcp: 127.0.0.1:9007": f"tcp: 127.0.0.1:{tcp}",
        "websocket: 127.0.0.1:9008": f"websocket: 127.0.0.1:{ws}",
        "ws://127.0.0.1:9008/amps/json": f"ws://127.0.0.1:{ws}/amps/json",
        "listen: 127.0.0.1:8080": f"listen: 127.0.0.1:{web}",
        # Nothing listens there: spans are encoded and the export fails quietly.
        "http://127.0.0.1:4318": f"http://127.0.0.1:{otlp}",
    }
    script = (
        f"import json; p = {CONFIG!r}; t = open(p).read()\n"
        f"for a, b in json.loads({json.dumps(json.dumps(edits))}).items():\n"
        "    assert a in t, a\n"
        "    t = t.replace(a, b)\n"
        "open(p, 'w').write(t)\n"
    )
    box.run(python, "-c", script)


def amps_uri(box: Container) -> str:
    """The AMPS URI of the (edited) config."""
    for line in box.read(CONFIG).splitlines():
        if line.strip().startswith("uri: "):
            return line.split(": ", 1)[1].strip()
    pytest.fail("no amps.uri in the config")


def publish(box: Container, python: str, message_id: str) -> None:
    """Publish one JSON message to `internal` with the official AMPS client in the venv."""
    script = (
        "import AMPS, json, sys\n"
        "c = AMPS.Client('install-test-' + sys.argv[2])\n"
        "c.connect(sys.argv[1]); c.logon()\n"
        "c.publish('internal', json.dumps({'id': sys.argv[2], 'text': 'hello'}))\n"
        "c.publish_flush(10000); c.close()\n"
    )
    box.run(python, "-c", script, amps_uri(box), message_id)


def persisted(box: Container) -> dict[str, dict[str, object]]:
    """The persisted records by message id."""
    records = {}
    for line in box.read(JSONL).splitlines():
        if line.strip():
            record = json.loads(line)
            records[str(record.get("id"))] = record
    return records


def assert_pipeline_moves(box: Container, python: str, message_id: str) -> None:
    """A published message reaches the JSONL, marked processed."""
    publish(box, python, message_id)
    wait_for(f"{message_id} in {JSONL}", lambda: message_id in persisted(box))
    assert persisted(box)[message_id]["processed"] is True


def main_pids(box: Container) -> dict[str, str]:
    """MainPID of every service."""
    return {unit: box.show(unit, "MainPID") for unit in SERVICES}


def start_pipeline(box: Container) -> None:
    """Enable the development broker into the target and start the target."""
    box.run("systemctl", "enable", "ampsflow-devbroker.service")
    box.run("systemctl", "start", "ampsflow.target")
    for unit in SERVICES:
        wait_for(f"{unit} active", lambda unit=unit: box.active(unit) == "active")


def assert_no_tracebacks(box: Container) -> None:
    """No ampsflow unit logged a Python traceback."""
    units = [arg for unit in SERVICES for arg in ("-u", unit)]
    journal = box.run("journalctl", "--no-pager", "-o", "cat", *units).stdout
    assert "Traceback" not in journal, journal[-4000:]


def assert_reload_keeps_running(box: Container, python: str, message_id: str) -> None:
    """``systemctl reload`` HUPs every service; none restarts, messages still flow."""
    before = main_pids(box)
    box.run("systemctl", "reload", *SERVICES)
    for unit in SERVICES:
        wait_for(f"{unit} active after reload", lambda unit=unit: box.active(unit) == "active")
    assert before == main_pids(box)
    assert_pipeline_moves(box, python, message_id)


def set_log_level(box: Container, python: str, old: str, new: str) -> None:
    """Edit ``logging.level`` in the config like an operator (``level: old`` -> ``new``)."""
    script = (
        f"p = {CONFIG!r}; t = open(p).read()\n"
        f"a, b = '  level: {old}\\n', '  level: {new}\\n'\n"
        "assert t.count(a) == 1, a\n"
        "open(p, 'w').write(t.replace(a, b))\n"
    )
    box.run(python, "-c", script)


def journal(box: Container, unit: str) -> str:
    """What ``unit`` logged (message text only)."""
    return box.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout


def assert_reload_applies_and_rejects(box: Container, python: str, message_id: str) -> None:
    """A reload with ``logging.level: debug`` takes effect in every service; a reload with a
    broken file changes nothing, keeps every service running and logs why."""
    box.run("cp", "-p", CONFIG, "/root/ampsflow.yaml.edited")
    before = main_pids(box)
    set_log_level(box, python, "info", "debug")
    box.run("systemctl", "reload", *SERVICES)
    for unit in SERVICES:
        wait_for(
            f"{unit} to log at debug after the reload",
            lambda unit=unit: "reload: finished, logging at debug" in journal(box, unit),
        )
    set_log_level(box, python, "debug", "loud")
    box.run("systemctl", "reload", *SERVICES)
    problem = f"{CONFIG}: logging.level: must be one of debug, info, warning, error, got 'loud'"
    for unit in SERVICES:
        wait_for(
            f"{unit} to reject the broken file", lambda unit=unit: problem in journal(box, unit)
        )
    rejected = {
        unit: box.show(unit, "StatusText").startswith("reload rejected") for unit in SERVICES
    }
    assert ({unit: True for unit in SERVICES}, before) == (rejected, main_pids(box))
    assert_pipeline_moves(box, python, message_id)
    box.run("cp", "-p", "/root/ampsflow.yaml.edited", CONFIG)
    box.run("systemctl", "reload", *SERVICES)


def assert_no_watchdog_restarts(box: Container) -> None:
    """Every unit has been up for more than twice its WatchdogSec without a restart."""
    watchdog_us = {unit: timespan_us(box.show(unit, "WatchdogUSec")) for unit in SERVICES}
    assert all(watchdog_us.values()), watchdog_us
    started_us = {unit: int(box.show(unit, "ActiveEnterTimestampMonotonic")) for unit in SERVICES}

    def long_enough() -> bool:
        # The container shares the host's kernel, hence its CLOCK_MONOTONIC.
        now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return all(now_us - started_us[u] > 2 * watchdog_us[u] for u in SERVICES)

    wait_for("every unit to outlive twice its WatchdogSec", long_enough, 300)
    expected = {unit: ("0", "active") for unit in SERVICES}
    assert expected == {unit: (box.show(unit, "NRestarts"), box.active(unit)) for unit in SERVICES}


def assert_stop_is_clean(box: Container) -> None:
    """Stopping the target stops all four services, each exiting 0."""
    box.run("systemctl", "stop", "ampsflow.target")
    # The stop jobs propagated through PartOf= are not waited for by systemctl.
    for unit in SERVICES:
        wait_for(f"{unit} stopped", lambda unit=unit: box.active(unit) == "inactive")
    expected = {unit: ("inactive", "success") for unit in SERVICES}
    assert expected == {unit: (box.active(unit), box.show(unit, "Result")) for unit in SERVICES}


class TestDebianPackage:
    """``apt install ./ampsflow_<version>_amd64.deb`` on a booted bookworm."""

    def test_install_run_reload_stop_upgrade_purge(self, container: Container) -> None:
        """The package installs, runs the pipeline, reloads, stops, upgrades and purges."""
        box = container
        python = f"{DEB_VENV}/bin/python"
        (deb,) = [
            p.name for p in box.bind.glob("ampsflow_*_amd64.deb") if "+upgrade1" not in p.name
        ]
        (upgrade,) = [p.name for p in box.bind.glob("ampsflow_*+upgrade1_amd64.deb")]
        box.run("apt-get", "update", "-q")
        box.run("apt-get", "install", "-y", "-q", f"/mnt/in/{deb}")

        # Installed: user, directories, enabled but not started.
        assert box.run("getent", "passwd", "ampsflow").stdout.startswith("ampsflow:")
        listing = box.run("stat", "-c", "%n %a %U:%G", "/etc/ampsflow", CONFIG, "/var/lib/ampsflow")
        assert [
            "/etc/ampsflow 750 root:ampsflow",
            f"{CONFIG} 640 root:ampsflow",
            "/var/lib/ampsflow 750 ampsflow:ampsflow",
        ] == listing.stdout.splitlines()
        expected_state = ("enabled", "inactive")
        assert expected_state == (
            box.run("systemctl", "is-enabled", "ampsflow.target").stdout.strip(),
            box.active("ampsflow-processor.service"),
        )

        move_to_free_ports(box, python)
        edited = box.read(CONFIG)
        start_pipeline(box)
        # The pipeline below runs under MemoryDenyWriteExecute=yes (AMPS C extension, OTel).
        enforced = "yes"
        assert enforced == box.show("ampsflow-processor.service", "MemoryDenyWriteExecute")
        assert_pipeline_moves(box, python, "deb-1")
        assert_reload_keeps_running(box, python, "deb-2")
        assert_reload_applies_and_rejects(box, python, "deb-2b")
        assert_no_watchdog_restarts(box)
        assert_stop_is_clean(box)

        # Upgrade while running: the edited config is kept without a prompt and the
        # running services are restarted into the new version.
        start_pipeline(box)
        before = main_pids(box)
        box.run("apt-get", "install", "-y", "-q", f"/mnt/in/{upgrade}")
        assert (
            upgrade.split("_")[1] == box.run("dpkg-query", "-W", "-f=${Version}", "ampsflow").stdout
        )
        assert edited == box.read(CONFIG)
        for unit in SERVICES:
            wait_for(f"{unit} active after upgrade", lambda unit=unit: box.active(unit) == "active")
        after = main_pids(box)
        not_restarted: list[str] = []
        assert not_restarted == [unit for unit in SERVICES if before[unit] == after[unit]]
        assert_pipeline_moves(box, python, "deb-3")
        assert_no_tracebacks(box)

        # Remove stops everything and keeps the data; purge removes it.
        box.run("apt-get", "remove", "-y", "-q", "ampsflow")
        for unit in SERVICES:
            wait_for(f"{unit} stopped by remove", lambda unit=unit: box.active(unit) == "inactive")
        assert {"deb-1", "deb-2", "deb-2b", "deb-3"} <= set(persisted(box))
        box.run("apt-get", "purge", "-y", "-q", "ampsflow")
        leftovers = box.run(
            "sh",
            "-c",
            "ls -d /var/lib/ampsflow /var/log/ampsflow /etc/ampsflow 2>/dev/null || true",
        )
        nothing = ""
        assert nothing == leftovers.stdout


class TestPipInstall:
    """``pip install`` into a virtualenv, then ``ampsflow setup-system``."""

    def test_pip_install_setup_system_run_reload_stop(self, container: Container) -> None:
        """setup-system turns a pip install into working, hardened services."""
        box = container
        python = f"{PIP_VENV}/bin/python"
        (wheel,) = [p.name for p in box.bind.glob("ampsflow-*.whl")]
        # The documented prerequisite: procps provides the units' /bin/kill (reload).
        box.run("apt-get", "update", "-q")
        box.run("apt-get", "install", "-y", "-q", "procps")
        box.run("python3", "-m", "venv", PIP_VENV)
        pip_env = ["env", "PIP_CONFIG_FILE=/dev/null"]
        if (box.bind / "ca-certificates.crt").exists():
            pip_env.append("PIP_CERT=/mnt/in/ca-certificates.crt")
        box.run(*pip_env, f"{PIP_VENV}/bin/pip", "install", "-q", f"/mnt/in/{wheel}")

        first = box.run(f"{PIP_VENV}/bin/ampsflow", "setup-system")
        assert "create system user and group ampsflow" in first.stdout
        second = box.run(f"{PIP_VENV}/bin/ampsflow", "setup-system")
        unchanged = "done: 0 change(s)"
        assert unchanged == second.stdout.splitlines()[-1]
        assert f"ExecStart={PIP_VENV}/bin/ampsflow-processor" in box.read(
            "/etc/systemd/system/ampsflow-processor.service"
        )

        move_to_free_ports(box, python)
        edited = box.read(CONFIG)
        start_pipeline(box)
        assert_pipeline_moves(box, python, "pip-1")
        assert_reload_keeps_running(box, python, "pip-2")
        assert_no_tracebacks(box)
        assert_stop_is_clean(box)
        third = box.run(f"{PIP_VENV}/bin/ampsflow", "setup-system")
        assert ("done: 0 change(s)", edited) == (third.stdout.splitlines()[-1], box.read(CONFIG))


class TestLintian:
    """lintian on the built package."""

    def test_package_has_no_lintian_errors(self, built_deb: Path) -> None:
        """lintian finds no error (venv-inherent findings are overridden with reasons)."""
        if shutil.which("lintian") is None:
            pytest.skip("lintian is not installed (apt-get install lintian)")
        result = subprocess.run(
            ["lintian", "--fail-on", "error", str(built_deb)],
            capture_output=True,
            text=True,
            check=False,
        )
        errors = [line for line in result.stdout.splitlines() if line.startswith("E: ")]
        expected: tuple[int, list[str]] = (0, [])
        assert expected == (result.returncode, errors), result.stdout + result.stderr
