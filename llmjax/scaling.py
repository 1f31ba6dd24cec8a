"""Compute-optimal scaling from IsoFLOP sweeps (Hoffmann et al. 2022, "Chinchilla", approach 2).

Train several model sizes at each compute budget C. Along one budget, loss against log(parameters) is
close to a parabola near its minimum: too small a model underfits, too large a one sees too few tokens.
The vertex gives N_opt(C); the same fit against log(tokens) gives D_opt(C). Power laws N_opt = a * C^alpha
and D_opt = b * C^beta are then straight lines in log-log space, fitted by least squares. Under the
parametric law L(N, D) = E + A / N^a_N + B / D^b_D with C = 6 N D, alpha = b_D / (a_N + b_D) and
beta = a_N / (a_N + b_D) (tests/test_scaling.py derives and checks this).
"""

from collections.abc import Sequence

import numpy as np


def parabola_minimum(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(x, y) at the vertex of the least-squares parabola through the points. A parabola that opens
    downwards has no minimum: the points do not bracket one, so we refuse rather than extrapolate."""
    c2, c1, c0 = np.polyfit(np.asarray(x, float), np.asarray(y, float), 2)
    if c2 <= 0:
        raise ValueError("the points curve downwards (no minimum); add sizes on both sides of the optimum")
    x_min = -c1 / (2 * c2)
    return float(x_min), float(c0 + c1 * x_min + c2 * x_min**2)


def power_law(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(a, k) with y = a * x^k, by least squares on log y = log a + k log x."""
    k, log_a = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(np.exp(log_a)), float(k)


def isoflop_fit(budget: Sequence[float], params: Sequence[float], tokens: Sequence[float],
                loss: Sequence[float]) -> dict:
    """Per budget (runs grouped by equal `budget` labels, at least 3 each): the parabola vertices in
    log(params) and log(tokens); then the power laws of the optima against the budget.

    Returns lists over the sorted budgets (`budgets`, `n_opt`, `d_opt`, `loss_opt`, and `in_range`: whether
    each vertex lies inside the sizes that budget sampled) and the fits `n_coef`, `n_exponent`, `d_coef`,
    `d_exponent`.
    """
    budget_r, params_r, tokens_r, loss_r = (np.asarray(a, float) for a in (budget, params, tokens, loss))
    out: dict = {"budgets": [], "n_opt": [], "d_opt": [], "loss_opt": [], "in_range": []}
    for c in np.unique(budget_r):
        at = budget_r == c
        if at.sum() < 3:
            raise ValueError(f"budget {c:.3g} has {at.sum()} runs; a parabola needs at least 3")
        log_n, log_n_loss = parabola_minimum(np.log(params_r[at]), loss_r[at])
        log_d, _ = parabola_minimum(np.log(tokens_r[at]), loss_r[at])
        out["budgets"].append(float(c))
        out["n_opt"].append(float(np.exp(log_n)))
        out["d_opt"].append(float(np.exp(log_d)))
        out["loss_opt"].append(log_n_loss)
        out["in_range"].append(bool(params_r[at].min() <= np.exp(log_n) <= params_r[at].max()))
    if len(out["budgets"]) < 2:
        raise ValueError("a power law over budgets needs at least 2 budgets")
    out["n_coef"], out["n_exponent"] = power_law(out["budgets"], out["n_opt"])
    out["d_coef"], out["d_exponent"] = power_law(out["budgets"], out["d_opt"])
    return out
