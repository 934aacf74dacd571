"""Every plot of the analyses: one per unit analysis (:data:`PLOTS`) and the behaviour strength curve,
drawn with matplotlib's Agg backend (imported only when a plot is drawn) and written as marked PNGs."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from austeer_pl.core.fileio import png_output, save_figure
from austeer_pl.core.output import Output
from austeer_pl.fit.judged import DEFAULT_BUDGET


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib  # noqa: PLC0415 - plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - plots only

    return plt


def save_plot(fig, path: str | os.PathLike | Output) -> Path:
    """Write ``fig`` atomically as a marked PNG (through ``path``'s :class:`Output` rule) and close it."""
    output = path if isinstance(path, Output) else png_output(path)
    try:
        return save_figure(fig, output)
    finally:
        pyplot().close(fig)


def title_of(result: dict[str, Any]) -> str:
    return f"{result.get('task_name', result.get('task'))} - {result.get('base_model')} ({result.get('split')}, n={result.get('n_examples')})"


def plot_sweep(result: dict[str, Any], path) -> Path:
    plt = pyplot()
    rows = result["units"]
    x = [r["unit"] for r in rows]
    colors = ["tab:green" if r["momentum"] > 0 else "tab:red" for r in rows]
    b = result["block"]
    name = f"L{b['layer']} head {b['head']}" if b["site"] == "attention" else f"L{b['layer']} FFN"
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for ax, key, label in ((axes[0], "accuracy", "accuracy"), (axes[1], "margin", "mean margin (nats)")):
        base = result["unsteered"][key]
        values = [r[key] for r in rows]
        ax.vlines(x, base, values, colors=colors, lw=2)
        ax.scatter(x, values, c=colors, s=18, zorder=3, label="one unit (green m>0, red m<0)")
        ax.axhline(
            result["whole_block"][key],
            color="tab:blue",
            ls="--",
            label=f"whole block ({result['whole_block']['n_units']} units)",
        )
        ax.axhline(base, color="black", ls=":", label="unsteered")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8, loc="best")
    axes[1].set_xlabel(f"unit index within the {b['site']} site (every {b['stride']})")
    fig.suptitle(f"Dimension sweep, {name}, alpha={result['alpha']:g}\n{title_of(result)}", fontsize=10)
    return save_plot(fig, path)


def plot_combinations(result: dict[str, Any], path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5), sharey="row")
    pos, neg = result["positive"], result["with_negative"]
    for row, key in enumerate(("accuracy", "margin")):
        axes[row, 0].plot([p["n_positive"] for p in pos], [p[key] for p in pos], "o-", color="tab:green")
        axes[row, 0].set_xscale("log", base=2)
        axes[row, 0].set_xticks([p["n_positive"] for p in pos], [str(p["n_positive"]) for p in pos])
        axes[row, 1].plot([p["n_negative"] for p in neg], [p[key] for p in neg], "o-", color="tab:red")
        axes[row, 1].set_xscale("symlog", base=2, linthresh=1)
        axes[row, 1].set_xticks([p["n_negative"] for p in neg], [str(p["n_negative"]) for p in neg])
        for ax in axes[row]:
            ax.axhline(result["unsteered"][key], color="black", ls=":", label="unsteered")
        axes[row, 0].set_ylabel(key if key == "accuracy" else "mean margin (nats)")
    axes[1, 0].set_xlabel("positive-momentum AUs steered together")
    base = neg[0]["n_positive"] if neg else 0
    axes[1, 1].set_xlabel(f"negative-momentum AUs added to the best {base} ({result['negative_rule']})")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"AU combinations ({result['site']}, alpha={result['alpha']:g})\n{title_of(result)}", fontsize=10)
    return save_plot(fig, path)


