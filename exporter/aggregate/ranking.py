"""Top-N with hysteresis and an OTHER remainder: the one way every outside-fed label
(remote address, local port, program, namespace) is bounded, so sums stay exact and label
sets do not flap between samples.
"""
from __future__ import annotations

from typing import Mapping

from ..sources.table import NETSTAT_STATES

OTHER = "other"  # the remainder after the top-N (and after the series limit)
# A key that was in the top-N keeps its place until a newcomer has more than
# HYSTERESIS_RATIO times its count plus HYSTERESIS_MIN: close counts must not make label sets
# flap between samples (each flap is a new series in Prometheus).
HYSTERESIS_RATIO = 1.1
HYSTERESIS_MIN = 1


def top_n(counts: Mapping, n: int, incumbents: frozenset = frozenset(),
          minimum: int = 1) -> list[tuple]:
    """Pick n keys by count, keeping the previous members unless clearly beaten; only keys
    with at least `minimum` compete (before the ranking: an incumbent that fell below it
    must not hold a place a qualifying key then cannot take).

    Worked example, n=1: counts {a: 10, b: 11}, incumbents {a}: a scores 10 * 1.1 + 1 = 12 and
    stays; with b at 13 instead, b takes the place. Keys must be orderable (ties: lower key).
    """
    def score(item):
        key, count = item
        bonus = count * HYSTERESIS_RATIO + HYSTERESIS_MIN if key in incumbents else count
        return (-bonus, key not in incumbents, key)
    least = max(1, minimum)
    ranked = sorted(((k, c) for k, c in counts.items() if c >= least), key=score)[:max(0, n)]
    return sorted(ranked, key=lambda kc: (-kc[1], kc[0]))


def top_with_remainder(per_key: Mapping[str, Mapping[str, int]], top: int,
                       incumbents: frozenset) -> tuple[list[str], dict[str, int]]:
    """The `top` keys by their count over all states (top_n's hysteresis), and per state
    the count of every other key: the OTHER bucket that keeps the sums exact."""
    totals = {key: sum(states.values()) for key, states in per_key.items()}
    shown = [key for key, _ in top_n(totals, top, incumbents)]
    rest = [states for key, states in per_key.items() if key not in set(shown)]
    return shown, {state: sum(states[state] for states in rest)
                   for state in NETSTAT_STATES.values()}
