"""PNG plots of the demo study (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from camopd_megatron.demo.study import mean_cosine_curve, mean_curves

__all__ = ["plot_accuracy", "plot_diagnostics"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(study: dict[str, Any], path: str | Path) -> Path:
    """General and domain held-out graded score over steps (mean over seeds), one line per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, branch in zip(axes, ("general", "domain")):
        for method, runs in study["histories"].items():
            steps, vals = mean_curves(runs, f"eval/acc/{branch}")
            ax.plot(steps, [100 * v for v in vals], marker="o", ms=3, label=method)
        for key, style in (("general_teacher", ":"), ("domain_teacher", "--")):
            ax.axhline(100 * study["teachers"][key].get(f"acc/{branch}", float("nan")), color="gray", ls=style,
                       lw=1, label=key.replace("_", " "))
        ax.set_title(f"{branch} score (held-out, greedy, graded credit)")
        ax.set_xlabel("step")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(plt, fig, path)


def plot_diagnostics(study: dict[str, Any], path: str | Path) -> Path:
    """Per-branch kept fraction (training steps) and cos(g_general, g_domain) (eval probes) over steps."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method, runs in study["histories"].items():
        for ax, branch in zip(axes[:2], ("general", "domain")):
            steps, vals = mean_curves(runs, f"select/{branch}/kept_fraction")
            if steps:
                ax.plot(steps, vals, marker=".", ms=3, label=method)
        steps, vals = mean_cosine_curve(runs)
        if steps:
            axes[2].plot(steps, vals, marker="o", ms=3, label=method)
    for ax, title in zip(axes, ("general kept fraction", "domain kept fraction", "cos(g_general, g_domain) probe")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[2].axhline(0.0, color="gray", lw=1)
    axes[0].legend(fontsize=7)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
