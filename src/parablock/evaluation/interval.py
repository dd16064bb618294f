"""The 95% interval of an accuracy: Wilson's score interval for a binomial proportion.

An accuracy on n items is k successes out of n; the Wilson interval (Wilson 1927) is the set of
true rates p whose normal test does not reject k/n. Unlike the plain p ± 1.96·sqrt(p(1-p)/n) it
stays inside [0, 1] and does not collapse to a point at 0/n or n/n, which is exactly where a small
model's accuracy sits before training. Kept free of torch so that ``parablock status`` and
``compare`` format it without loading a model.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: float, n: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of ``correct`` successes out of ``n`` trials; (0, 1) when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} must lie in [0, {n}]")
    p = correct / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # at 0/n and n/n the bound is exactly 0 (1); rounding would leave 1e-18 there
    low = 0.0 if correct == 0 else max(0.0, centre - half)
    high = 1.0 if correct == n else min(1.0, centre + half)
    return low, high


def accuracy_text(
    accuracy: float | None, interval: list | tuple | None, fmt: str = "{:.3f}"
) -> str:
    """'0.250 (95% CI 0.160-0.369)', or just the accuracy when no interval is known."""
    if accuracy is None:
        return "-"
    text = fmt.format(accuracy)
    if interval:
        text += f" (95% CI {fmt.format(interval[0])}-{fmt.format(interval[1])})"
    return text
