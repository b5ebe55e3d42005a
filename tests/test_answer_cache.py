"""The teacher's answer cache (utils/battery.py AnswerCache, train_kd.py's teacher_cache): a training batch names
each image's augmented version, equal keys are equal inputs, the cache answers as the teacher does and runs it
only on versions it has not seen, and a KD run with the cache ends where the same run without it ends."""
import os

import pytest
import torch

import train_kd
from conftest import TINY, make_exp, read_json, run_main
from utils import battery as bat
from utils import data as data_mod
from utils.data import DeviceLoader

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _loader(n=24, pad=1, batch=8, seed=0):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return DeviceLoader(images, torch.arange(n) % 4, batch, "cpu", MEAN, STD, True, seed=seed, pad=pad)


def _batches(loader, epochs):
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        yield from loader


def test_equal_keys_are_equal_inputs_and_different_keys_different_ones():
    loader = _loader(pad=1)
    assert loader.variants == 18
    seen = {}
    for x, _ in _batches(loader, 12):
        keys = x.variant_keys
        assert keys.dtype == torch.long and len(keys) == len(x) and len(set(keys.tolist())) == len(keys)
        assert 0 <= int(keys.min()) and int(keys.max()) < len(loader.labels) * loader.variants
        for k, xi in zip(keys.tolist(), x):
            if k in seen:
                assert torch.equal(seen[k], xi)
            seen[k] = xi
    inputs = list(seen.values())
    assert len(seen) > 100  # many versions, and no two keys hold the same input
    assert all(not torch.equal(inputs[i], inputs[j]) for i in range(len(inputs)) for j in range(i))


def _teacher():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4))
    return net.eval()


class _Counted(torch.nn.Module):
    """A module that counts the images it runs on."""

    def __init__(self, module):
        super().__init__()
        self.module, self.images = module, 0

    def forward(self, x):
        self.images += len(x)
        return self.module(x)


@torch.no_grad()
def test_the_cache_answers_as_the_teacher_and_runs_it_only_on_unseen_versions():
    loader, teacher = _loader(pad=0), _teacher()  # 2 versions of each image (flipped or not): repeats come soon
    counted = _Counted(teacher)
    cache = bat.AnswerCache(counted, len(loader.labels) * loader.variants)
    distinct = set()
    for x, _ in _batches(loader, 6):
        assert torch.allclose(cache(x), teacher(x), atol=1e-6, rtol=0)
        distinct |= set(x.variant_keys.tolist())
    # each version seen was computed once (40-odd of the 48), the rest of the 6 x 24 answers came from the table
    assert counted.images == cache.computed == len(distinct) < 6 * 24 == cache.served
    assert cache.record() == {"served": 144, "computed": len(distinct)}
    plain = torch.zeros(3, 3, 8, 8)  # no keys (evaluation, generated images): the teacher runs
    assert torch.equal(cache(plain), teacher(plain)) and cache.computed == len(distinct)


def test_expected_saving_and_when_auto_keeps_the_answers():
    assert bat.expected_saved(1, 162) == pytest.approx(0.0)
    assert bat.expected_saved(240, 162) == pytest.approx(0.478, abs=0.002)  # the 10% thief's schedule
    assert bat.expected_saved(1200, 162) == pytest.approx(0.865, abs=0.002)  # the 2% thief's
    teacher = _teacher()

    def wrapped(mode, n, epochs, classes=10):
        loader = _loader(n=n, batch=8)
        return isinstance(bat.answer_cache(teacher, {"teacher_cache": mode, "epochs": epochs}, loader, classes),
                          bat.AnswerCache)

    assert wrapped("auto", 40, 240) and wrapped("auto", 40, 1200)
    assert not wrapped("auto", 40, 3)  # too few epochs to repeat a version
    assert not wrapped("auto", 40, 240, classes=10 ** 7)  # the table would pass CACHE_BYTES
    assert wrapped("on", 40, 1) and not wrapped("off", 40, 1200)
    gpu = _loader(n=40, batch=8)
    gpu.device = torch.device("cuda")  # auto leaves a GPU run as it was (the cache's per-step wait is unmeasured)
    for mode, cached in (("auto", False), ("on", True)):
        got = bat.answer_cache(teacher, {"teacher_cache": mode, "epochs": 1200}, gpu, 10)
        assert isinstance(got, bat.AnswerCache) == cached, mode


def _no_crops(monkeypatch):
    """Training loaders without crops (pad 0): each image has two versions, so a few epochs repeat them."""
    real = DeviceLoader.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **dict(kwargs, pad=0))

    monkeypatch.setattr(data_mod.DeviceLoader, "__init__", init)


def _weights(folder):
    return torch.load(os.path.join(folder, "weights.pth"), weights_only=True)["model"]


@pytest.mark.device
def test_a_kd_run_with_the_cache_ends_where_the_run_without_it_ends(tmp_path, cifar_root, teacher, monkeypatch):
    _no_crops(monkeypatch)
    runs = {}
    for mode in ("off", "on"):
        runs[mode] = make_exp(tmp_path / mode, **dict(TINY, data_root=cifar_root, teacher=teacher, epochs=4,
                                                      teacher_cache=mode))
        assert run_main(train_kd.main, ["--save_path", runs[mode]]) == 0
    off, on = _weights(runs["off"]), _weights(runs["on"])
    for k in off:
        assert torch.allclose(off[k].float(), on[k].float(), atol=1e-5, rtol=0), k
    m_off, m_on = (read_json(os.path.join(runs[mode], "metrics.json")) for mode in ("off", "on"))
    assert [r["test_acc"] for r in m_on["history"]] == pytest.approx([r["test_acc"] for r in m_off["history"]])
    assert "teacher_answers" not in m_off
    answers = m_on["teacher_answers"]  # 100 images, 2 versions each: at most 200 forwards for 4 x 100 answers
    assert answers["served"] == 400 and answers["computed"] <= 200
    assert "teacher_cache: the teacher's answers" in open(os.path.join(runs["on"], "train.log")).read()


def test_a_bad_teacher_cache_value_is_one_line(tmp_path, cifar_root, teacher, capsys):
    d = make_exp(tmp_path / "bad", **dict(TINY, data_root=cifar_root, teacher=teacher, teacher_cache="always"))
    assert run_main(train_kd.main, ["--save_path", d]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'teacher_cache' must be one of auto, on, off" in err[0]
    assert sorted(os.listdir(d)) == ["params.json"]


@pytest.mark.device
def test_a_battery_shares_one_cache_and_ends_where_lone_runs_without_it_end(tmp_path, cifar_root, teacher,
                                                                           monkeypatch):
    _no_crops(monkeypatch)
    base = dict(TINY, data_root=cifar_root, teacher=teacher, epochs=4)
    lone = [make_exp(tmp_path / f"lone_{a}", **dict(base, attack=a, teacher_cache="off")) for a in ("vanilla", "dkd")]
    for d in lone:
        assert run_main(train_kd.main, ["--save_path", d]) == 0
    together = [make_exp(tmp_path / f"battery_{a}", **dict(base, attack=a, teacher_cache="on"))
                for a in ("vanilla", "dkd")]
    assert run_main(train_kd.main, ["--battery", ",".join(together)]) == 0
    for a, b in zip(lone, together):
        wa, wb = _weights(a), _weights(b)
        assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5, rtol=0) for k in wa), b
        # one cache behind the battery's shared forward: it served each batch once, for both students
        answers = read_json(os.path.join(b, "metrics.json"))["teacher_answers"]
        assert answers["served"] == 400 and answers["computed"] <= 200
