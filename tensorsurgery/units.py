"""Numbers as people read them, for every view (``plan``, the card, ``--link``'s summary)."""
from __future__ import annotations


def format_bytes(n: float) -> str:
    """Decimal units, as Hugging Face and disk vendors count: ``format_bytes(21.5e9) == '21.50 GB'``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
