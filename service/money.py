"""Money is integer micro-USD everywhere; these are the only conversions to and from text."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation, localcontext

MICROS_PER_USD = 1_000_000
# One credit at most ($1,000,000): above any real top-up, and a typo of a few
# extra digits is refused rather than credited.
MAX_CREDIT_MICROS = 10**12
# A balance at most ($1,000,000,000): sums stay far inside the int64 of SQLite
# and PostgreSQL, where an overflowing SQLite sum would silently become a float.
MAX_BALANCE_MICROS = 10**15
# Longer text is no amount anyone means; the bound also keeps Decimal exact below.
_MAX_TEXT = 40


def usd_to_micros(text: str) -> int:
    """'1.5' -> 1_500_000. Exact (Decimal, never float); refuses sub-micro amounts."""
    amount = text.strip().removeprefix("$")
    try:
        if len(amount) > _MAX_TEXT:
            raise InvalidOperation
        value = Decimal(amount)
    except InvalidOperation:
        raise ValueError(f"not an amount in USD: {_show(text)}") from None
    if not value.is_finite():
        raise ValueError(f"not an amount in USD: {_show(text)}")
    if value.adjusted() >= 13:
        raise ValueError(f"amount too large: {_show(text)}")
    # Precision well above 40 digits: the product is exact, never rounded.
    with localcontext() as ctx:
        ctx.prec = 100
        micros = value * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError(f"amount must be a whole number of micro-USD: {_show(text)}")
    return int(micros)


def credit_micros(text: str, *, allow_zero: bool = False) -> int:
    """A credit as an admin types it: positive (or zero) and at most MAX_CREDIT_MICROS."""
    micros = usd_to_micros(text)
    if micros < 0 or (micros == 0 and not allow_zero):
        raise ValueError(f"credit must be a positive amount in USD, not {_show(text)}")
    check_credit(micros)
    return micros


def check_credit(micros: int) -> None:
    """The stores' own guard, whoever calls them: an int from 0 to MAX_CREDIT_MICROS."""
    if type(micros) is not int or micros < 0:
        raise ValueError(f"credit must be a non-negative integer of micro-USD, not {micros!r}")
    if micros > MAX_CREDIT_MICROS:
        raise ValueError(
            f"credit of {format_usd(micros)} is over the limit of "
            f"{format_usd(MAX_CREDIT_MICROS)} per operation"
        )


def format_usd(micros: int) -> str:
    """1_500_000 -> '$1.50'; keeps sub-cent digits when there are any ('$0.0015')."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}${whole}.{digits}"


def decimal_usd(micros: int) -> str:
    """1_500_000 -> '1.500000': exact, all six decimals, no sign for zero, for APIs."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{whole}.{frac:06d}"


def _show(text: str) -> str:
    """The caller's text in a one-line message: quoted, and cut if long."""
    return repr(text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "...")
