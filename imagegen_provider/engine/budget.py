"""The run's money: what was spent, what is in flight, and whether the next request fits ``max_cost_usd``.

Costs are untrusted numbers: a reported cost that is not a finite, non-negative number never reaches the
budget (pricing drops it), and a paid response whose cost nobody can tell is counted at its estimate. When
there is no estimate either and a limit is set, the budget refuses to go on spending blind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from imagegen_provider.engine.pricing import usable_usd

#: Slack for float sums: ten images of $0.02 must fit a $0.20 budget.
_EPSILON = 1e-12


@dataclass(frozen=True)
class Reservation:
    """Money set aside for one request before it is sent.

    :param usd: what is held against the budget until the request settles.
    :param estimate: the list-price (or observed average) estimate of one response, ``None`` when unknown.
    """

    usd: float
    estimate: float | None


class BudgetExceeded(Exception):
    """The next request does not fit; the message says by how much."""


class BlindSpending(Exception):
    """A paid response had no knowable cost while a limit is set: the limit cannot be enforced."""


@dataclass
class Budget:
    """Spending of one run against an optional limit.

    :param limit: ``max_cost_usd``; ``None`` for no limit (costs are still counted).
    """

    limit: float | None = None
    spent: float = 0.0
    reserved: float = 0.0
    #: Responses settled, and those whose cost was known (reported or priced).
    settled: int = 0
    known: int = 0
    known_usd: float = 0.0
    #: Largest ratio of images returned to images requested: a gateway that over-delivers also over-charges.
    inflation: float = 1.0

    def __post_init__(self) -> None:
        if self.limit is not None and not (math.isfinite(self.limit) and self.limit >= 0):
            raise ValueError("max_cost_usd must be a finite number, zero or more")

    @property
    def limited(self) -> bool:
        return self.limit is not None

    def must_wait(self, estimate: float | None) -> bool:
        """Whether the next request must wait for those in flight before it is admitted.

        A limited run sends its first request alone: it calibrates what a response really costs (reported
        costs, extra images) before a whole window is committed at the list price. A model without a price
        waits until some response has told its cost.
        """
        if self.limit is None:
            return False
        return self.settled == 0 or (estimate is None and self.known == 0)

    def expected(self, estimate: float | None) -> float:
        """What the next response is expected to cost, as held against the limit."""
        if estimate is None:
            estimate = self.known_usd / self.known if self.known else 0.0
        return estimate * self.inflation

    def admit(self, estimate: float | None) -> Reservation:
        """Reserve the next request's expected cost.

        :raises BudgetExceeded: it would not fit.
        """
        usd = self.expected(estimate)
        if self.limit is not None and self.spent + self.reserved + usd > self.limit + _EPSILON:
            raise BudgetExceeded(
                f"budget: spent ${self.spent:.4f} + in flight ${self.reserved:.4f} + next ${usd:.4f} would exceed "
                f"max_cost_usd=${self.limit:.4f}"
            )
        self.reserved += usd
        return Reservation(usd=usd, estimate=estimate)

    def release(self, reservation: Reservation) -> None:
        """The request was never sent."""
        self.reserved = max(0.0, self.reserved - reservation.usd)

    def settle(self, reservation: Reservation, charges: list[float | None], *, returned: int, requested: int) -> None:
        """Count what a sent request cost: one charge per paid response (``None`` when unknown).

        :raises BlindSpending: a charge was unknown, there is no estimate, and a limit is set. The spending
            is counted first.
        """
        self.release(reservation)
        self.settled += 1
        if requested > 0 and returned > requested:
            self.inflation = max(self.inflation, returned / requested)
        blind = False
        for charge in charges:
            usd = usable_usd(charge)
            if usd is not None:
                self.spent += usd
                self.known += 1
                self.known_usd += usd
            elif reservation.estimate is not None or self.known:
                # Unknown (or garbage) cost of a paid response: count it as the list price (or what responses
                # have cost so far), never as free.
                self.spent += self.expected(reservation.estimate)
            else:
                blind = True
        if blind and self.limit is not None:
            raise BlindSpending(
                f"max_cost_usd=${self.limit:.4f} cannot be enforced: a paid response had no reported cost and its "
                "model has no price (add it with prices / --prices, or map it with price_as / --price-as)"
            )
