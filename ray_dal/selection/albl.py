"""Active Learning by Learning (Hsu & Lin 2015) as BADGE's code runs it: a bandit over query strategies.

Each round one arm (a strategy) picks the whole batch. The arm is drawn from

    p = (1 - n * pmin) * w / sum(w) + pmin,   pmin = 1 / (10 n)   (n arms)

and, at the next round, the arm that was drawn has its weight multiplied by

    exp(pmin / 2 * (reward + sqrt(log(n / delta) / n) / p_drawn))

where the reward is the importance-weighted training accuracy of the new model on the labeled set:
the mean over labeled samples of correct_i / w_i, with w_i = 1 for the initial set and, for a queried
sample, the probability of the arm that queried it. All state is plain numbers, kept in each round's
metrics so that a resumed run continues the same bandit.
"""

from __future__ import annotations

import math

import numpy as np

ARMS = ("confidence", "coreset")
DELTA = 0.1


def probabilities(weights: np.ndarray) -> np.ndarray:
    """The arms' draw probabilities for bandit ``weights`` [n] (each at least 1 / (10 n))."""
    weights = np.asarray(weights, dtype=np.float64)
    n = len(weights)
    pmin = 1.0 / (10.0 * n)
    return (1.0 - n * pmin) * weights / weights.sum() + pmin


def draw_arm(weights: np.ndarray, rng: np.random.Generator) -> int:
    p = probabilities(weights)
    return int(rng.choice(len(p), p=p))


def importance_weighted_accuracy(correct: np.ndarray, importance: np.ndarray) -> float:
    """mean(correct_i / importance_i) over the labeled samples (``importance`` in (0, 1])."""
    correct, importance = np.asarray(correct, np.float64), np.asarray(importance, np.float64)
    if correct.shape != importance.shape or correct.size == 0:
        raise ValueError(f"correct and importance must be equal, non-empty shapes; got {correct.shape}, "
                         f"{importance.shape}")
    return float((correct / importance).mean())


def update(weights: np.ndarray, arm: int, reward: float, p_drawn: float, delta: float = DELTA) -> np.ndarray:
    """New bandit weights after ``arm`` (drawn with probability ``p_drawn``) earned ``reward``."""
    weights = np.array(weights, dtype=np.float64)
    n = len(weights)
    pmin = 1.0 / (10.0 * n)
    weights[arm] *= math.exp(pmin / 2.0 * (reward + math.sqrt(math.log(n / delta) / n) / p_drawn))
    return weights
