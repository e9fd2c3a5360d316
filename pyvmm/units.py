"""Parsing and printing of sizes and counts as users type them (``256M``, ``1G``, ``1_000_000``)."""

from __future__ import annotations

import re

from .errors import ConfigError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(\d[\d_]*)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """Bytes in ``text``: a number with an optional binary suffix K, M, G, T (KiB, MB... accepted).

    Raises ConfigError naming ``what`` on anything else.
    """
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"invalid {what} {text!r}: expected a number with an optional "
                          f"K/M/G/T suffix, e.g. 256M")
    return int(match.group(1).replace("_", "")) * _UNITS[match.group(2).upper()]


def parse_count(text: str, what: str = "count") -> int:
    """A non-negative integer, allowing ``_`` separators and K/M/G decimal suffixes (1M = 10**6)."""
    match = re.match(r"^\s*(\d[\d_]*)\s*([KMG]?)\s*$", text, re.IGNORECASE)
    if not match:
        raise ConfigError(f"invalid {what} {text!r}: expected a whole number, e.g. 5000000 or 5M")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[match.group(2).upper()]
    return int(match.group(1).replace("_", "")) * scale


def format_size(nbytes: int) -> str:
    """``1.5 GiB``-style text for messages."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
