"""The keyed defences (the variants of METHOD.md section 9): a secret permutation of the non-target ranks chosen by the
top-1 class, optionally with the target-versus-rest split fixed; the key is never written anywhere but its own file."""
import os

import pytest
import torch

import reproduce
import train_kd
import train_possessive
import train_scratch
from conftest import TINY, make_exp, read_json, run_main
from utils.checkpoint import WEIGHTS_FILE, load_checkpoint
from utils.defences import (KEY_ENV, KEY_FILE, KeyedPermutation, PostHocReversal, build_from_checkpoint, fix_confidence,
                            key_fingerprint, key_problem, permute_ranks, rank_permutations)


def test_permuted_ranks_on_hand_made_logits():
    z = torch.tensor([[5.0, 3.0, 2.0, 1.0, 0.0]])
    perms = torch.tensor([[2, 0, 3, 1]] * 5)
    # non-target ranks: class 1 (3), class 2 (2), class 3 (1), class 4 (0); rank k gets the value of rank perms[k]
    assert permute_ranks(z, perms).tolist() == [[5.0, 1.0, 3.0, 0.0, 2.0]]
    # chosen by the top-1 class: the same values with another top-1 use that class's permutation
    z2 = torch.tensor([[3.0, 5.0, 2.0, 1.0, 0.0]])
    perms2 = torch.stack([torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])] + [torch.tensor([0, 1, 2, 3])] * 3)
    assert permute_ranks(z2, perms2).tolist() == [[0.0, 5.0, 1.0, 2.0, 3.0]]


def test_the_reversal_permutation_is_post_hoc_reversal():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10, generator=g)
    reversal = torch.arange(8, -1, -1).expand(10, 9)
    torch.testing.assert_close(permute_ranks(z, reversal), PostHocReversal.transform(z, {}))


def test_permutation_keeps_the_argmax_and_the_values_also_with_ties():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(256, 10, generator=g).bfloat16().float()  # bf16 rounding makes ties
    z[:8, :3] = 2.0  # tied at the top
    out = permute_ranks(z, rank_permutations("k", 10))
    assert torch.equal(out.argmax(1), z.argmax(1))
    keep = out.argmax(1, keepdim=True)
    assert torch.equal(out.scatter(1, keep, 0).sort(1).values, z.scatter(1, keep, 0).sort(1).values)


def test_fixed_confidence_gives_every_row_the_same_target_probability():
    g = torch.Generator().manual_seed(2)
    z = 3 * torch.randn(128, 10, generator=g)
    out = fix_confidence(z, 0.9, 4.0)
    top = z.argmax(1)
    p = torch.softmax(out / 4.0, dim=1).gather(1, top[:, None]).squeeze(1)
    torch.testing.assert_close(p, torch.full_like(p, 0.9), atol=1e-5, rtol=0)
    assert torch.equal(out.argmax(1), top)
    rest = torch.ones_like(z, dtype=torch.bool).scatter(1, top[:, None], False)
    assert torch.equal(out[rest], z[rest])  # the non-target logits are untouched


def test_keys_give_their_own_permutations():
    a, b = rank_permutations("alpha", 10), rank_permutations("beta", 10)
    assert a.shape == (10, 9) and torch.equal(a, rank_permutations("alpha", 10)) and not torch.equal(a, b)
    assert all(sorted(row.tolist()) == list(range(9)) for row in a)


@pytest.fixture(scope="module")
def original(tmp_path_factory, cifar_root):
    d = make_exp(tmp_path_factory.mktemp("original") / "cnn_small", **dict(TINY, data_root=cifar_root))
    assert run_main(train_scratch.main, ["--save_path", d]) == 0
    return os.path.join(d, WEIGHTS_FILE)


def _keyed(tmp_path, cifar_root, original, name="keyed", **over):
    params = dict(TINY, data_root=cifar_root, model="cnn_small", method="keyedflat", keyed_confidence=0.9,
                  original=original)
    return make_exp(tmp_path / name, **dict(params, **over))


