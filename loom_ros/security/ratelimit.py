"""One token bucket for every rate Loom enforces on what strangers send (the bridge's inbound
rules, the cloud tier's senders, new fleet certificates to check). The clock is injected, so
limits are tested without sleeping. Pure Python."""
from __future__ import annotations

from collections.abc import Callable


class TokenBucket:
    """`rate` tokens per second up to `burst`; `take()` is False when none is left."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float]):
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self.tokens = float(burst)
        self.last = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def give_back(self) -> None:
        """Return a token taken for work whose outcome charged another budget instead."""
        self.tokens = min(self.burst, self.tokens + 1.0)
