"""The IsoFLOP fit recovers the compute-optimal exponents of a known loss law."""

import numpy as np
import pytest

from llmjax import scaling

# Chinchilla's fitted law (Hoffmann et al. 2022, approach 3): L(N, D) = E + A / N^a + B / D^b.
E, A, B, ALPHA_N, BETA_D = 1.69, 406.4, 410.7, 0.34, 0.28


def law(n, d):
    return E + A / n**ALPHA_N + B / d**BETA_D


def test_parabola_minimum_and_refusal():
    x = np.linspace(-2, 3, 7)
    assert scaling.parabola_minimum(x, 2 * (x - 0.7) ** 2 + 1.5) == pytest.approx((0.7, 1.5))
    with pytest.raises(ValueError, match="no minimum"):
        scaling.parabola_minimum(x, -(x**2))


def test_power_law_exact():
    x = np.geomspace(1e10, 1e14, 5)
    assert scaling.power_law(x, 3e-2 * x**0.37) == pytest.approx((3e-2, 0.37))


def test_isoflop_fit_recovers_known_optimum():
    """With C = 6 N D, minimising L along D = C / (6 N): d/dN [A N^-a + B (C/6)^-b N^b] = 0 gives
    a A N^-a = b B (C/6)^-b N^b, so N_opt = G (C/6)^(b/(a+b)) with G = (a A / (b B))^(1/(a+b)), and
    D_opt = C / (6 N_opt) = (C/6)^(a/(a+b)) / G. Chinchilla's constants: exponents 0.4516 and 0.5484.

    The sizes are a fixed grid around the 20-tokens-per-parameter rule, not around the true optimum, as a real
    sweep would be; parabolas in log N are only close to the true curve, hence the tolerances."""
    n_exp, d_exp = BETA_D / (ALPHA_N + BETA_D), ALPHA_N / (ALPHA_N + BETA_D)
    g = (ALPHA_N * A / (BETA_D * B)) ** (1 / (ALPHA_N + BETA_D))
    budget, n, d = [], [], []
    for c in (1e18, 1e19, 1e20, 1e21):
        for size in np.sqrt(c / 120) * np.geomspace(0.1, 10, 9):
            budget.append(c), n.append(size), d.append(c / (6 * size))
    fit = scaling.isoflop_fit(budget, n, d, law(np.array(n), np.array(d)))
    assert fit["n_exponent"] == pytest.approx(n_exp, abs=0.005)
    assert fit["d_exponent"] == pytest.approx(d_exp, abs=0.005)
    assert fit["n_exponent"] + fit["d_exponent"] == pytest.approx(1.0, abs=1e-6)  # N_opt D_opt = C/6 exactly
    c = np.array(fit["budgets"])
    np.testing.assert_allclose(fit["n_opt"], g * (c / 6) ** n_exp, rtol=0.05)
    np.testing.assert_allclose(fit["d_opt"], (c / 6) ** d_exp / g, rtol=0.05)
    np.testing.assert_allclose(fit["loss_opt"], law(np.array(fit["n_opt"]), np.array(fit["d_opt"])), atol=0.01)
    assert all(fit["in_range"])


def test_isoflop_fit_needs_three_runs_per_budget():
    with pytest.raises(ValueError, match="at least 3"):
        scaling.isoflop_fit([1e18, 1e18, 1e19, 1e19, 1e19], [1, 2, 1, 2, 3], [1, 2, 1, 2, 3], [3, 2, 3, 2, 3])
