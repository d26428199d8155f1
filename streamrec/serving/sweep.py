"""Finding the saturation rate of an open-loop run: the highest offered rate whose achieved rate
is at least `PASS_FRACTION` of it with zero errors (issue 16's definition). Rates double from
`start` until a step fails, then bisect between the last pass and the first failure."""

from __future__ import annotations

from collections.abc import Callable

PASS_FRACTION = 0.95

Step = dict[str, object]


def passes(step: Step) -> bool:
    return step["errors"] == 0 and float(step["achieved_rps"]) >= PASS_FRACTION * float(step["offered_rps"])


def find_saturation(measure: Callable[[float], Step], start: float = 250.0, ceiling: float = 64_000.0,
                    resolution: float = 0.08, floor: float = 10.0) -> tuple[Step | None, list[Step]]:
    """(the passing step at the highest rate, or None when even `floor` fails; every step in order).
    Bisection stops when the bracket is narrower than `resolution` of its lower end."""
    steps: list[Step] = []

    def step(rate: float) -> bool:
        result = measure(round(rate, 1))
        result["pass"] = passes(result)
        steps.append(result)
        return bool(result["pass"])

    rate = start
    while not step(rate):  # below the start: halve until one passes
        if rate / 2 < floor:
            return None, steps
        rate /= 2
    best, low = steps[-1], rate
    high = None if rate == start else rate * 2  # after halving, the failing end is already known
    while high is None and low * 2 <= ceiling:
        if step(low * 2):
            best, low = steps[-1], low * 2
        else:
            high = low * 2
    if high is None:
        return best, steps
    while (high - low) > resolution * low:
        middle = (low + high) / 2
        if step(middle):
            best, low = steps[-1], middle
        else:
            high = middle
    return best, steps
