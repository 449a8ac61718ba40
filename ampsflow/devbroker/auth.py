"""Optional logon authentication for the devbroker: a users file of ``name:hash`` lines.

Each non-empty line that does not start with ``#`` is ``<user>:<hash>``, where ``<hash>``
is ``pbkdf2_sha256$<iterations>$<salt base64>$<key base64>`` (PBKDF2-HMAC-SHA256 from the
standard library). Create one with::

    python -c 'import getpass; from ampsflow.devbroker.auth import hash_password; \\
print(hash_password(getpass.getpass()))'

and append ``alice:<that output>`` to the file. The client then logs on with
``tcp://alice:secret@host:9007/amps/json`` (Python) or ``ws://alice:secret@host:9008/amps/json``
(JavaScript under Node).

Checking a password costs the same whether the user exists or not: an unknown user's
password is checked against a dummy hash of the file's strongest iteration count, so the
answer's timing does not tell which names exist.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from ampsflow.errors import AuthError

SCHEME = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 600_000
"""OWASP's 2023 recommendation for PBKDF2-HMAC-SHA256."""
_SALT_BYTES = 16


def derive_key(password: bytes, salt: bytes, iterations: int) -> bytes:
    """PBKDF2-HMAC-SHA256 of ``password`` (slow on purpose; releases the GIL)."""
    return hashlib.pbkdf2_hmac("sha256", password, salt, iterations)


def hash_password(password: str, *, iterations: int = DEFAULT_ITERATIONS) -> str:
    """Return ``pbkdf2_sha256$<iterations>$<salt>$<key>`` for ``password`` with a fresh salt."""
    salt = os.urandom(_SALT_BYTES)
    key = derive_key(password.encode("utf-8"), salt, iterations)
    return "$".join(
        (SCHEME, str(iterations), base64.b64encode(salt).decode(), base64.b64encode(key).decode())
    )


@dataclass(frozen=True, slots=True)
class _Hash:
    iterations: int
    salt: bytes
    key: bytes


def _parse_hash(text: str) -> _Hash:
    parts = text.split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        raise ValueError(f"expected {SCHEME}$<iterations>$<salt>$<key>")
    try:
        iterations = int(parts[1])
        salt = base64.b64decode(parts[2], validate=True)
        key = base64.b64decode(parts[3], validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"malformed hash: {exc}") from None
    if iterations < 1 or not key:
        raise ValueError("malformed hash: iterations must be positive and the key non-empty")
    return _Hash(iterations, salt, key)


class Users:
    """The users allowed to log on, with their password hashes."""

    def __init__(self, hashes: dict[str, str]) -> None:
        self._hashes = {name: _parse_hash(h) for name, h in hashes.items()}
        strongest = max((h.iterations for h in self._hashes.values()), default=DEFAULT_ITERATIONS)
        # Checked for unknown users, so they cost as much as known ones; matches nothing.
        self._dummy = _Hash(strongest, os.urandom(_SALT_BYTES), b"")

    @classmethod
    def load(cls, path: Path) -> Users:
        """Read a users file.

        Raises:
            AuthError: the file cannot be read or a line is malformed (file and line named).
        """
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthError(f"cannot read users file {path}: {exc}") from exc
        hashes: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, value = line.partition(":")
            if not sep or not name:
                raise AuthError(f"{path}:{number}: expected <user>:<hash>")
            try:
                _parse_hash(value)
            except ValueError as exc:
                raise AuthError(f"{path}:{number}: {exc}") from None
            hashes[name] = value
        return cls(hashes)

    def __len__(self) -> int:
        return len(self._hashes)

    def verify(self, user: str, password: str) -> bool:
        """Return True when ``user`` exists and ``password`` matches its hash.

        Runs one key derivation in every case (an unknown user against a dummy hash).
        A password that is not valid Unicode text (a lone surrogate from a JSON escape) is
        hashed as its raw code units and so matches no stored hash. Slow on purpose
        (PBKDF2): call it off the event loop.
        """
        stored = self._hashes.get(user)
        candidate = password.encode("utf-8", "surrogatepass")
        if stored is None:
            derive_key(candidate, self._dummy.salt, self._dummy.iterations)
            return False
        key = derive_key(candidate, stored.salt, stored.iterations)
        return hmac.compare_digest(key, stored.key)
