"""Teachers from other codebases, and the refusal of unfinished teachers.

The reference networks below are written from the facts of RepDistiller's models/resnet.py and models/wrn.py
and Nasty-Teacher's model/resnet.py: their module names (so their state dicts carry those projects' parameter
names and shapes) and their forward passes. A file of their weights must load into the zoo model and answer
with the same logits.
"""
import os
import shutil
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
import train_kd
import train_possessive
import train_scratch
from conftest import TINY, file_bytes, make_exp, read_json, run_main
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.constants import DATASETS
from utils.defences import build_from_checkpoint
from utils.errors import UserError


# ------------------------------------------------------------------------------ reference networks
class RDBlock(nn.Module):
    """RepDistiller models/resnet.py BasicBlock: conv1 bn1 relu conv2 bn2, + downsample(x) or x, relu."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class RDResNet(nn.Module):
    """RepDistiller models/resnet.py ResNet(depth, num_filters): conv1 bn1, layer1-3, avgpool(8), fc."""

    def __init__(self, depth, filters, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.inplanes = filters[0]
        self.conv1 = nn.Conv2d(3, filters[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.layer1 = self._layer(filters[1], n, 1)
        self.layer2 = self._layer(filters[2], n, 2)
        self.layer3 = self._layer(filters[3], n, 2)
        self.fc = nn.Linear(filters[3], num_classes)

    def _layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [RDBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [RDBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.avg_pool2d(x, 8).flatten(1))


class RDWideBlock(nn.Module):
    """RepDistiller models/wrn.py BasicBlock: pre-activation, convShortcut when in_planes != out_planes."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal = in_planes == out_planes
        self.convShortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.equal else self.convShortcut(act))


