"""The picture of `contract_view`: implied probability against the spot's distance to the YES region,
one dot per contract quote (or trade), coloured by how the contract settled. Needs matplotlib
(`engine[plot]`), like the coverage heat map."""

from __future__ import annotations

import numpy as np
import polars as pl

COLORS = {"yes": "#1a9850", "no": "#d73027", "open": "#9e9e9e"}
LABELS = {"yes": "settled YES", "no": "settled NO", "open": "not settled"}


def plot(view: pl.DataFrame, path, *, title: str | None = None, only_valid: bool = True, max_points: int = 40_000,
         seed: int = 0, dpi: int = 110) -> dict:
    """Draw `view` (a `contract_view` result) into PNG `path`: x = `distance` (spot units; > 0 inside
    the YES region), y = `prob`, colour = `result`. Rows without both, and (with `only_valid`) rows
    whose data is not `valid`, are left out; at most `max_points` dots are drawn (a random sample,
    in random order so no result hides another).
    Returns what was drawn: `points` (rows per result), `drawn` (dots per result), `xlim`."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("contract plots need matplotlib: pip install 'engine[plot]'") from e

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    df = view.filter(pl.col("prob").is_not_null() & pl.col("distance").is_not_null())
    if only_valid and "valid" in df.columns:
        df = df.filter(pl.col("valid"))
    df = df.with_columns(pl.col("result").cast(pl.String).fill_null("open").alias("__r"))
    points = {r: int((df["__r"] == r).sum()) for r in ("open", "no", "yes")}
    # one scatter in random order: no colour is painted over the others wholesale
    pick = df.sample(n=min(max_points, df.height), seed=seed, shuffle=True) if df.height else df
    drawn = {r: int((pick["__r"] == r).sum()) for r in points}
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=dpi)
    if pick.height:
        ax.scatter(pick["distance"].to_numpy(), pick["prob"].to_numpy(), s=3, alpha=0.35, linewidths=0, rasterized=True,
                   c=[COLORS[r] for r in pick["__r"].to_list()])
    handles = [Line2D([], [], marker="o", linestyle="", color=COLORS[r], label=f"{LABELS[r]} ({points[r]:,})")
               for r in ("yes", "no", "open") if points[r]]
    lim = float(np.quantile(np.abs(df["distance"].to_numpy()), 0.99)) * 1.05 if df.height else 1.0
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-0.02, 1.02)
    ax.axvline(0.0, color="black", linewidth=0.7, linestyle=":")
    ax.set_xlabel("spot distance to the YES region (spot units; > 0: inside, settles YES if it stays)")
    ax.set_ylabel("implied probability of YES (quote mid)")
    ax.set_title(title or "contract quotes against spot: implied probability vs distance to strike")
    ax.legend(handles=handles, loc="upper left", frameon=True, title="eventual result")
    ax.grid(True, linewidth=0.3, alpha=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return {"points": points, "drawn": drawn, "xlim": (-lim, lim)}
