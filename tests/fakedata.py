"""Tiny datasets in the standard CIFAR python layout, generated so tests never need the real files.

Each class gets its own mean colour plus noise, so a few epochs of training learn something measurable.
"""
import os
import pickle

import numpy as np


def _images(labels, num_classes, rng):
    base = rng.integers(30, 225, size=(num_classes, 3), endpoint=True)
    n = len(labels)
    img = base[labels][:, :, None, None] + rng.normal(0, 25, size=(n, 3, 32, 32))
    return np.clip(img, 0, 255).astype(np.uint8).reshape(n, 3072)


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar10(root, train_per_class=20, test_per_class=10, seed=0, with_train=True):
    """Write ROOT/cifar-10-batches-py with 5 train batches and a test batch; return ROOT."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    n_train = 10 * train_per_class
    if n_train % 5:
        raise ValueError("10 * train_per_class must be divisible by the 5 batches")
    labels = rng.permutation(np.repeat(np.arange(10), train_per_class))
    data = _images(labels, 10, np.random.default_rng(seed))
    if with_train:
        per = n_train // 5
        for i in range(5):
            sl = slice(i * per, (i + 1) * per)
            _dump(os.path.join(folder, f"data_batch_{i + 1}"),
                  {"batch_label": f"training batch {i + 1} of 5", "data": data[sl],
                   "labels": labels[sl].tolist(), "filenames": [f"{j}.png" for j in range(per)]})
        _dump(os.path.join(folder, "batches.meta"), {"num_cases_per_batch": per, "num_vis": 3072,
                                                     "label_names": [f"class{i}" for i in range(10)]})
    test_labels = rng.permutation(np.repeat(np.arange(10), test_per_class))
    _dump(os.path.join(folder, "test_batch"), {"batch_label": "testing batch 1 of 1",
                                                "data": _images(test_labels, 10, np.random.default_rng(seed)),
                                                "labels": test_labels.tolist()})
    return root


def make_cifar100(root, train_per_class=3, test_per_class=1, seed=0):
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(100), per))
        _dump(os.path.join(folder, split), {"data": _images(labels, 100, np.random.default_rng(seed)),
                                            "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()})
    return root