class RDNetworkBlock(nn.Module):
    def __init__(self, n, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[RDWideBlock(in_planes if i == 0 else out_planes, out_planes,
                                                 stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class RDWideResNet(nn.Module):
    """RepDistiller models/wrn.py WideResNet: conv1, block1-3 (NetworkBlock .layer), bn1, avg_pool(8), fc."""

    def __init__(self, depth, widen, num_classes):
        super().__init__()
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = RDNetworkBlock(n, ch[0], ch[1], 1)
        self.block2 = RDNetworkBlock(n, ch[1], ch[2], 2)
        self.block3 = RDNetworkBlock(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(F.avg_pool2d(F.relu(self.bn1(out)), 8).flatten(1))


class NTBlock(nn.Module):
    """Nasty-Teacher model/resnet.py BasicBlock: shortcut = Sequential() or Sequential(conv1x1, bn)."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class NTResNet18(nn.Module):
    """Nasty-Teacher model/resnet.py ResNet18: conv1 bn1, layer1-4 [2,2,2,2], adaptive avg pool, linear."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes, layers = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(NTBlock(in_planes, planes, stride), NTBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


REPDISTILLER = {  # RepDistiller's name -> reference network (its constructor's arguments)
    "resnet8": lambda c: RDResNet(8, [16, 16, 32, 64], c),
    "resnet20": lambda c: RDResNet(20, [16, 16, 32, 64], c),
    "resnet32": lambda c: RDResNet(32, [16, 16, 32, 64], c),
    "resnet56": lambda c: RDResNet(56, [16, 16, 32, 64], c),
    "resnet110": lambda c: RDResNet(110, [16, 16, 32, 64], c),
    "resnet8x4": lambda c: RDResNet(8, [32, 64, 128, 256], c),
    "resnet32x4": lambda c: RDResNet(32, [32, 64, 128, 256], c),
    "wrn_16_2": lambda c: RDWideResNet(16, 2, c),
    "wrn_40_1": lambda c: RDWideResNet(40, 1, c),
    "wrn_40_2": lambda c: RDWideResNet(40, 2, c),
}


def randomised(net, seed=0):
    """Every parameter and BatchNorm statistic drawn at random (not the init's ones and zeros), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() == 1:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
    return net.eval()


def images(n=3, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def same_logits(a, b):
    assert a.shape == b.shape
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()


# ------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("name", sorted(REPDISTILLER))
def test_repdistiller_file_answers_like_repdistillers_model(tmp_path, name):
    ref = randomised(REPDISTILLER[name](100))
    state = ref.state_dict()
    assert "conv1.weight" in state and "fc.weight" in state  # RepDistiller's names, not the zoo's
    path = str(tmp_path / "ckpt_epoch_240.pth")
    torch.save({"epoch": 240, "model": state, "accuracy": 70.0,
                "optimizer": torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9).state_dict()}, path)
    model, ckpt = build_from_checkpoint(path, "teacher", dataset="cifar100", arch=name)
    zoo = models.build(name, 100)
    assert type(model) is type(zoo) and ckpt["arch"] == models.ALIASES.get(name, name)
    assert set(ckpt["model"]) == set(zoo.state_dict()) and ckpt["num_classes"] == 100
    x = images()
    same_logits(model.eval()(x), ref(x))
    # the same weights loaded into the zoo model by hand answer the same
    zoo.load_state_dict(ckpt["model"])
    same_logits(zoo.eval()(x), model(x))
    # a file that names its architecture (and nothing else) needs no teacher_arch
    torch.save({"model": state, "arch": name}, path)
    model, _ = build_from_checkpoint(path, "teacher", dataset="cifar100")
    same_logits(model.eval()(x), ref(x))


def test_repdistiller_names_are_theirs():
    """The facts the translation rests on, for the four teachers RepDistiller ships most."""
    s8x4 = REPDISTILLER["resnet8x4"](100).state_dict()
    assert s8x4["conv1.weight"].shape == (32, 3, 3, 3) and s8x4["layer1.0.downsample.0.weight"].shape == (64, 32, 1, 1)
    assert s8x4["fc.weight"].shape == (100, 256)
    s32x4 = REPDISTILLER["resnet32x4"](100).state_dict()
    assert "layer3.4.bn2.running_var" in s32x4 and "layer1.1.downsample.0.weight" not in s32x4
    s56 = REPDISTILLER["resnet56"](100).state_dict()
    assert "layer1.0.downsample.0.weight" not in s56 and s56["layer2.0.downsample.0.weight"].shape == (32, 16, 1, 1)
    assert "layer3.8.conv2.weight" in s56
    w = REPDISTILLER["wrn_40_2"](100).state_dict()
    assert w["block1.layer.0.convShortcut.weight"].shape == (32, 16, 1, 1)
    assert "block1.layer.1.convShortcut.weight" not in w
    assert w["bn1.weight"].shape == (128,) and "block3.layer.5.conv2.weight" in w
    for ref, zoo in ((REPDISTILLER["resnet32x4"](100), models.build("resnet32x4", 100)),
                     (REPDISTILLER["wrn_40_2"](100), models.build("wrn40_2", 100)),
                     (NTResNet18(10), models.build("resnet18", 10))):
        assert models.count_parameters(ref) == models.count_parameters(zoo)


def test_nasty_teacher_file_with_its_normalisation(tmp_path):
    """Nasty-Teacher saves {'epoch', 'state_dict', 'optim_dict'} and normalises every dataset with its CIFAR-10
    statistics; given as teacher_mean/teacher_std, images normalised with the run's statistics reach the
    model as it was trained to see them."""
    ref = randomised(NTResNet18(100), seed=3)
    assert "linear.weight" in ref.state_dict() and "layer2.0.shortcut.0.weight" in ref.state_dict()
    path = str(tmp_path / "best_model.tar")
    torch.save({"epoch": 200, "state_dict": ref.state_dict(), "optim_dict": {"state": {}, "param_groups": []}}, path)
    nt_mean, nt_std = [0.4914, 0.4822, 0.4465], [0.247, 0.243, 0.261]
    model, ckpt = build_from_checkpoint(path, "teacher", dataset="cifar100", arch="ResNet18", mean=nt_mean, std=nt_std)
    assert ckpt["arch"] == "resnet18" and ckpt["mean"] == nt_mean
    raw = torch.rand(3, 3, 32, 32)
    info = DATASETS["cifar100"]
    ours = (raw - torch.tensor(info.mean).view(1, 3, 1, 1)) / torch.tensor(info.std).view(1, 3, 1, 1)
    theirs = (raw - torch.tensor(nt_mean).view(1, 3, 1, 1)) / torch.tensor(nt_std).view(1, 3, 1, 1)
    same_logits(model.eval()(ours), ref(theirs))
    assert not torch.allclose(ref(ours), ref(theirs), atol=1e-3)  # the normalisation matters here
    # without it, the dataset's statistics are assumed: the weights answer unwrapped
    plain, _ = build_from_checkpoint(path, "teacher", dataset="cifar100", arch="resnet18")
    same_logits(plain.eval()(ours), ref(ours))


@pytest.mark.parametrize("prefix", ["", "module.", "_orig_mod.", "module._orig_mod."])
def test_plain_and_wrapped_state_dicts(tmp_path, prefix):
    zoo = randomised(models.build("resnet20", 10), seed=5)
    path = str(tmp_path / "sd.pth")
    torch.save({prefix + k: v for k, v in zoo.state_dict().items()}, path)
    model, ckpt = build_from_checkpoint(path, "teacher", dataset="cifar10", arch="resnet20")
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    x = images()
    same_logits(model.eval()(x), zoo(x))
    # a RepDistiller file saved from a DataParallel model
    ref = randomised(REPDISTILLER["resnet56"](10), seed=6)
    torch.save({"model": {prefix + k: v for k, v in ref.state_dict().items()}}, path)
    model, _ = build_from_checkpoint(path, "teacher", dataset="cifar10", arch="resnet56")
    same_logits(model.eval()(x), ref(x))


def test_file_without_batch_counters_loads(tmp_path):
    ref = randomised(REPDISTILLER["resnet8"](10))
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = str(tmp_path / "old.pth")
    torch.save({"model": state}, path)
    model, _ = build_from_checkpoint(path, "teacher", dataset="cifar10", arch="resnet8")
    same_logits(model.eval()(images()), ref(images()))


# ------------------------------------------------------------------------------ files that do not fit
def test_wrong_architecture_lists_keys(tmp_path):
    path = str(tmp_path / "wrn.pth")
    torch.save({"model": REPDISTILLER["wrn_40_2"](100).state_dict()}, path)
    with pytest.raises(UserError) as e:
        build_from_checkpoint(path, "teacher", dataset="cifar100", arch="resnet32x4")
    msg = str(e.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "block1.layer.0.bn1" in msg and "layer1.0.bn1" in msg
    assert "--teacher_arch" in msg and "more)" in msg
    with pytest.raises(UserError, match=r"fc.bias has shape \[100\] in the file, \[10\] in the model"):
        build_from_checkpoint(path, "teacher", dataset="cifar10", arch="wrn_40_2")
    with pytest.raises(UserError, match="does not say its architecture; pass the architecture .* --original_arch"):
        build_from_checkpoint(path, "original", dataset="cifar100")
    with pytest.raises(UserError, match="unknown model 'resnet9'"):
        build_from_checkpoint(path, "teacher", dataset="cifar100", arch="resnet9")
    torch.save({"weights": [1, 2], "epoch": 3}, path)
    with pytest.raises(UserError, match=r"holds no state dict \(top-level entries: epoch, weights\)"):
        build_from_checkpoint(path, "teacher", dataset="cifar100", arch="resnet8")


def test_wrong_file_is_one_line_exit_2(tmp_path, cifar_root, capsys):
    teacher = str(tmp_path / "teacher.pth")
    torch.save({"state_dict": {"module." + k: v for k, v in REPDISTILLER["resnet8x4"](10).state_dict().items()}},
               teacher)
    d = make_exp(tmp_path / "kd", **dict(TINY, data_root=cifar_root, teacher=teacher, epochs=1))
    before = file_bytes(d)
    assert run_main(train_kd.main, ["--save_path", d, "--teacher_arch", "resnet8"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: teacher") and "Traceback" not in err[0]
    # resnet8x4's wider stem needs a projection shortcut in layer1, which resnet8 has not; its shapes differ
    assert "unexpected keys layer1.0.shortcut.0.weight" in err[0] and "in the file" in err[0]
    assert "--teacher_arch" in err[0]
    assert file_bytes(d) == before


# ------------------------------------------------------------------------------ end to end, and unfinished teachers
@pytest.fixture(scope="module")
def finished_teacher(tmp_path_factory, cifar_root):
    d = make_exp(tmp_path_factory.mktemp("teacher") / "cnn_small", **dict(TINY, data_root=cifar_root))
    assert run_main(train_scratch.main, ["--save_path", d]) == 0
    return d


def test_foreign_teacher_end_to_end(tmp_path, cifar_root, finished_teacher):
    """A plain state dict saved from a DDP model, with teacher_arch, teaches like this project's file of it."""
    weights = load_checkpoint(os.path.join(finished_teacher, "weights.pth"))["model"]
    foreign = str(tmp_path / "ddp_state_dict.pth")
    torch.save({"module." + k: v for k, v in weights.items()}, foreign)
    d = make_exp(tmp_path / "kd", **dict(TINY, data_root=cifar_root, teacher=foreign, epochs=1))
    assert run_main(train_kd.main, ["--save_path", d, "--teacher_arch", "cnn_small"]) == 0
    m = read_json(os.path.join(d, "metrics.json"))
    teacher = read_json(os.path.join(finished_teacher, "metrics.json"))
    assert m["teacher_arch"] == "cnn_small" and m["teacher_acc"] == pytest.approx(teacher["final_acc"])
    assert m["inputs"]["teacher"]["weights_sha256"] == teacher["weights_sha256"]  # the same weights, by digest


def _unfinished_copies(finished, tmp_path):
    """Two unfinished teachers made from a finished run: its folder without metrics.json (a run killed before
    it finished), and a last.pth of a longer run stopped at epoch 2 of 5."""
    killed = str(tmp_path / "killed")
    shutil.copytree(finished, killed)
    os.unlink(os.path.join(killed, "metrics.json"))
    os.unlink(os.path.join(killed, "weights.pth"))
    stopped = str(tmp_path / "stopped")
    shutil.copytree(finished, stopped)
    os.unlink(os.path.join(stopped, "metrics.json"))
    os.unlink(os.path.join(stopped, "weights.pth"))
    ckpt = load_checkpoint(os.path.join(stopped, "last.pth"))
    assert ckpt["epoch"] == ckpt["config"]["epochs"] == 2
    ckpt["config"] = dict(ckpt["config"], epochs=5)
    save_checkpoint(os.path.join(stopped, "last.pth"), ckpt)
    return os.path.join(killed, "last.pth"), os.path.join(stopped, "last.pth")


def test_unfinished_teacher_is_refused_then_allowed(tmp_path, cifar_root, finished_teacher, capsys):
    killed, stopped = _unfinished_copies(finished_teacher, tmp_path)
    for teacher, why in ((killed, "no metrics.json"), (stopped, "epoch 2 of 5")):
        d = make_exp(tmp_path / f"kd_{os.path.basename(os.path.dirname(teacher))}",
                     **dict(TINY, data_root=cifar_root, teacher=teacher, epochs=1))
        before, teacher_before = file_bytes(d), file_bytes(os.path.dirname(teacher))
        assert run_main(train_kd.main, ["--save_path", d]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "not the end of a finished run" in err[0] and why in err[0], err
        assert "allow_unfinished_teacher" in err[0] and "weights.pth" in err[0]
        assert file_bytes(d) == before and file_bytes(os.path.dirname(teacher)) == teacher_before
        assert run_main(train_kd.main, ["--save_path", d, "--allow_unfinished_teacher", "true"]) == 0
        assert os.path.isfile(os.path.join(d, "metrics.json"))
        capsys.readouterr()
    # the finished run's own files are teachers as they are: its last.pth and its weights.pth
    for name in ("last.pth", "weights.pth"):
        build_from_checkpoint(os.path.join(finished_teacher, name), "teacher", dataset="cifar10")


def test_unfinished_original_is_refused(tmp_path, cifar_root, finished_teacher, capsys):
    _, stopped = _unfinished_copies(finished_teacher, tmp_path)
    d = make_exp(tmp_path / "posthoc", **dict(TINY, data_root=cifar_root, method="posthoc", original=stopped))
    before = file_bytes(d)
    assert run_main(train_possessive.main, ["--save_path", d]) == 2
    err = capsys.readouterr().err
    assert "original" in err and "epoch 2 of 5" in err and "allow_unfinished_original" in err
    assert file_bytes(d) == before


class _StopAfter3(train_kd.KDTask):
    def after_step(self, engine, step):
        self.count = getattr(self, "count", 0) + 1
        if self.count == 3:
            engine.request_stop(signal.SIGTERM)


def test_run_recorded_before_the_teacher_keys_still_resumes(tmp_path, cifar_root, finished_teacher, monkeypatch):
    """A last.pth whose config predates teacher_arch/_mean/_std/allow_unfinished_teacher reads as having their
    defaults, so its --resume is not refused for keys it never had."""
    d = make_exp(tmp_path / "kd", **dict(TINY, data_root=cifar_root,
                                         teacher=os.path.join(finished_teacher, "weights.pth"), epochs=1))
    monkeypatch.setattr(train_kd, "KDTask", _StopAfter3)
    assert run_main(train_kd.main, ["--save_path", d]) == 128 + signal.SIGTERM
    monkeypatch.undo()
    last = os.path.join(d, "last.pth")
    ckpt = load_checkpoint(last)
    for key in ("teacher_arch", "teacher_mean", "teacher_std", "allow_unfinished_teacher"):
        del ckpt["config"][key]
    save_checkpoint(last, ckpt)
    assert run_main(train_kd.main, ["--save_path", d, "--resume"]) == 0
    # a value other than the default is a change of config, and refused
    os.unlink(os.path.join(d, "metrics.json"))
    assert run_main(train_kd.main, ["--save_path", d, "--resume", "--teacher_arch", "cnn_small"]) == 2


def test_training_free_defence_of_a_foreign_original_keeps_its_normalisation(tmp_path, cifar_root, finished_teacher):
    """Post-hoc reversal of a Nasty-Teacher-style original trained with other statistics: the published teacher
    records them, so a thief loading it sees the original's answers (post-hoc reversal keeps the top-1)."""
    weights = load_checkpoint(os.path.join(finished_teacher, "weights.pth"))["model"]
    original = str(tmp_path / "nasty_style.tar")
    torch.save({"epoch": 2, "state_dict": weights, "optim_dict": {}}, original)
    mean, std = [0.45, 0.45, 0.45], [0.3, 0.3, 0.3]
    d = make_exp(tmp_path / "posthoc", **dict(TINY, data_root=cifar_root, method="posthoc", original=original,
                                              original_arch="cnn_small", original_mean=mean, original_std=std))
    assert run_main(train_possessive.main, ["--save_path", d]) == 0
    m = read_json(os.path.join(d, "metrics.json"))
    published = load_checkpoint(os.path.join(d, "weights.pth"))
    assert published["mean"] == mean and published["std"] == std and published["defence"]["name"] == "posthoc"
    assert m["final_acc"] == pytest.approx(m["original_acc"])
    teacher, _ = build_from_checkpoint(os.path.join(d, "weights.pth"), "teacher", dataset="cifar10")
    plain, _ = build_from_checkpoint(original, "original", dataset="cifar10", arch="cnn_small", mean=mean, std=std)
    x = images()
    assert torch.equal(teacher.eval()(x).argmax(1), plain.eval()(x).argmax(1))
    unwrapped, _ = build_from_checkpoint(original, "original", dataset="cifar10", arch="cnn_small")
    assert not torch.allclose(unwrapped.eval()(x), plain(x))  # the statistics change the answers
