"""What a request costs, from what was delivered (the reservation is ImageRequest.quote).

Per-image models cost `images * unit price`. Token-priced models (gpt-image)
cost what the upstream's reported usage comes to at the model's token prices,
rounded up to the micro-USD, never more than the reservation and never more
than the delivered images' list price plus the input's bound; usage that makes
no sense (negative, or far above the list price) is refused, never credited,
and the call is charged at the per-image price instead.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from service.catalog import TOKENS_PER_PRICE_UNIT, TokenPrices
from service.providers.base import TokenUsage

if TYPE_CHECKING:
    from service.providers.dispatch import CallResult
    from service.requests import ImageRequest

log = logging.getLogger("imagegate.costs")

# Usage worth more than this many times the call's list price is not believed.
ABSURD_FACTOR = 10
# Larger than any real count; also keeps usage within the response's uint32 fields.
MAX_TOKENS = 100_000_000


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@dataclass(frozen=True)
class Bill:
    """What to settle, and what to record about who served it."""

    cost_micros: int
    upstream_cost_micros: int
    # The routes that delivered images, "," -joined in call order when several did.
    provider: str
    upstream_model: str
    # The usage believed, summed over the calls (reported to the caller).
    usage: TokenUsage = field(default_factory=TokenUsage)


def bill(request: ImageRequest, calls: Sequence[CallResult], reserved: int) -> Bill:
    model, unit = request.model, request.unit_price
    prices = model.token_prices
    charged = upstream = token_value = 0
    usage = TokenUsage()
    for call in calls:
        images = len(call.images)
        list_price = images * unit
        upstream_list = images * model.upstream_unit_price(
            call.route, request.size, request.quality
        )
        believed = _believed(call.usage, request, images, prices, call.route.label)
        if believed is not None:
            usage += believed
        if prices is None or believed is None or believed == TokenUsage():
            charged += list_price
            upstream += upstream_list
        else:
            token_value += _token_value(believed, prices)
    token_cost = ceil_div(token_value, TOKENS_PER_PRICE_UNIT)
    delivered = sum(len(c.images) for c in calls)
    cap = min(reserved, delivered * unit + request.input_bound_micros(len(calls)))
    routes = list(dict.fromkeys(c.route.key for c in calls))
    return Bill(
        cost_micros=min(charged + token_cost, cap),
        upstream_cost_micros=upstream + token_cost,
        provider=",".join(provider for provider, _ in routes),
        upstream_model=",".join(upstream_model for _, upstream_model in routes),
        usage=usage,
    )


def _token_value(usage: TokenUsage, prices: TokenPrices) -> int:
    """micro-USD * 1M: summed before the one rounding up."""
    return (
        usage.input_text_tokens * prices.text_input
        + usage.input_image_tokens * prices.image_input
        + usage.output_tokens * prices.output
    )


def _believed(
    usage: TokenUsage,
    request: ImageRequest,
    images: int,
    prices: TokenPrices | None,
    route: str,
) -> TokenUsage | None:
    """The call's usage if it makes sense, else None (and a warning)."""
    counts = (usage.input_text_tokens, usage.input_image_tokens, usage.output_tokens)
    sane = all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= MAX_TOKENS for c in counts
    )
    if sane and prices is not None:
        ceiling = images * request.unit_price + request.input_bound_micros(1)
        sane = _token_value(usage, prices) <= ABSURD_FACTOR * ceiling * TOKENS_PER_PRICE_UNIT
    if sane:
        return usage
    log.warning(
        "route %s reported usage that makes no sense (%s); charged per image instead",
        route,
        ", ".join(str(c) for c in counts),
    )
    return None
