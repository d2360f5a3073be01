"""Exact fixed-point amounts: millionths of a unit, held as Python ints.

The API accepts JSON numbers (or decimal strings) such as ``2``, ``2.0`` and ``2.5``;
msgspec hands them over as ``Amount`` (a ``Decimal``) parsed from the text, so no float is
ever involved. Out of the service they go as JSON numbers again, through ``Decimal``.
"""

from __future__ import annotations

import functools
import re
from decimal import Decimal, InvalidOperation
from typing import Any, cast

SCALE = 1_000_000  # micro-units per unit
SCALE_DIGITS = 6
#: The largest amount one request, one plan limit or one credit may carry, in units.
#: Lua numbers are doubles, exact up to 2**53 micro-units (~9.0e9 units): every sum the
#: scripts make stays far below that.
MAX_UNITS = 1_000_000_000
MAX_MICRO = MAX_UNITS * SCALE
#: The most credits one user may hold of one meter, in micro-units: each credit is at most
#: MAX_MICRO, and the balance they add up to is capped too (in the PostgreSQL transaction
#: that adds them), so that what a script reads and sums (an allowance, the credits, a
#: debit's amount) stays exact in Lua's doubles.
MAX_BALANCE_MICRO = 2 * MAX_MICRO
assert MAX_MICRO + MAX_BALANCE_MICRO + MAX_MICRO < 2**53


class AmountError(ValueError):
    """An amount is not a finite, positive number within scale and bounds."""


#: A JSON number's grammar: what an amount given as a string must hold too. Decimal() alone
#: would take "1_0", " 3 ", "+5", "NaN" and digits of other scripts.
NUMBER_TEXT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


class Amount(Decimal):
    """An amount in a request body: a JSON number, or a string holding one ("2.5"), read
    exactly (``decode_hook``; the decoder's ``float_hook=Decimal`` keeps numbers out of
    floats). Range and scale are ``to_micro``'s to judge."""

    __slots__ = ()


#: The default of an amount field that may be left out: a plain Decimal, as the spec
#: writes defaults out and msgspec encodes Decimal itself, not its subclasses.
ZERO = cast(Amount, Decimal(0))


#: A number whose exponent lies this far out is judged the same as with any larger one
#: (too large, too many decimal places, or zero): ``exact_number`` clamps exponents that
#: Decimal cannot hold to it.
EXPONENT_CLAMP = 1000


def exact_number(text: str) -> Decimal:
    """A JSON number's text as an exact Decimal: the ``float_hook`` of every decoder that
    reads amounts. Decimal cannot hold an exponent beyond about 10**18 (``-0e305021520410
    48165961590941029380720``); such a number comes back with its exponent clamped to
    ``EXPONENT_CLAMP``, which ``to_micro`` refuses for the same reason as the original."""
    try:
        return Decimal(text)
    except InvalidOperation:
        pass
    mantissa, _, exponent = text.lower().partition("e")
    sign = -1 if exponent.startswith("-") else 1
    return Decimal(f"{mantissa}e{sign * EXPONENT_CLAMP}")


def read_amount(value: Any) -> Amount:
    """A decoded JSON value as an amount (a decoder with ``float_hook=Decimal`` hands
    numbers over as int or Decimal): a number, or a string holding a JSON number. Raises
    ValueError (a string holding anything else) or TypeError (any other value)."""
    if isinstance(value, str):
        if NUMBER_TEXT.fullmatch(value) is None:
            raise ValueError("must be a number, or a string holding a JSON number such as "
                             "\"2.5\"")
        return Amount(exact_number(value))
    if isinstance(value, int | Decimal) and not isinstance(value, bool):
        return Amount(value)
    raise TypeError(f"Expected a number, got `{type(value).__name__}`")


def decode_hook(kind: type, value: Any) -> Any:
    """msgspec's ``dec_hook`` for ``Amount`` (a decoder with ``float_hook=Decimal``)."""
    if kind is not Amount:
        raise NotImplementedError(f"no decoder for {kind!r}")
    return read_amount(value)


def to_micro(value: Decimal | int, *, allow_zero: bool = False) -> int:
    """Convert an API amount to micro-units, rejecting anything inexact or absurd."""
    if isinstance(value, bool):
        raise AmountError("must be a number")
    if isinstance(value, int):
        value = Decimal(value)
    if not value.is_finite():
        raise AmountError("must be a finite number")
    if value < 0:
        raise AmountError("must not be negative")
    if value == 0 and not allow_zero:
        raise AmountError("must be greater than zero")
    if value > MAX_UNITS:
        raise AmountError(f"must be at most {MAX_UNITS}")
    _, digit_tuple, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite values have an int exponent
    if exponent >= -SCALE_DIGITS:  # at most 16 digits (value <= MAX_UNITS): scaleb is exact
        micro = int(value.scaleb(SCALE_DIGITS))
    else:
        # 2.50000000 is still exact: trailing zeros are dropped before the scale is judged,
        # on the digits themselves (Decimal.normalize would round to 28 digits first, and
        # 1.0000000000000000000000000000001 would pass as 1).
        digits = "".join(map(str, digit_tuple))
        significant = digits.rstrip("0")
        if not significant:
            return 0  # a zero written with many places (allow_zero)
        exponent += len(digits) - len(significant)
        if exponent < -SCALE_DIGITS:
            raise AmountError(f"must have at most {SCALE_DIGITS} decimal places")
        micro = int(significant) * 10 ** (exponent + SCALE_DIGITS)
    assert 0 <= micro <= MAX_MICRO
    return micro


@functools.lru_cache(maxsize=16_384)
def from_micro(micro: int) -> Decimal:
    """Micro-units to an exact Decimal (encoded as a JSON number: 742, 742.5, 0.000001).
    Remembered (a Decimal is immutable): a quota check turns eight meters' limits, usage,
    credits and holds into Decimals, most of them the same few values (0, a plan's limits)."""
    if micro % SCALE == 0:
        return Decimal(micro // SCALE)
    return Decimal(format_micro(micro))


def format_micro(micro: int) -> str:
    """Micro-units as a plain decimal string (for CSV and logs)."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), SCALE)
    if frac == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:06d}".rstrip("0")
