"""The corruption sweep's report: a table, test error against nu, and the filter figure (also the noise comparison's)."""

from pathlib import Path

import numpy as np
from PIL import Image

from sda.artifacts import atomic_path, save_json, save_text
from sda.filters import save_png, tile

FILTER_LEVELS = (0.0, 0.25, 0.5)  # ICML 2008 Fig. 3


def write_table(rows: list[dict], layers: list[str], report_dir: Path) -> None:
    """rows: nu, valid_error, test_error, test_error_ci95, <layer>_train_loss, experiment, run_id."""
    header = "| nu | valid error | test error +- 95% CI | " + " | ".join(f"{l} final loss" for l in layers) + " | DVC experiment |"
    lines = [header, "|" + "---|" * (4 + len(layers))]
    seeds = len({row.get("seed") for row in rows}) > 1
    for row in sorted(rows, key=lambda r: (r["nu"], r.get("seed", 0))):
        name = f"{row['nu']:g}" + (" (SAA)" if row["nu"] == 0 else "") + (f", seed {row['seed']}" if seeds else "")
        losses = " | ".join(f"{row[f'{l}_train_loss']:.3f}" for l in layers)
        lines.append(f"| {name} | {row['valid_error']:.2%} | {row['test_error']:.2%} +- {row['test_error_ci95']:.2%} | {losses} | {row['experiment']} |")
    save_text(report_dir / "table.md", "\n".join(lines) + "\n")
    save_json(report_dir / "table.json", sorted(rows, key=lambda r: (r["nu"], r.get("seed", 0))))


def plot_error_against_nu(rows: list[dict], title: str, report_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["nu"])
    seeds = sorted({r.get("seed") for r in rows}, key=str)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for seed in seeds:  # one line per seed
        mine = [r for r in rows if r.get("seed") == seed]
        ax.errorbar([r["nu"] for r in mine], [100 * r["test_error"] for r in mine], yerr=[100 * r["test_error_ci95"] for r in mine],
                    marker="o", capsize=4, label="SdA: test error +- 95% CI" + (f", seed {seed}" if len(seeds) > 1 else ""))
    saa = [r for r in rows if r["nu"] == 0]
    if saa:
        ax.scatter([0], [100 * saa[0]["test_error"]], s=160, facecolors="none", edgecolors="red", zorder=3,
                   label="nu = 0: SAA (plain autoencoders)")
    ax.set_xlabel("corruption level nu (fraction of inputs masked)")
    ax.set_ylabel("test error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(report_dir / "test_error_vs_nu.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def filter_figure(images: dict[float, Path], report_dir: Path, levels=FILTER_LEVELS, name: str = "filters_by_nu",
                  caption: str = "nu") -> bool:
    """First-layer filters at ``levels`` (those of ``images`` there are) side by side: same
    initialisation, same unit order. Writes <name>.png and <name>.txt; False if under two panels."""
    available = [level for level in levels if level in images]
    if len(available) < 2:
        return False
    panels = np.stack([np.asarray(Image.open(images[level]).convert("L"), dtype=np.float32) / 255 for level in available])
    grid = tile(panels, per_row=len(panels), padding=8, pad_value=1.0)
    save_png((grid * 255).round().astype(np.uint8), report_dir / f"{name}.png")
    save_text(report_dir / f"{name}.txt", f"panels, left to right: {caption} = " + ", ".join(f"{level:g}" for level in available) + "\n")
    return True
