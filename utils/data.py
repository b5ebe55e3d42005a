"""Datasets as one uint8 tensor on the training device, with crop and flip done on whole batches.

CIFAR-10/100 are parsed from the standard python layout directly (torchvision's dataset class refuses
copies whose md5 differs), through an unpickler that only admits the numpy types the format uses.
"""
import io
import os
import pickle

import numpy as np
import torch

from .config import thief_has_labels
from .constants import DATASETS
from .errors import UserError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

_SAFE_PICKLE = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("copyreg", "_reconstructor"), ("builtins", "object"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
}


class _SafeUnpickler(pickle.Unpickler):
    """A dataset file is data: refuse any global that is not a plain numpy array piece."""

    def find_class(self, module, name):
        if (module, name) in _SAFE_PICKLE:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _read_pickle(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    try:
        with open(path, "rb") as f:
            return _SafeUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except Exception as e:  # truncated, garbled or hostile file
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}; the file is truncated or corrupt, "
                        f"re-create the dataset folder (or pass --download)") from None


def _check_batch(path, d, label_key, num_classes):
    if not isinstance(d, dict) or "data" not in d or label_key not in d:
        raise UserError(f"{path} is not a CIFAR batch (needs keys 'data' and '{label_key}'); "
                        f"re-create the dataset folder")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {tuple(data.shape)}; "
                        f"the file is corrupt, re-create the dataset folder")
    if labels.ndim != 1 or len(labels) != len(data) or len(data) == 0:
        raise UserError(f"{path}: {len(data)} images but {labels.size} labels; the file is corrupt, "
                        f"re-create the dataset folder")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"{path}: labels outside [0, {num_classes}); is this the right dataset?")
    return data, labels.astype(np.int64)


def _cifar_files(dataset, train):
    if dataset == "cifar10":
        return ([f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]), "labels"
    return (["train"] if train else ["test"]), "fine_labels"


def _download(dataset, root):
    from torchvision.datasets.utils import download_and_extract_archive
    url = {"cifar10": CIFAR10_URL, "cifar100": CIFAR100_URL, "tinyimagenet": TINY_URL}[dataset]
    try:
        download_and_extract_archive(url, download_root=root)
    except Exception as e:
        raise UserError(f"download of {dataset} from {url} failed ({type(e).__name__}: {e}); "
                        f"copy the dataset under {root} by hand") from None


def _load_cifar(dataset, root, train, download):
    info = DATASETS[dataset]
    folder = os.path.join(root, info.folder)
    files, label_key = _cifar_files(dataset, train)
    missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing and download:
        _download(dataset, root)
        missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise UserError(f"{dataset}: missing {os.path.join(folder, missing[0])}; point --data_root at the folder "
                        f"holding {info.folder}/ (or pass --download)")
    datas, labels = [], []
    for f in files:
        path = os.path.join(folder, f)
        d, y = _check_batch(path, _read_pickle(path), label_key, info.num_classes)
        datas.append(d)
        labels.append(y)
    meta_name = "batches.meta" if dataset == "cifar10" else "meta"
    meta_path = os.path.join(folder, meta_name)
    if dataset == "cifar10" and train and os.path.isfile(meta_path):
        per_batch = _read_pickle(meta_path).get("num_cases_per_batch")
        if per_batch is not None and any(len(d) != per_batch for d in datas):
            raise UserError(f"{folder}: a batch does not hold the {per_batch} images batches.meta announces; "
                            f"a file is truncated, re-create the dataset folder")
    images = torch.from_numpy(np.concatenate(datas).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(np.concatenate(labels))


def _load_tiny(root, train, download):
    from PIL import Image
    folder = os.path.join(root, "tiny-imagenet-200")
    if not os.path.isdir(folder) and download:
        _download("tinyimagenet", root)
    wnids_path = os.path.join(folder, "wnids.txt")
    if not os.path.isfile(wnids_path):
        raise UserError(f"tinyimagenet: missing {wnids_path}; "
                        "point --data_root at the folder holding tiny-imagenet-200/")
    wnids = [w.strip() for w in open(wnids_path) if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    items = []
    if train:
        for w in wnids:
            d = os.path.join(folder, "train", w, "images")
            items += [(os.path.join(d, f), index[w]) for f in sorted(os.listdir(d))]
    else:  # the labelled 'val' split is the test set, as in every CIFAR-style paper
        ann = os.path.join(folder, "val", "val_annotations.txt")
        if not os.path.isfile(ann):
            raise UserError(f"tinyimagenet: missing {ann}")
        for line in open(ann):
            parts = line.split("\t")
            items.append((os.path.join(folder, "val", "images", parts[0]), index[parts[1]]))
    images = np.empty((len(items), 64, 64, 3), np.uint8)
    for i, (path, _) in enumerate(items):
        with Image.open(path) as im:
            images[i] = np.asarray(im.convert("RGB"))
    labels = torch.tensor([y for _, y in items], dtype=torch.int64)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def load_split(dataset, root, train, download=False):
    """Return (images uint8 (N, 3, H, W), labels int64 (N,)) for the train or test split."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset '{dataset}'; choose one of: {', '.join(DATASETS)}")
    if not os.path.isdir(root) and not download:
        raise UserError(f"data_root '{root}' does not exist; pass --data_root pointing at your dataset copy")
    if dataset == "tinyimagenet":
        return _load_tiny(root, train, download)
    return _load_cifar(dataset, root, train, download)


def class_balanced_subset(labels, n, num_classes, seed=0):
    """Indices (sorted) of a class-balanced draw of n training images: n // C of each class, the first of a
    permutation of that class's images drawn from `seed`. For one seed a smaller subset lies inside a larger one."""
    per_class = n // num_classes
    if per_class < 1:
        raise UserError(f"subset {n} is smaller than the number of classes ({num_classes}); hold at least one "
                        f"image a class")
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)][:per_class]
        if len(idx) < per_class:
            raise UserError(f"subset {n} needs {per_class} images of class {c}, the split has {len(idx)}; "
                            f"lower subset (0: the whole split)")
        picks.append(idx)
    return torch.cat(picks).sort().values


