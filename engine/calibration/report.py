"""Fit reports: the fitted profile, per-point rows and a measured-vs-predicted plot.

The plot (``--plot``) needs matplotlib (the ``plot`` extra); it is written atomically as PNG:
left, measured against predicted time before and after the fit, one point per measurement,
held-out points marked; right, the distribution of the relative error after the fit.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from engine.core.errors import InputError, write_atomic
from hardware_profiles import override_profile


def fitted_profile(profile: Any, overrides: dict[str, Any], what: str) -> Any:
    """``profile`` with ``overrides`` applied and its description noting the calibration."""
    desc = profile.description or profile.name
    note = f" [calibrated: {what}]"
    return override_profile(profile, {**overrides, "description": desc.split(" [calibrated:")[0] + note})


def error_pct(pred: ArrayLike, meas: ArrayLike) -> np.ndarray:
    """Signed relative error in percent: (predicted - measured) / measured x 100."""
    p, m = np.asarray(pred, float), np.asarray(meas, float)
    return (p - m) / m * 100.0


def plot_fit(path: str | Path, measured: ArrayLike, before: ArrayLike, after: ArrayLike,
             heldout: ArrayLike | None, title: str, unit: str = "us") -> Path:
    """Write the measured-vs-predicted plot to ``path`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError(None, "--plot", "needs matplotlib (pip install 'plansim[plot]')") from None
    meas, bef, aft = (np.asarray(x, float) for x in (measured, before, after))
    test = np.zeros(len(meas), bool) if heldout is None else np.asarray(heldout, bool)
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(11, 4.6))
    lo, hi = min(meas.min(), bef.min(), aft.min()) * 0.8, max(meas.max(), bef.max(), aft.max()) * 1.25
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, zorder=0)
    ax.scatter(meas, bef, s=10, color="tab:gray", alpha=0.5, label="before fit")
    ax.scatter(meas[~test], aft[~test], s=12, color="tab:blue", label="after fit (fitted on)")
    if test.any():
        ax.scatter(meas[test], aft[test], s=12, color="tab:orange", label="after fit (held out)")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel=f"measured ({unit})",
           ylabel=f"predicted ({unit})", title=title)
    ax.legend(loc="upper left", fontsize=8)
    err = error_pct(aft, meas)
    bins = np.linspace(min(-20.0, err.min()), max(20.0, err.max()), 41)
    hx.hist(err[~test], bins=bins, color="tab:blue", alpha=0.7, label="fitted on")
    if test.any():
        hx.hist(err[test], bins=bins, color="tab:orange", alpha=0.7, label="held out")
    hx.axvline(0, color="0.3", lw=1)
    hx.set(xlabel="error after fit (%)", ylabel="points", title=f"MAPE {np.mean(np.abs(err)):.2f}%")
    hx.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return write_atomic(path, buf.getvalue())
