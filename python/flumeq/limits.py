"""Global limits: ``Engine(rate_limits={"email:send": "100/s"},
concurrency_limits={"report:build": 2})``, held across every engine on the
same Redis.

The dispatcher checks each read's batch once against them (one Lua call
when the batch holds a limited type, none otherwise). A task over a limit
is held back: it goes to its queue's delayed set with its attempt
unchanged, counted as ``throttled`` (never as failed), and comes back when
there should be room.

- A rate (``"N/s"``, ``"N/m"``, ``"N/h"``) is enforced with GCRA on Redis's
  clock, key ``<prefix>:{limits}:rate:<type>``. It allows a burst of
  ``max(1, N // 10)`` tasks: any window of one period starts at most
  ``N + burst`` of them.
- A concurrency limit is a set of leases, ``<prefix>:{limits}:running:<type>``
  (one per running task, 5 s, renewed every second while it runs, freed
  when it ends): a dead engine's places free within 5 s.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Optional

from .errors import ConfigError

__all__ = [
    "PERIODS",
    "burst",
    "checked_concurrency",
    "checked_rates",
    "parse_rate",
    "warn_unserved",
]

log = logging.getLogger("flumeq.limits")

#: The periods a rate may name, in ms.
PERIODS = {"s": 1_000, "m": 60_000, "h": 3_600_000}

_RATE = re.compile(r"^\s*(\d+)\s*/\s*([smh])\s*$")


def parse_rate(text: Any, kind: str = "?") -> tuple[int, int]:
    """``"100/s"`` as ``(100, 1000)``: tasks, per period in ms. A
    ``ConfigError`` names the type and the expected form otherwise."""
    match = _RATE.match(text) if isinstance(text, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ConfigError(
            f"rate_limits[{kind!r}]: expected a rate like '100/s', '20/m' or '5/h' "
            f"(a whole number >= 1 per s, m or h), got {text!r}"
        )
    return int(match.group(1)), PERIODS[match.group(2)]


def burst(count: int) -> int:
    """The burst a rate of ``count`` per period allows (the dispatcher's
    formula)."""
    return max(1, count // 10)


def _checked_type(kind: Any, what: str) -> str:
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"{what} keys must be task type strings, got {kind!r}")
    return kind


def checked_rates(rates: Optional[Mapping[str, Any]]) -> list[tuple[str, int, int]]:
    """``rate_limits`` as ``(type, tasks, period ms)`` triples."""
    if rates is None:
        return []
    if not isinstance(rates, Mapping):
        raise ConfigError(f"rate_limits must map task types to rates like '100/s', got {rates!r}")
    return [
        (_checked_type(kind, "rate_limits"), *parse_rate(rate, kind))
        for kind, rate in rates.items()
    ]


def checked_concurrency(limits: Optional[Mapping[str, Any]]) -> list[tuple[str, int]]:
    """``concurrency_limits`` as ``(type, most running)`` pairs."""
    if limits is None:
        return []
    if not isinstance(limits, Mapping):
        raise ConfigError(
            f"concurrency_limits must map task types to whole numbers >= 1, got {limits!r}"
        )
    checked = []
    for kind, most in limits.items():
        _checked_type(kind, "concurrency_limits")
        if isinstance(most, bool) or not isinstance(most, int) or not 1 <= most <= 1_000_000:
            raise ConfigError(
                f"concurrency_limits[{kind!r}]: expected a whole number from 1 to 1000000, "
                f"got {most!r}"
            )
        checked.append((kind, most))
    return checked


def warn_unserved(kinds: set[str], served: Mapping[str, Any]) -> None:
    """Warns of limits on types no handler of this engine serves (they
    limit nothing here)."""
    for kind in sorted(kinds - set(served)):
        log.warning(
            "a limit is set on task type %r, which no handler of this engine serves; "
            "it limits nothing here",
            kind,
        )
