"""Money is integer micro-USD everywhere; these are the only conversions to and from text."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

MICROS_PER_USD = 1_000_000


def usd_to_micros(text: str) -> int:
    """'1.5' -> 1_500_000. Exact (Decimal, never float); refuses sub-micro amounts."""
    try:
        value = Decimal(text.strip().removeprefix("$"))
    except InvalidOperation as exc:
        raise ValueError(f"not an amount in USD: {text!r}") from exc
    micros = value * MICROS_PER_USD
    if not micros.is_finite() or micros != micros.to_integral_value():
        raise ValueError(f"amount must be a whole number of micro-USD: {text!r}")
    return int(micros)


def format_usd(micros: int) -> str:
    """1_500_000 -> '$1.50'; keeps sub-cent digits when there are any ('$0.0015')."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}${whole}.{digits}"