def indices_digest(indices):
    """sha256 of the chosen indices (int64, in order): names the thief's images in metrics.json."""
    import hashlib
    return hashlib.sha256(indices.to(torch.int64).numpy().tobytes()).hexdigest()


UNKNOWN_LABEL = -1  # what a label-free thief's loader yields in place of a label


def thief_record(cfg, indices, val_indices=None):
    """What the thief held (metrics.json 'thief'): the images' source and count, their draw and its digest,
    and whether it has their labels. With a validation split, `images` counts those the student learns from,
    and the held-out ones are recorded beside them (val_images, val_indices_sha256, the seed of their draw)."""
    record = {"source": cfg.get("transfer") or cfg["dataset"], "images": len(indices),
              "subset_seed": cfg["subset_seed"] if cfg.get("subset") else None,
              "indices_sha256": indices_digest(indices), "labels": thief_has_labels(cfg)}
    if val_indices is not None:
        record.update(val_images=len(val_indices), val_indices_sha256=indices_digest(val_indices),
                      val_seed=cfg.get("subset_seed", 0))
    return record


def validation_split(n, size, seed):
    """(train positions, validation positions), each sorted: `size` of the thief's n images held out for the
    thief's own model selection, a uniform draw fixed by `seed` (no labels needed, so a label-free thief can
    draw it too). The two never overlap and together are all n."""
    if not 0 < size < n:
        raise UserError(f"val_split {size} must be below the thief's {n} training images (0: no validation split); "
                        f"lower val_split or raise subset")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[size:].sort().values, perm[:size].sort().values


