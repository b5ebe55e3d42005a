"""Dataset facts shared by every script: class counts, image size, and the normalisation constants."""
from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple
    folder: str  # sub-folder of --data_root holding the standard layout


DATASETS = {
    "cifar10": DatasetInfo(10, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar-10-batches-py"),
    "cifar100": DatasetInfo(100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar-100-python"),
    "tinyimagenet": DatasetInfo(200, 64, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821), "tiny-imagenet-200"),
}
