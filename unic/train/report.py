"""The end of a run, from ``metrics.jsonl``: ``results.json`` (final and best metrics, throughput, files),
``curves.png`` (loss parts, kNN top-1, universal R@1, domain sampling probabilities) and the summary lines."""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)

CURVES_NAME = "curves.png"
RESULTS_NAME = "results.json"


def read_metrics(path: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` (a line cut short by a kill is skipped)."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _split(records: list[dict], split: str) -> list[dict]:
    return [r for r in records if r.get("split") == split]


def _is_score(key: str) -> bool:
    """Validation metrics where higher is better (kNN top-1, universal R@1)."""
    return key.endswith("_top1") or key.startswith("universal_R@1")


def summarize(records: list[dict]) -> dict:
    """Final train and validation metrics and, per validation score, its best value and step."""
    train, val = _split(records, "train"), _split(records, "val")
    best: dict[str, dict] = {}
    for r in val:
        for key, value in r.items():
            if _is_score(key) and isinstance(value, (int, float)) and value > best.get(key, {"value": -1.0})["value"]:
                best[key] = {"value": value, "step": r["step"]}
    strip = ("split",)
    return {
        "final_train": {k: v for k, v in train[-1].items() if k not in strip} if train else {},
        "final_val": {k: v for k, v in val[-1].items() if k not in strip} if val else {},
        "best_val": best,
    }


def plot_curves(records: list[dict], path: str) -> bool:
    """``curves.png`` of the run's training curves; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from unic.io import atomic_write

    train, val, sampling = _split(records, "train"), _split(records, "val"), _split(records, "sampling")
    panels = [
        ("training loss", train, [k for k in _keys(train) if k == "loss" or k.startswith("loss/")]),
        ("validation kNN top-1", val, [k for k in _keys(val) if k.endswith("_top1")]),
        ("validation universal R@1", val, [k for k in _keys(val) if k.startswith("universal_R@1")]),
        ("domain sampling probability", sampling or train, [k for k in _keys(sampling or train) if k.startswith("p/")]),
    ]
    panels = [p for p in panels if p[2]]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (title, rows, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3, label=key)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return True


def _keys(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.update(dict.fromkeys(k for k in r if k not in ("split", "step")))
    return sorted(seen)


def format_summary(results: dict) -> list[str]:
    """The closing lines of a run, from ``results.json``'s content."""
    final, best, files = results["final_train"], results["best_val"], results["files"]
    lines = [f"finished    {results['steps']} steps in {hms(results['wall_time_s'])} "
             f"({results['trained_steps']} trained now, {results['images_per_s']:.1f} img/s)"]
    if final:
        parts = ", ".join(f"{k} {final[k]:.4f}" for k in sorted(final) if k == "loss" or (k.startswith("loss/") and k.count("/") == 1))
        lines.append(f"final       train {parts}")
    if results["final_val"]:
        val = results["final_val"]
        lines.append("final       validation " + ", ".join(
            f"{k} {v:.4f}" for k, v in val.items() if k not in ("step", "skipped_images") and "/" not in k))
    if best:
        lines.append("best        validation " + ", ".join(
            f"{k} {b['value']:.4f} (step {b['step']})" for k, b in best.items() if "/" not in k))
    for label, key in (("weights", "checkpoint"), ("exports", "exports"), ("config", "config"),
                       ("metrics", "metrics"), ("curves", "curves"), ("results", "results"),
                       ("log", "log"), ("tensorboard", "tensorboard")):
        value = files.get(key)
        if value:
            lines.append(f"{label:<11} {', '.join(value) if isinstance(value, list) else value}")
    return lines


def hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
