"""Charts (PNG, written atomically). matplotlib is an optional extra: ``pip install 'plansim[plot]'``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from engine.core.errors import InputError, write_atomic


def require_matplotlib():
    """``matplotlib.pyplot`` on the Agg backend, or a one-line InputError saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError(None, "--plot", "needs matplotlib: pip install 'plansim[plot]'") from None
    return plt


def save_png(fig, path: str | Path) -> None:
    """Render ``fig`` to PNG bytes and write them atomically; close the figure."""
    plt = require_matplotlib()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def plot_loop(result: Any, path: str | Path, title: str) -> None:
    """Predicted and simulated makespan (ms) per loop iteration."""
    plt = require_matplotlib()
    ks = [it.k for it in result.iterations]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(ks, [it.predicted_us / 1e3 for it in result.iterations], "o-", label="predicted (MIP model)")
    ax.plot(ks, [it.simulated_us / 1e3 for it in result.iterations], "s-", label="simulated")
    ax.axvline(result.best_k, color="grey", linestyle=":", label=f"best (k={result.best_k})")
    ax.set_xlabel("iteration k")
    ax.set_ylabel("makespan (ms)")
    ax.set_xticks(ks)
    ax.set_title(title)
    ax.legend()
    save_png(fig, path)
