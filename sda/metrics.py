"""How results are measured: the confidence interval of an error rate.

Kept apart from the training code, so that the evaluate stage does not depend on it.
"""

import math


def confidence_interval_95(error: float, n: int) -> float:
    """Half-width of the normal-approximation 95% CI of an error rate measured on n examples."""
    return 1.96 * math.sqrt(error * (1.0 - error) / n)
