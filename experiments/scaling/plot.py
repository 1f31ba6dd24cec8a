"""The IsoFLOP fit of a sweep's runs, its figure and table: loss against parameters per budget with each
budget's parabola and vertex (left), the compute-optimal parameters and tokens against the budget with their
power laws (right).

  python -m experiments.scaling.plot --out=experiments/scaling/results   # refit runs.json, redraw, print the table
"""

import json
import os

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from llmjax import scaling  # noqa: E402


def mean_over_seeds(runs: list[dict]) -> list[dict]:
    """One point per (budget, size), its losses averaged over the seeds that trained it (kept as lists)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["budget"], r["d_model"], r["n_layers"]), []).append(r)
    return [g[0] | {"seeds": [r["seed"] for r in g], "heldout_losses": [r["heldout_loss"] for r in g],
                    "heldout_loss": float(np.mean([r["heldout_loss"] for r in g])),
                    "train_loss": float(np.mean([r["train_loss"] for r in g]))} for g in groups.values()]


def plot(points: list[dict], fit: dict, path: str) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(fit["budgets"])))
    for c, color, n_opt, loss_opt in zip(fit["budgets"], colors, fit["n_opt"], fit["loss_opt"], strict=True):
        at = [p for p in points if p["budget"] == c]
        n = np.array([p["matmul_params"] for p in at], float)
        loss = np.array([p["heldout_loss"] for p in at])
        for p in at:  # each seed, faint
            left.plot([p["matmul_params"]] * len(p["heldout_losses"]), p["heldout_losses"], ".", color=color, alpha=0.4)
        curve = np.poly1d(np.polyfit(np.log(n), loss, 2))
        grid = np.linspace(np.log(n.min()), np.log(n.max()), 100)
        left.plot(n, loss, "o", color=color, label=f"C = {c:.2g} FLOPs")
        left.plot(np.exp(grid), curve(grid), "-", color=color, alpha=0.6)
        left.plot([n_opt], [loss_opt], "*", color=color, markersize=14, markeredgecolor="k")
    left.set(xscale="log", xlabel="parameters N (matmul)", ylabel="held-out loss (nats/token)",
             title="IsoFLOP curves (mean of seeds; dots: each seed)")
    left.legend(fontsize=8)
    budgets = np.array(fit["budgets"])
    span = np.geomspace(budgets.min() / 2, budgets.max() * 2, 50)
    for key, label, marker in (("n", "N_opt (parameters)", "o"), ("d", "D_opt (tokens)", "s")):
        coef, k = fit[f"{key}_coef"], fit[f"{key}_exponent"]
        line = right.plot(span, coef * span**k, "-", label=f"{label} ∝ C^{k:.2f}")[0]
        right.plot(budgets, fit[f"{key}_opt"], marker, color=line.get_color())
    right.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", title="Compute-optimal allocation")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap on short spans
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(points: list[dict], fit: dict) -> str:
    """The points as a markdown table, each budget's vertex after its runs."""
    lines = ["| budget C | d_model × layers | N (matmul) | tokens D | D/N | steps | held-out loss: mean (each seed) "
             "| train loss |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c, n_opt, d_opt, loss_opt in zip(fit["budgets"], fit["n_opt"], fit["d_opt"], fit["loss_opt"], strict=True):
        for p in sorted((p for p in points if p["budget"] == c), key=lambda p: p["matmul_params"]):
            seeds = ", ".join(f"{x:.3f}" for x in p["heldout_losses"])
            lines.append(f"| {c:.0e} | {p['d_model']} × {p['n_layers']} | {p['matmul_params']:,} | {p['tokens']:,} | "
                         f"{p['tokens'] / p['matmul_params']:.0f} | {p['steps']} | {p['heldout_loss']:.4f} ({seeds}) | "
                         f"{p['train_loss']:.4f} |")
        lines.append(f"| {c:.0e} | **vertex** | **{n_opt:,.0f}** | **{d_opt:,.0f}** | {d_opt / n_opt:.0f} | | "
                     f"{loss_opt:.4f} | |")
    return "\n".join(lines)


def report(runs: list[dict], out: str) -> dict:
    """Fits the seed-averaged runs; writes fit.json and isoflops.png under `out`, prints the table."""
    points = mean_over_seeds(runs)
    fit = scaling.isoflop_fit(*(np.array([p[k] for p in points]) for k in ("budget", "matmul_params", "tokens",
                                                                          "heldout_loss")))
    with open(os.path.join(out, "fit.json"), "w") as f:
        json.dump(fit, f, indent=1)
    plot(points, fit, os.path.join(out, "isoflops.png"))
    print(table(points, fit))
    return fit


def main(argv: list[str]) -> None:
    del argv
    with open(os.path.join(flags.FLAGS.out, "runs.json")) as f:
        report(json.load(f)["runs"], flags.FLAGS.out)


if __name__ == "__main__":
    flags.DEFINE_string("out", "experiments/scaling/results", "Folder holding runs.json.")
    app.run(main)
