"""Network address rules both sides share: which hosts are this machine's loopback.

The cloud binds ``serve --insecure`` only to loopback; the edge sends a token over plain
``http://`` only to loopback (unless told the network is trusted). One rule for both.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1`` (brackets allowed)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


__all__ = ["is_loopback"]
