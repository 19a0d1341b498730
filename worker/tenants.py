"""Tenants of a shared input topic: a session belongs to the tenant whose records write it.

With ``GRU_LIMITS__TENANT_HEADER`` set, every input record names its tenant in that Kafka
header, and a session is ``(tenant, session_id)``: the worker knows it as
``<tenant>/<session_id>`` (its state key, its predictions' key), so records that name tenant
A cannot load, advance, hold back or end a session of tenant B, whatever session ids they
use. A record without the header, with it twice, or with a name outside ``[A-Za-z0-9_.-]{1,64}``
is dead-lettered.

A header is only as trustworthy as whoever sets it. With ``GRU_LIMITS__TENANT_SECRET`` too,
a record must also carry ``<header>-signature``: the hex HMAC-SHA256 of its session_id under
its tenant's key, where a tenant's key is the HMAC-SHA256 of the secret and the tenant's name
(``python -m worker tenant-key NAME`` prints it). Each tenant's producers hold their own key
only, so they can name no other tenant; the worker holds the secret. Without the secret the
header is a boundary only where something trusted sets it (a gateway that authenticates
producers and overwrites the header). docs/security.md has the threat model.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re

from .ports import Record

TENANT_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
SEPARATOR = "/"  # not in a tenant's name: the first one splits a scoped id


class TenantError(ValueError):
    """A record's tenant is missing, malformed or not proven; the message says which."""


@functools.lru_cache(maxsize=4096)
def tenant_key(secret: bytes, tenant: str) -> bytes:
    """Tenant ``tenant``'s signing key under the worker's ``secret``."""
    return hmac.new(secret, b"gru-tenant:" + tenant.encode(), hashlib.sha256).digest()


def sign(key: bytes, session_id: str) -> bytes:
    """The signature header's value for ``session_id``: what a tenant's producer sends."""
    return hmac.new(key, session_id.encode("utf-8"), hashlib.sha256).hexdigest().encode()


def scoped(tenant: str, session_id: str) -> str:
    return f"{tenant}{SEPARATOR}{session_id}"


def split(scoped_id: str) -> tuple[str, str]:
    """(tenant, session_id) of a scoped session id."""
    tenant, _, session_id = scoped_id.partition(SEPARATOR)
    return tenant, session_id


class TenantRule:
    """Reads and checks a record's tenant (``header``; with ``secret``, its signature)."""

    def __init__(self, header: str, secret: bytes | None = None) -> None:
        self.header, self.signature_header = header, f"{header}-signature"
        self._secret = secret

    def scope(self, record: Record, session_id: str) -> str:
        """``<tenant>/<session_id>`` for ``record``, or TenantError."""
        name = self._one(record, self.header)
        try:
            tenant = name.decode("ascii")
        except UnicodeDecodeError:
            tenant = ""
        if not TENANT_PATTERN.fullmatch(tenant):
            raise TenantError(f"header {self.header!r} is {name[:80]!r}, not a tenant name "
                              f"({TENANT_PATTERN.pattern})")
        if self._secret is not None:
            given = self._one(record, self.signature_header)
            want = sign(tenant_key(self._secret, tenant), session_id)
            if not hmac.compare_digest(given, want):
                raise TenantError(f"header {self.signature_header!r} does not sign session_id "
                                  f"{session_id[:80]!r} for tenant {tenant!r}: a producer "
                                  f"signs with its own tenant's key (python -m worker "
                                  f"tenant-key)")
        return scoped(tenant, session_id)

    @staticmethod
    def _one(record: Record, header: str) -> bytes:
        values = [v for k, v in record.headers if k == header]
        if len(values) != 1:
            how = "missing" if not values else f"given {len(values)} times"
            raise TenantError(f"header {header!r} is {how}: this topic's records name their "
                              f"tenant once (GRU_LIMITS__TENANT_HEADER)")
        return values[0] or b""
