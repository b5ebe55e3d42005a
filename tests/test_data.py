import os
import pickle

import pytest
import torch

import fakedata
from utils.data import DeviceLoader, class_balanced_subset, load_split
from utils.errors import UserError


def test_load_cifar10_layout(cifar_root):
    x, y = load_split("cifar10", cifar_root, True)
    assert x.dtype == torch.uint8 and x.shape == (100, 3, 32, 32)
    assert y.dtype == torch.int64 and sorted(y.unique().tolist()) == list(range(10))
    xt, yt = load_split("cifar10", cifar_root, False)
    assert xt.shape == (50, 3, 32, 32) and len(yt) == 50


def test_load_cifar100_layout(tmp_path):
    root = fakedata.make_cifar100(str(tmp_path))
    x, y = load_split("cifar100", root, True)
    assert x.shape == (300, 3, 32, 32) and y.max() == 99


def test_missing_file_named(tmp_path, cifar_root):
    with pytest.raises(UserError, match="data_batch_1"):
        load_split("cifar10", str(tmp_path), True)
    with pytest.raises(UserError, match="does not exist"):
        load_split("cifar10", str(tmp_path / "nope"), True)
    with pytest.raises(UserError, match="unknown dataset"):
        load_split("imagenet", cifar_root, True)


def test_truncated_batch_is_reported(tmp_path):
    root = fakedata.make_cifar10(str(tmp_path), train_per_class=5, test_per_class=1)
    path = os.path.join(root, "cifar-10-batches-py", "data_batch_3")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(UserError, match="data_batch_3.*truncated or corrupt"):
        load_split("cifar10", root, True)


def test_hostile_pickle_refused(tmp_path):
    root = fakedata.make_cifar10(str(tmp_path), train_per_class=5, test_per_class=1)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(os.path.join(root, "cifar-10-batches-py", "test_batch"), "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(UserError, match="test_batch"):
        load_split("cifar10", root, False)
    assert not marker.exists()


def test_bad_labels_rejected(tmp_path):
    root = fakedata.make_cifar10(str(tmp_path), train_per_class=5, test_per_class=1)
    path = os.path.join(root, "cifar-10-batches-py", "test_batch")
    d = pickle.load(open(path, "rb"))
    d["labels"][0] = 17
    pickle.dump(d, open(path, "wb"))
    with pytest.raises(UserError, match="labels outside"):
        load_split("cifar10", root, False)


def test_class_balanced_subset_is_fixed_and_balanced():
    labels = torch.arange(10).repeat(30)[torch.randperm(300, generator=torch.Generator().manual_seed(1))]
    idx = class_balanced_subset(labels, 50, 10)
    assert torch.equal(idx, class_balanced_subset(labels, 50, 10))
    assert torch.bincount(labels[idx], minlength=10).tolist() == [5] * 10
    with pytest.raises(UserError):
        class_balanced_subset(labels, 5, 10)


def _loader(n=64, batch=16, device="cpu", **kw):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % 10
    return DeviceLoader(x, y, batch, device, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True, seed=3, **kw)


def test_train_batches_deterministic_per_epoch_and_resumable(device):
    dl = _loader(device=device)
    dl.set_epoch(0)
    a = list(dl)
    assert len(a) == 4 and a[0][0].shape == (16, 3, 32, 32) and a[0][0].dtype == torch.float32
    assert a[0][0].device.type == device.type and a[0][1].device.type == device.type
    b = list(dl.iterate(start_step=2))
    assert all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(a[2:], b))
    dl.set_epoch(1)
    c = list(dl)
    assert not torch.equal(a[0][1], c[0][1])
    # every image seen exactly once per epoch
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted((torch.arange(64) % 10).tolist())


def test_batches_on_the_device_match_the_cpu(device):
    """The epoch's plan is drawn on the CPU, so every device sees the same crops, flips and order."""
    for (x, y), (xc, yc) in zip(_loader(device=device), _loader()):
        assert torch.equal(y.cpu(), yc)
        torch.testing.assert_close(x.cpu(), xc, rtol=0, atol=1e-6)


def test_ranks_split_the_global_batch():
    full = list(_loader(world_size=1))
    r0 = list(_loader(rank=0, world_size=2))
    r1 = list(_loader(rank=1, world_size=2))
    for f, a, b in zip(full, r0, r1):
        assert torch.equal(torch.cat([a[0], b[0]]), f[0])


def test_crop_and_flip(device):
    dl = _loader(device=device)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8).to(device)
    centre = torch.full((4, 2), 4, device=device)
    no, yes = torch.zeros(4, dtype=torch.bool, device=device), torch.ones(4, dtype=torch.bool, device=device)
    assert torch.equal(dl._augment(x, centre, no, 32), x)
    assert torch.equal(dl._augment(x, centre, yes, 32), x.flip(3))
    shifted = dl._augment(x, torch.zeros(4, 2, dtype=torch.long, device=device), no, 32)
    assert torch.equal(shifted[:, :, 4:, 4:], x[:, :, :28, :28]) and shifted[:, :, :4].eq(0).all()


def test_batch_larger_than_data_is_an_error():
    with pytest.raises(UserError, match="batch_size"):
        _loader(n=10, batch=16)
