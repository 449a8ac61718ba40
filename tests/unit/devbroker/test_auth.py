"""The devbroker users file: PBKDF2 hashes verified with the standard library."""

from __future__ import annotations

import pytest

from ampsflow.devbroker.auth import Users, hash_password
from ampsflow.errors import AuthError


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users"
    path.write_text(
        f"# devbroker users\n\nalice:{hash_password('s3cret', iterations=1000)}\n",
        encoding="utf-8",
    )
    return path


class TestUsers:
    def test_right_password(self, users_file):
        """A listed user with the right password is accepted."""
        assert Users.load(users_file).verify("alice", "s3cret") is True

    def test_wrong_password(self, users_file):
        """A wrong password is refused."""
        assert Users.load(users_file).verify("alice", "S3cret") is False

    def test_unknown_user(self, users_file):
        """A user not in the file is refused."""
        assert Users.load(users_file).verify("bob", "s3cret") is False

    def test_hashes_are_salted(self):
        """Hashing the same password twice gives different strings."""
        assert hash_password("x", iterations=1000) != hash_password("x", iterations=1000)

    @pytest.mark.parametrize(
        "line",
        ["alice", ":pbkdf2_sha256$1$AA==$AA==", "alice:md5$abc", "alice:pbkdf2_sha256$x$AA==$AA=="],
    )
    def test_malformed_line_names_file_and_line(self, tmp_path, line):
        """A malformed line is an AuthError naming the file and line number."""
        path = tmp_path / "users"
        path.write_text(f"# users\n{line}\n", encoding="utf-8")
        with pytest.raises(AuthError, match=f"{path}:2:"):
            Users.load(path)

    def test_missing_file(self, tmp_path):
        """A users file that cannot be read is an AuthError naming it."""
        with pytest.raises(AuthError, match="cannot read users file"):
            Users.load(tmp_path / "absent")
