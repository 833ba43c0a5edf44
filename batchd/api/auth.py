"""Who may use ``batchd api``: where it may listen, and the bearer keys."""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path

from fastapi import Request

from ..config import ConfigError
from .files import ApiError


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (an IPv6 host in brackets) -> (host, port); ConfigError if malformed."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host, int(port)


def is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class Keys:
    """Bearer keys, one a line in a file (``#`` comments); re-read when it changes,
    so a key is added or revoked without a restart."""

    def __init__(self, path: Path):
        self.path = path
        self.stamp: tuple[int, int] | None = None
        self.keys: list[bytes] = []
        self.load()
        if not self.keys:
            raise ConfigError(f"api keys file {path} has no keys")

    def load(self) -> None:
        try:
            st = self.path.stat()
            if (st.st_mtime_ns, st.st_size) == self.stamp:
                return
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            if self.stamp is None:
                raise ConfigError(f"api keys file {self.path}: {exc}") from None
            return  # keep the keys last read
        self.keys = [line.strip().encode() for line in text.splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
        self.stamp = (st.st_mtime_ns, st.st_size)

    def allows(self, header: str | None, api_key: str | None = None) -> bool:
        """``Authorization: Bearer KEY`` (OpenAI's clients) or ``x-api-key: KEY``
        (Anthropic's)."""
        if header and header.startswith("Bearer "):
            given = header[len("Bearer "):].strip().encode()
        elif api_key:
            given = api_key.strip().encode()
        else:
            return False
        self.load()
        # Compare with every key, in constant time for each.
        return any([hmac.compare_digest(given, key) for key in self.keys])


def authorized(request: Request) -> None:
    """Every route but the dashboard's empty page: a key, when keys are configured."""
    keys: Keys | None = request.app.state.keys
    if keys is not None and not keys.allows(request.headers.get("authorization"),
                                            request.headers.get("x-api-key")):
        raise ApiError(401, "Incorrect API key provided.", "invalid_api_key")
