"""compare.png: FID of both arms against wall clock and images seen, and accuracy against wall clock."""

from __future__ import annotations

from maskdit.compare.config import CompareResult

# each arm's line in every comparison plot (compare.png, compare-seeds.png)
ARM_STYLES = {"maskdit": dict(color="tab:red", marker="o", label="MaskDiT (mask 0.5 + tuning)"),
              "dit": dict(color="tab:blue", marker="s", label="DiT (unmasked)")}


def arm_style(name: str) -> dict:
    """Colour, marker and label of arm `name` (an unknown arm: matplotlib's next colour, its own name)."""
    return ARM_STYLES.get(name, {"label": name})


def plot(result: CompareResult, path: str, title: str) -> None:
    """FID against wall clock and against images seen; accuracy against wall clock (when measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_acc = any(p.accuracy is not None for pts in result.arms.values() for p in pts)
    fig, axes = plt.subplots(1, 3 if with_acc else 2, figsize=(15 if with_acc else 10, 4.2))
    for name, pts in result.arms.items():
        style = arm_style(name)
        axes[0].plot([p.wall_s for p in pts], [p.fid for p in pts], **style)
        axes[1].plot([p.images for p in pts], [p.fid for p in pts], **style)
        if with_acc:
            axes[2].plot([p.wall_s for p in pts], [100 * p.accuracy for p in pts], **style)
    label_and_save(fig, axes, title, path)


def label_and_save(fig, axes, title: str, path: str) -> None:
    """The comparison's three panels labelled (FID / wall clock, FID / images, accuracy / wall clock), saved."""
    import matplotlib.pyplot as plt

    for ax, xlabel, ylabel in zip(axes, ("training wall clock (s)", "training images seen", "training wall clock (s)"),
                                  ("FID (lower is better)", "FID (lower is better)", "classifier accuracy (%)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
