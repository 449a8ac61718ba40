"""Who may talk to the marker: the Host and Origin checks (pure, no I/O).

Two browser attacks reach a server on 127.0.0.1 from a page on another site:

- **Cross-site WebSocket hijacking.** Browsers let any page open a WebSocket
  to any address, sending that page's ``Origin``. Without a check, a page on
  another site could log on to AMPS through ``/amps/json`` and publish marks.
  A request whose ``Origin`` is present must therefore name the marker itself
  (``scheme://<the request's Host>``) or one of ``marker.allowed_origins``.
  Requests without ``Origin`` come from programs, not from a page on some
  other site (browsers always send it on WebSocket upgrades and cross-origin
  posts), and pass.
- **DNS rebinding.** A name the attacker controls is pointed at 127.0.0.1, so
  the browser treats the marker as same-origin with the attacker's page. The
  request then carries the attacker's name in ``Host``. Every request's Host
  name must therefore be one of ``marker.allowed_hosts`` (by default the
  listen address, ``localhost``, ``127.0.0.1`` and ``::1``); the port is not
  compared, so a marker behind a port-forward still works.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Host names always allowed when ``marker.allowed_hosts`` is empty (plus the listen host)."""

_NAME = re.compile(r"^[a-z0-9.\-_]+$")
_V6 = re.compile(r"^\[([0-9a-f:.]+)\]$")


def _port_ok(port: str) -> bool:
    return port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535


def host_name(value: str | None) -> str | None:
    """The host name of a ``Host`` header (lowercase, no port, IPv6 without brackets).

    ``None`` when the header is absent or not a plain ``name[:port]`` /
    ``[v6][:port]`` value.
    """
    if value is None:
        return None
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        rest = value[end + 1 :]
        if rest and not (rest.startswith(":") and _port_ok(rest[1:])):
            return None
        match = _V6.match(value[: end + 1])
        return match.group(1) if match else None
    name, sep, port = value.partition(":")
    if sep and not _port_ok(port):
        return None
    if not name or not _NAME.match(name):
        return None
    return name.rstrip(".")


def normalise_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` of an origin, lowercased; None if it is not one."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}".lower()


@dataclass(frozen=True, slots=True)
class Guard:
    """The allowed hosts and extra origins of one marker."""

    hosts: frozenset[str]
    origins: frozenset[str]

    @classmethod
    def build(
        cls, *, listen_host: str, allowed_hosts: Iterable[str], allowed_origins: Iterable[str]
    ) -> Guard:
        """The guard for a config: explicit ``allowed_hosts``, else the defaults."""
        hosts = [h.lower().strip("[]") for h in allowed_hosts]
        if not hosts:
            hosts = [listen_host.lower().strip("[]"), *DEFAULT_HOSTS]
        origins = {o for o in (normalise_origin(x) for x in allowed_origins) if o is not None}
        return cls(frozenset(hosts), frozenset(origins))

    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a request with this ``Host`` header may be served."""
        if "*" in self.hosts:
            return True
        name = host_name(host_header)
        return name is not None and name in self.hosts

    def origin_allowed(self, origin: str | None, host_header: str | None) -> bool:
        """Whether a request with this ``Origin`` may be served (absent: yes).

        Same-origin means the origin's ``host:port`` is the request's ``Host``
        (either scheme: TLS may end at a reverse proxy in front).
        """
        if origin is None:
            return True
        normal = normalise_origin(origin)
        if normal is None:
            return False
        if normal in self.origins:
            return True
        if host_header is None:
            return False
        netloc = normal.split("://", 1)[1]
        return netloc == host_header.strip().lower()