class DeviceLoader:
    """Iterate over (normalised float images, labels) batches of a split held as uint8 on the device.

    Training batches are shuffled and augmented (random crop with 4-pixel zero padding, horizontal flip)
    on whole batches. All randomness of an epoch comes from a generator seeded with (seed, epoch) and is
    drawn up front, so a resumed epoch can skip its first steps and see exactly the same batches.
    Under DDP every rank draws the same global batch and keeps its slice of it.
    """

    def __init__(self, images, labels, batch_size, device, mean, std, train, seed=0,
                 rank=0, world_size=1, channels_last=True, pad=4):
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.channels_last = channels_last
        self.pad = pad
        # the augmented versions of one image: (2 pad + 1)^2 crops, each flipped or not. A training batch carries
        # the key of each image's version (variant_keys), so a frozen teacher's answers can be kept (AnswerCache)
        self.variants = (2 * pad + 1) ** 2 * 2
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255
        self.epoch = 0
        self.thief = None  # a training loader's threat-model record (build_loaders)
        if train and batch_size > len(self.labels):
            raise UserError(f"batch_size {batch_size} is larger than the {len(self.labels)} training images; "
                            f"lower batch_size or raise subset")
        if batch_size % world_size:
            raise UserError(f"batch_size {batch_size} must be divisible by the {world_size} processes")

    def __len__(self):
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _plan(self):
        n, size = len(self.labels), self.images.shape[-1]
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(n, generator=g)
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        flips = torch.rand(n, generator=g) < 0.5
        return perm.to(self.device), offsets.to(self.device), flips.to(self.device), size

    def normalise(self, x):
        """uint8 images (N, 3, H, W) on the device -> the float input the model reads (mean/std of the dataset)."""
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _augment(self, x, offsets, flips, size):
        b = x.shape[0]
        x = torch.nn.functional.pad(x, (self.pad,) * 4)
        ar = torch.arange(size, device=x.device)
        rows = (offsets[:, 0:1] + ar).view(b, 1, size, 1)
        cols = (offsets[:, 1:2] + ar).view(b, 1, 1, size)
        bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
        ci = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
        x = x[bi, ci, rows, cols]
        return torch.where(flips.view(b, 1, 1, 1), x.flip(3), x)

    def iterate(self, start_step=0):
        if not self.train:
            for i in range(self.rank * self.batch_size, len(self.labels), self.batch_size * self.world_size):
                yield self.normalise(self.images[i:i + self.batch_size]), self.labels[i:i + self.batch_size]
            return
        perm, offsets, flips, size = self._plan()
        local = self.batch_size // self.world_size
        for step in range(start_step, len(self)):
            idx = perm[step * self.batch_size:(step + 1) * self.batch_size]
            idx = idx[self.rank * local:(self.rank + 1) * local]
            x = self.normalise(self._augment(self.images[idx], offsets[idx], flips[idx], size))
            x.variant_keys = self.variant_keys(idx, offsets[idx], flips[idx])
            yield x, self.labels[idx]

    def __iter__(self):
        return self.iterate()

    def variant_keys(self, idx, offsets, flips):
        """The key of each image's augmented version, in [0, number of images x variants): the image, its crop
        offsets and its flip fix the float input the model reads, so equal keys mean equal inputs."""
        crop = offsets[:, 0] * (2 * self.pad + 1) + offsets[:, 1]
        return (idx * (self.variants // 2) + crop) * 2 + flips.long()


def build_loaders(cfg, device, rank=0, world_size=1, train=True):
    """The train and test loaders a config asks for; train=False never reads the training split."""
    info = DATASETS[cfg["dataset"]]
    loaders = {}
    if train:
        source = cfg.get("transfer") or cfg["dataset"]
        images, labels = load_split(source, cfg["data_root"], True, cfg["download"])
        idx = torch.arange(len(labels))
        if cfg["subset"]:
            idx = class_balanced_subset(labels, cfg["subset"], DATASETS[source].num_classes, cfg.get("subset_seed", 0))
            images, labels = images[idx], labels[idx]
        if not thief_has_labels(cfg):
            labels = torch.full_like(labels, UNKNOWN_LABEL)  # nothing downstream can read a true label
        val_idx = None
        if cfg.get("val_split"):  # held out of the thief's own images, never from the test split
            keep, held = validation_split(len(labels), cfg["val_split"], cfg.get("subset_seed", 0))
            val_idx = idx[held]
            loaders["val"] = DeviceLoader(images[held], labels[held], cfg["eval_batch_size"], device, info.mean,
                                          info.std, False, cfg["seed"], rank, world_size, cfg["channels_last"])
            idx, images, labels = idx[keep], images[keep], labels[keep]
        loaders["train"] = DeviceLoader(images, labels, cfg["batch_size"], device, info.mean, info.std, True,
                                        cfg["seed"], rank, world_size, cfg["channels_last"])
        loaders["train"].thief = thief_record(cfg, idx, val_idx)
    images, labels = load_split(cfg["dataset"], cfg["data_root"], False, cfg["download"])
    if cfg.get("test_subset"):
        images, labels = images[:cfg["test_subset"]], labels[:cfg["test_subset"]]
    loaders["test"] = DeviceLoader(images, labels, cfg["eval_batch_size"], device, info.mean, info.std, False,
                                   cfg["seed"], rank, world_size, cfg["channels_last"])
    return loaders