def test_keyed_teacher_answers_through_its_key_and_never_writes_it(tmp_path, cifar_root, original, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    d = _keyed(tmp_path, cifar_root, original)
    assert run_main(train_possessive.main, ["--save_path", d]) == 0
    with open(os.path.join(d, KEY_FILE)) as f:
        key = f.read().strip()
    assert len(key) == 32 and oct(os.stat(os.path.join(d, KEY_FILE)).st_mode & 0o777) == "0o600"
    umask = os.umask(0)
    os.umask(umask)
    for name in ("metrics.json", "config.json", WEIGHTS_FILE):  # the results are not private like the key
        assert os.stat(os.path.join(d, name)).st_mode & 0o777 == 0o666 & ~umask, name
    for folder, _, files in os.walk(d):
        for name in files:
            if name != KEY_FILE:
                with open(os.path.join(folder, name), "rb") as f:
                    assert key.encode() not in f.read(), name
    ckpt = load_checkpoint(os.path.join(d, WEIGHTS_FILE))
    assert ckpt["defence"] == {"name": "keyedflat", "keyed_confidence": 0.9, "keyed_tau": 4.0,
                               "key_sha256": key_fingerprint(key)}
    model, _ = build_from_checkpoint(os.path.join(d, WEIGHTS_FILE), "teacher")
    plain, _ = build_from_checkpoint(original, "teacher")
    model.eval(), plain.eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        expected = KeyedPermutation.transform(plain(x), {"perms": rank_permutations(key, 10), "keyed_confidence": 0.9,
                                                         "keyed_tau": 4.0})
        torch.testing.assert_close(model(x), expected)
    m = read_json(os.path.join(d, "metrics.json"))
    assert m["final_acc"] == m["original_acc"]  # the top-1 is kept
    # a thief's run reads the teacher's answers: it works where the key is, and is refused (one line) where not
    kd = make_exp(tmp_path / "kd", **dict(TINY, data_root=cifar_root, teacher=os.path.join(d, WEIGHTS_FILE), epochs=1))
    assert run_main(train_kd.main, ["--save_path", kd]) == 0
    os.rename(os.path.join(d, KEY_FILE), os.path.join(tmp_path, "moved.key"))
    assert key_problem(d, ckpt["defence"]).startswith("its secret key is not here")
    monkeypatch.setenv(KEY_ENV, "another key")
    assert "is not the one it was made with" in key_problem(d, ckpt["defence"])
    monkeypatch.setenv(KEY_ENV, key)
    assert key_problem(d, ckpt["defence"]) is None


def test_keyed_teacher_without_its_key_is_refused_and_stale(tmp_path, cifar_root, original, monkeypatch, capsys):
    monkeypatch.delenv(KEY_ENV, raising=False)
    d = _keyed(tmp_path, cifar_root, original)
    assert run_main(train_possessive.main, ["--save_path", d]) == 0
    os.remove(os.path.join(d, KEY_FILE))
    kd = make_exp(tmp_path / "kd", **dict(TINY, data_root=cifar_root, teacher=os.path.join(d, WEIGHTS_FILE), epochs=1))
    capsys.readouterr()
    assert run_main(train_kd.main, ["--save_path", kd]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "is keyed (keyedflat) and cannot answer: its secret key is not here" in err[0]
    params = read_json(os.path.join(d, "params.json"))
    state, reason = reproduce.step_state(d, params, weights_needed=True)
    assert state == "stale" and "made again with a new key" in reason


def test_keyedflat_needs_a_confidence(tmp_path, cifar_root, original, capsys):
    d = _keyed(tmp_path, cifar_root, original, keyed_confidence=0.0)
    assert run_main(train_possessive.main, ["--save_path", d]) == 2
    assert "method keyedflat fixes the confidence" in capsys.readouterr().err
    assert sorted(os.listdir(d)) == ["params.json"]


def test_screened_defences_join_the_battery_and_stay(tiny_chain, cifar_root, tmp_path, capsys, monkeypatch):
    """reproduce.py --defences keyedflat attacks a defence outside the default battery with every attack; only
    its steps run (the rest is done), it appears in results.md, and a later run without the flag keeps it."""
    import shutil
    monkeypatch.delenv(KEY_ENV, raising=False)
    exp_root = str(tmp_path / "tiny")
    shutil.copytree(tiny_chain[0], exp_root, ignore=lambda folder, names: [n for n in names if n == "tb"])
    argv = ["--preset", "tiny", "--data_root", cifar_root, "--exp_root", exp_root]
    assert run_main(reproduce.main, argv + ["--defences", "keyedflat"]) == 0
    out = capsys.readouterr().out
    attacks = reproduce.battery_attacks()
    assert f"{len(reproduce.plan('tiny')) + 1 + len(attacks)} steps: " in out and f"{1 + len(attacks)} new" in out
    assert os.path.isfile(os.path.join(exp_root, "keyedflat_cnn", KEY_FILE))
    text = open(os.path.join(exp_root, "results.md")).read()
    for attack in attacks:
        assert f"| keyed permutation, fixed confidence | {attack} |" in text
    assert run_main(reproduce.main, argv) == 0
    out = capsys.readouterr().out
    assert "new" not in out.split("steps: ")[-1].splitlines()[0]  # everything done, keyedflat included
    assert "| keyed permutation, fixed confidence | vanilla |" in open(os.path.join(exp_root, "results.md")).read()
    seeded = [s["name"] for s in reproduce.plan("tiny", seeds=(0, 1), defences=["keyedflat"])]
    assert "kd_vanilla_keyedflat_cnn_small" in seeded and "kd_vanilla_keyedflat_cnn_small_seed1" not in seeded
    assert "kd_vanilla_rml_cnn_small_seed1" in seeded  # screening: the first seed only; the battery: every seed
    assert run_main(reproduce.main, argv + ["--defences", "nosuch"]) == 2
    assert "unknown defence 'nosuch'" in capsys.readouterr().err
