"""API keys: read from the environment or a file, held only as SHA-256 digests, compared in constant time."""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from lifecycle.errors import ConfigError


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Who a presented key belongs to. No keys configured: every request is denied (deny by default)."""

    def __init__(self, digests: dict[str, str]):
        self._digests = dict(digests)  # sha256 hex -> key id (the name metered in usage; never the key)

    @classmethod
    def from_sources(cls, env_var: str | None, file: str | None) -> "KeyStore":
        """Keys from env var `env_var` (comma-separated) and/or `file` (one per line: `name:key`, `key`, or
        `name:sha256:<hex>` for a key stored pre-hashed; `#` comments)."""
        entries = [e.strip() for e in os.environ.get(env_var, "").split(",")] if env_var else []
        if file:
            path = Path(file)
            if not path.is_file():
                raise ConfigError(f"auth.keys_file={file}: no such file; create it with one `name:key` per line")
            entries += [ln.strip() for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
        digests = {}
        for entry in filter(None, entries):
            name, sep, rest = entry.partition(":")
            if not sep:
                name, rest = "", entry
            if rest.startswith("sha256:"):
                hexd = rest.removeprefix("sha256:").lower()
                if len(hexd) != 64:
                    raise ConfigError(f"auth.keys_file: key {name!r}: a sha256 digest has 64 hex digits")
                digests[hexd] = name or f"key-{hexd[:8]}"
            else:
                d = digest(rest)
                digests[d] = name or f"key-{d[:8]}"
        return cls(digests)

    def with_key(self, key: str, name: str) -> "KeyStore":
        """A copy that also accepts `key` as `name` (the self-check's one-off key, never written anywhere)."""
        return KeyStore({**self._digests, digest(key): name})

    def __len__(self) -> int:
        return len(self._digests)

    def identify(self, presented: str | None) -> str | None:
        """The key id of `presented`, or None. Every stored digest is compared (no early exit on a match)."""
        if not presented:
            return None
        given, found = digest(presented).encode(), None
        for stored, name in self._digests.items():
            if hmac.compare_digest(stored.encode(), given):
                found = name
        return found


def bearer(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (the scheme is case-insensitive, the key is not)."""
    if not header:
        return None
    scheme, _, key = header.strip().partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None
