"""Per-class and mean Dice and IoU with MONAI metrics, on label maps."""

import torch
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot


class SegmentationScores:
    """Accumulates MONAI DiceMetric and MeanIoU over volumes; foreground classes only, as nnU-Net reports them."""

    def __init__(self, class_names: list[str]):
        self.names = list(class_names)[1:]
        self.num_classes = len(class_names)
        # Per-volume scores (reduction "none"), averaged here with nanmean: MONAI's "mean_batch" turns a class absent
        # from every reference volume into 0, which would drag the mean down for a class that was never there.
        self.dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        self.iou = MeanIoU(include_background=False, reduction="none", ignore_empty=True)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred, label: integer label maps shaped (B, 1, *spatial)."""
        p, y = one_hot(pred, self.num_classes), one_hot(label, self.num_classes)
        self.dice(p, y)
        self.iou(p, y)

    def compute(self, prefix: str = "val_") -> dict[str, float]:
        out = {}
        for metric, per_volume in (("dice", self.dice.aggregate()), ("iou", self.iou.aggregate())):
            values = torch.nanmean(per_volume.float(), dim=0)
            for name, v in zip(self.names, values.tolist()):
                out[f"{prefix}{metric}_{name}"] = v
            out[f"{prefix}{metric}_mean"] = float(torch.nanmean(values))
        self.dice.reset()
        self.iou.reset()
        return out