def plot_strength(result: dict[str, Any], path) -> Path:
    plt = pyplot()
    pts = [p for p in result["points"] if p["kl_mean"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([p["alpha"] for p in pts], [p["kl_mean"] for p in pts], "o-", label="mean KL")
    ax.plot([p["alpha"] for p in pts], [p["kl_median"] for p in pts], "s--", alpha=0.7, label="median KL")
    ax.set_xscale("log")
    ax.set_xlabel("alpha")
    ax.set_ylabel("KL(steered || unsteered), nats")
    ax2 = ax.twinx()
    ax2.plot(
        [p["alpha"] for p in result["points"]],
        [p["top1_agreement"] for p in result["points"]],
        "^:",
        color="tab:gray",
        label="top-1 agreement",
    )
    ax2.set_ylabel("top-1 agreement with unsteered")
    ax2.set_ylim(-0.02, 1.02)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [l.get_label() for l in lines], fontsize=8, loc="center right")
    fig.suptitle(
        f"Strength convergence (top-{result['k']} {result['site']} AUs, {result['sign']})\n{title_of(result)}",
        fontsize=10,
    )
    return save_plot(fig, path)


def plot_tokens(result: dict[str, Any], path) -> Path:
    plt = pyplot()
    rows = sorted(result["raised"] + result["lowered"], key=lambda r: r["logit_change"])
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.3 * len(rows) + 1.5)))
    ax.barh(
        range(len(rows)),
        [r["logit_change"] for r in rows],
        color=["tab:green" if r["logit_change"] > 0 else "tab:red" for r in rows],
    )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([ascii(r["token"]) for r in rows], fontsize=8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("mean next-token logit change at the answer position")
    u = result["unit"]
    fig.suptitle(
        f"Tokens moved by {u['site']} L{u['layer']} unit {u['unit']} (m={u['momentum']:+.2f}, alpha={result['alpha']:g})\n{title_of(result)}",
        fontsize=10,
    )
    return save_plot(fig, path)


def plot_sign(result: dict[str, Any], path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    alphas = sorted({p["alpha"] for p in result["points"]})
    for ax, key in zip(axes, ("accuracy", "margin")):
        for sign, color in (("promote", "tab:green"), ("both", "tab:purple")):
            for i, a in enumerate(alphas):
                pts = [p for p in result["points"] if p["sign"] == sign and p["alpha"] == a]
                ax.plot(
                    [p["k"] for p in pts],
                    [p[key] for p in pts],
                    "o-" if i == 0 else "s--",
                    color=color,
                    alpha=1.0 - 0.5 * i / max(1, len(alphas) - 1),
                    label=f"{sign}, alpha={a:g}",
                )
        ax.axhline(result["unsteered"][key], color="black", ls=":", label="unsteered")
        ax.set_xscale("log")
        ks = sorted({p["k"] for p in result["points"]})
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("k (steered AUs)")
        ax.set_ylabel(key if key == "accuracy" else "mean margin (nats)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Promotion vs. suppression ({result['site']})\n{title_of(result)}", fontsize=10)
    return save_plot(fig, path)


PLOTS = {
    "sweep": plot_sweep,
    "combinations": plot_combinations,
    "strength": plot_strength,
    "tokens": plot_tokens,
    "sign": plot_sign,
}


def plot_strength_curve(result: Mapping[str, Any], path: str | os.PathLike | Output) -> Path:
    """Judge score (share positive with its 95% interval, mean score) and perplexity against alpha, one column per state."""

    plt = pyplot()
    import matplotlib.ticker as mticker  # noqa: PLC0415 - plots only

    methods = result["methods"]
    base = result["unsteered"]
    fig, axes = plt.subplots(2, len(methods), figsize=(5.2 * len(methods), 7), squeeze=False, sharey="row")
    for col, (label, m) in enumerate(methods.items()):
        pts = sorted(m["points"], key=lambda p: p["alpha"])
        x = [p["alpha"] for p in pts]
        ax = axes[0][col]
        ax.fill_between(
            x,
            [p["ci_low"] for p in pts],
            [p["ci_high"] for p in pts],
            color="tab:green",
            alpha=0.2,
            label="95% interval",
        )
        ax.plot(x, [p["share_positive"] for p in pts], "o-", color="tab:green", label="share positive")
        ax.plot(
            x, [p["mean_score"] for p in pts], "s--", color="tab:blue", label=f"mean {base.get('score_name', 'score')}"
        )
        ax.axhline(base["share_positive"], color="black", ls=":", lw=1, label="unsteered share")
        for j, (name, point) in enumerate(result.get("prompts", {}).items()):  # prompting baselines: no alpha
            ax.axhline(point["share_positive"], color=f"C{4 + j}", ls="-.", lw=1, label=f"{name} prompt share")
        ax.set_ylim(-1.05, 1.05)
        ax.set_title(
            f"{label} (k={m['k']})" if label == m["method"] else f"{label} ({m['method']}, k={m['k']})", fontsize=10
        )
        ax.grid(alpha=0.3)
        if col == 0:
            ax.set_ylabel(f"judge: {result['judge']['name']}")
            ax.legend(fontsize=7, loc="lower right")
        ax = axes[1][col]
        ax.plot(x, [p["perplexity"] for p in pts], "o-", color="tab:red", label="perplexity (unsteered model)")
        ax.axhline(base["perplexity"], color="black", ls=":", lw=1, label="unsteered")
        for j, (name, point) in enumerate(result.get("prompts", {}).items()):
            if math.isfinite(point["perplexity"]):
                ax.axhline(point["perplexity"], color=f"C{4 + j}", ls="-.", lw=1, label=f"{name} prompt")
        if math.isfinite(base["perplexity"]):
            ax.axhline(
                result.get("budget", DEFAULT_BUDGET) * base["perplexity"],
                color="tab:gray",
                ls="--",
                lw=1,
                label=f"budget ({result.get('budget', DEFAULT_BUDGET):g}x)",
            )
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(mticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(mticker.FormatStrFormatter("%.3g"))
        ax.set_xlabel("alpha")
        ax.grid(alpha=0.3)
        if col == 0:
            ax.set_ylabel("perplexity of the generations")
            ax.legend(fontsize=7, loc="upper left")
    for ax in axes[1]:  # minor labels only within a decade: across several they overprint each other
        lo, hi = ax.get_ylim()
        if lo > 0 and hi / lo > 10:
            ax.yaxis.set_minor_formatter(mticker.NullFormatter())
    title = f"Behaviour strength curve - {result.get('task', '')} {result.get('base_model', '')} (n={result['n_prompts']} prompts, {result['max_new_tokens']} new tokens)"
    fig.suptitle(title.replace("  ", " "), fontsize=10)
    return save_plot(fig, path)


__all__ = [
    "PLOTS",
    "plot_combinations",
    "plot_sign",
    "plot_strength",
    "plot_strength_curve",
    "plot_sweep",
    "plot_tokens",
    "pyplot",
    "save_plot",
    "title_of",
]
