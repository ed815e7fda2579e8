"""Pictures of what a model does: input / truth / prediction overlays and training curves (matplotlib, no display)."""

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure  # a Figure, not pyplot: no backend, no global state, safe without a screen
from matplotlib.patches import Patch
from scipy import ndimage

from pipeline.core.files import atomic

# pixels (width, height) of an overlay PNG: 3x3 panels and a legend row (two columns, 600 wide, without an image)
OVERLAY_SIZE = (900, 960)
CLASS_COLOURS = colormaps["tab10"].colors


def largest_structure_centre(labels: np.ndarray) -> tuple[int, int, int]:
    """Voxel centre of the largest connected foreground component (the volume's centre when there is none)."""
    components, n = ndimage.label(labels > 0)
    if n == 0:
        return tuple(s // 2 for s in labels.shape)
    sizes = np.bincount(components.ravel())[1:]
    centre = ndimage.center_of_mass(components == 1 + int(np.argmax(sizes)))
    return tuple(int(round(c)) for c in centre)


def overlay(image: np.ndarray | None, truth: np.ndarray, pred: np.ndarray, spacing, class_names: list[str], path: Path,
            title: str = "") -> Path:
    """Three orthogonal slices (axial, coronal, sagittal) through the largest true structure, as rows; input, truth
    and prediction side by side as columns (truth and prediction alone, on black, without an image), with a legend
    of class colours. Arrays are (x, y, z) in RAS order."""
    centre = largest_structure_centre(truth if truth.any() else pred)
    sx, sy, sz = (float(s) for s in spacing)
    # (name, slicer, pixel aspect): x across and y up for axial; x or y across and z up for coronal and sagittal
    views = [("axial", lambda v: v[:, :, centre[2]], sy / sx), ("coronal", lambda v: v[:, centre[1], :], sz / sx),
             ("sagittal", lambda v: v[centre[0], :, :], sz / sy)]
    k = len(class_names)
    colours = ListedColormap([(0, 0, 0, 0), *[(*CLASS_COLOURS[(c - 1) % 10], 0.55) for c in range(1, k)]])
    lo, hi = np.percentile(image, (1, 99)) if image is not None else (0, 1)
    columns = [*([("input", None)] if image is not None else []), ("truth", truth), ("prediction", pred)]
    width = OVERLAY_SIZE[0] * len(columns) // 3
    fig = Figure(figsize=(width / 100, OVERLAY_SIZE[1] / 100), dpi=100)
    axes = fig.subplots(3, len(columns))
    for row, (view, cut, aspect) in enumerate(views):
        for col, (heading, labels) in enumerate(columns):
            ax = axes[row, col]
            background = cut(image) if image is not None else np.zeros_like(cut(truth), dtype=float)
            ax.imshow(background.T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect,
                      interpolation="nearest")
            if labels is not None:
                ax.imshow(cut(labels).T, cmap=colours, vmin=0, vmax=k - 1, origin="lower", aspect=aspect,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(heading)
            if col == 0:
                ax.set_ylabel(f"{view} {dict(axial=centre[2], coronal=centre[1], sagittal=centre[0])[view]}")
    legend = [Patch(color=CLASS_COLOURS[(c - 1) % 10], label=f"{c} {class_names[c]}") for c in range(1, k)]
    fig.legend(handles=legend, loc="lower center", ncol=min(len(legend), 5), frameon=False)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.05, right=0.98, top=0.93, bottom=0.07, wspace=0.04, hspace=0.08)
    return _save(fig, path)


def curves(history: list[dict], class_names: list[str], path: Path) -> Path:
    """Training loss, validation Dice per class (and mean) and learning rate against the epoch."""
    fig = Figure(figsize=(14, 4), dpi=100)
    loss_ax, dice_ax, lr_ax = fig.subplots(1, 3)
    epochs = [h["epoch"] for h in history]
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker=".")
    loss_ax.set(title="training loss", xlabel="epoch")
    validated = [h for h in history if "val_dice_mean" in h]
    for name in [*class_names[1:], "mean"]:
        dice_ax.plot([h["epoch"] for h in validated], [h[f"val_dice_{name}"] for h in validated], marker="o",
                     label=name, linestyle="--" if name == "mean" else "-")
    dice_ax.set(title="validation Dice", xlabel="epoch", ylim=(0, 1))
    dice_ax.legend(loc="lower right")
    lr_ax.plot(epochs, [h["lr"] for h in history], marker=".")
    lr_ax.set(title="learning rate", xlabel="epoch")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    with atomic(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)
