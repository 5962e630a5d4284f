"""PNG figures of a sweep report (matplotlib, Agg backend).

matplotlib is an optional dependency: ``pip install 'metacorrect[report]'``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .tables import SweepResults, curves, fmt_trusted, method_label, method_sort_key, t_panels, timing_table


class ReportDependencyError(RuntimeError):
    """matplotlib is not installed."""


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ReportDependencyError(
            "the report's figures need matplotlib, an optional dependency: pip install 'metacorrect[report]' "
            "(or pass --no-figures for the tables alone)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _slug(*parts) -> str:
    text = "-".join(str(p) for p in parts if p is not None and p != "")
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def curve_figures(results: SweepResults, folder: Path) -> list[dict]:
    """One figure per dataset × noise × trusted: test error versus strength, a line per method."""
    plt = _pyplot()
    groups = defaultdict(lambda: defaultdict(list))
    for c in curves(results):
        groups[(c["dataset"], c["noise"], c["trusted"])][c["method"]].append(c)
    out = []
    for (ds, noise, trusted), by_method in sorted(groups.items(), key=lambda kv: kv[0]):
        fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=110)
        for method in sorted(by_method, key=method_sort_key):
            pts = sorted(by_method[method], key=lambda c: c["strength"])
            xs = [p["strength"] for p in pts]
            ys = [p["test_error"] for p in pts]
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.4, label=method_label(method))
            if any(p["std"] is not None for p in pts):
                lo = [p["test_error"] - (p["std"] or 0) for p in pts]
                hi = [p["test_error"] + (p["std"] or 0) for p in pts]
                ax.fill_between(xs, lo, hi, alpha=0.15)
        ax.set_xlabel("corruption strength s")
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{ds}, {noise}, trusted {fmt_trusted(trusted)}", fontsize=10)
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2, frameon=False)
        fig.tight_layout()
        name = _slug("curve", ds, noise, f"t{trusted:g}") + ".png"
        fig.savefig(folder / name)
        plt.close(fig)
        out.append({"kind": "curve", "dataset": ds, "noise": noise, "trusted": trusted, "file": name,
                    "methods": sorted(by_method, key=method_sort_key)})
    return out


def t_figures(results: SweepResults, folder: Path, target_strength: float = 0.6) -> list[dict]:
    """True T beside each method's estimated T̂ (rows = true class, T[i, j] = P(noisy=j | true=i))."""
    plt = _pyplot()
    out = []
    for panel in t_panels(results, target_strength):
        n = 1 + len(panel["estimates"])
        fig, axes = plt.subplots(1, n, figsize=(2.3 * n, 2.7), dpi=110, squeeze=False)
        mats = [("true T", panel["T_true"], None)] + [(method_label(m), T, err) for m, T, err, _ in panel["estimates"]]
        im = None
        for ax, (title, T, err) in zip(axes[0], mats):
            im = ax.imshow(T, vmin=0, vmax=1, cmap="viridis")
            ax.set_title(title + (f"\nerror {err:.2f}" if err is not None else "\n"), fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][0].set_ylabel("true class", fontsize=8)
        axes[0][0].set_xlabel("noisy class", fontsize=8)
        fig.suptitle(f"{panel['dataset']}, {panel['noise']} s={panel['strength']:g}, trusted "
                     f"{fmt_trusted(panel['trusted'])}", fontsize=9)
        if im is not None:
            fig.colorbar(im, ax=list(axes[0]), shrink=0.8)
        name = _slug("T", panel["dataset"], panel["noise"], f"t{panel['trusted']:g}", f"s{panel['strength']:g}") + ".png"
        fig.savefig(folder / name)
        plt.close(fig)
        out.append({"kind": "T", "dataset": panel["dataset"], "noise": panel["noise"], "trusted": panel["trusted"],
                    "strength": panel["strength"], "file": name,
                    "methods": [m for m, *_ in panel["estimates"]]})
    return out


def time_figures(results: SweepResults, folder: Path) -> list[dict]:
    """Mean training time per run, a bar per method, one figure per dataset."""
    plt = _pyplot()
    by_ds = defaultdict(list)
    for t in timing_table(results):
        if t["mean_train_s"] is not None:
            by_ds[t["dataset"]].append(t)
    out = []
    for ds, rows in sorted(by_ds.items()):
        fig, ax = plt.subplots(figsize=(5.2, 3.0), dpi=110)
        ax.bar([method_label(r["method"]) for r in rows], [r["mean_train_s"] for r in rows], color="#4878a8")
        ax.set_ylabel("seconds per run (mean)")
        ax.set_title(f"{ds}: training time per run", fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        name = _slug("time", ds) + ".png"
        fig.savefig(folder / name)
        plt.close(fig)
        out.append({"kind": "time", "dataset": ds, "file": name})
    return out


def write_figures(results: SweepResults, folder: Path) -> list[dict]:
    _pyplot()  # fail early, before anything is written, when matplotlib is missing
    folder.mkdir(parents=True, exist_ok=True)
    return curve_figures(results, folder) + t_figures(results, folder) + time_figures(results, folder)


__all__ = ["ReportDependencyError", "curve_figures", "t_figures", "time_figures", "write_figures"]
