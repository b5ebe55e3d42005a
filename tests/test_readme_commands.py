"""The README's example commands, run on a fresh copy of the repository (every committed step done), change
no tracked file: a rebuild with nothing new leaves results.md and results.json as they are, and a script run
on a finished folder refuses instead of replacing it.

The copy holds the working tree's tracked files in a new git repository, so `git status` there tells what a
command changed. Each command is run in this process (main(argv)), from the copy's root.
"""
import os
import re
import shutil
import subprocess

import pytest

import report
import reproduce
import train_dfad
import train_kd
import train_possessive
import train_scratch
from conftest import ROOT, run_main

MAIN = {"reproduce.py": reproduce.main, "report.py": report.main, "train_scratch.py": train_scratch.main,
        "train_possessive.py": train_possessive.main, "train_kd.py": train_kd.main, "train_dfad.py": train_dfad.main}

# (command as the README writes it, ./data standing for the data folder; exit code expected)
COMMANDS = [
    ("reproduce.py --preset mini --data_root ./data --jobs 2", 0),
    ("reproduce.py --preset mini --data_root ./data --defences keyed,keyedflat --jobs 2", 0),
    ("reproduce.py --preset mini --data_root ./data --only dfad --jobs 2", 0),
    ("train_possessive.py --save_path exps/mini/rml_resnet20", 2),
    ("train_possessive.py --save_path exps/mini/nasty_resnet20", 2),
    ("train_kd.py --save_path exps/mini/kd_vanilla_rml_cnn", 2),
    ("train_kd.py --save_path exps/mini/kd_vanilla_rml_cnn --tau_sweep 1,4,10,20", 2),
    ("train_dfad.py --save_path exps/mini/dfad_rml_resnet8", 2),
    ("report.py exps/mini", 0),
    ("train_scratch.py --save_path exps/mini_curve/scratch_cnn_e24 --data_root ./data", 2),
    ("train_kd.py --save_path exps/mini_curve/kd_vanilla_original_cnn_e24 --data_root ./data", 2),
    ("train_scratch.py --save_path exps/mini_long/ls_cnn_e24 --data_root ./data", 2),
    ("train_dfad.py --save_path exps/mini_dfad_curve/dfad_original_resnet8_e12 --data_root ./data", 2),
    ("reproduce.py --preset mini --threat p10 --data_root ./data --dry_run", 0),
    ("report.py exps/threat_curve --curve", 0),
    ("train_kd.py --save_path exps/threat_curve/kd_vanilla_original_cnn_n5000_e240 --data_root ./data", 2),
]


def _git(repo, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", repo, *args],
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The working tree's tracked files (as they are now) in a fresh repository with one commit."""
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.fail("the tests run from a git checkout; this one has no .git")
    repo = str(tmp_path_factory.mktemp("clone") / "repo")
    files = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src = os.path.join(ROOT, rel)
        if not os.path.isfile(src):
            continue  # deleted in the working tree
        os.makedirs(os.path.dirname(os.path.join(repo, rel)) or repo, exist_ok=True)
        shutil.copy2(src, os.path.join(repo, rel))
    _git(repo, "init", "-q")
    _git(repo, "add", "-A", "-f")
    _git(repo, "commit", "-qm", "fresh clone")
    return repo


def test_readme_commands_change_no_tracked_file(clone, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()  # every step is done: no command may read it
    monkeypatch.chdir(clone)
    for command, expected in COMMANDS:
        script, *argv = command.replace("./data", str(data)).split()
        capsys.readouterr()
        code = run_main(MAIN[script], argv)
        out, err = capsys.readouterr()
        assert code == expected, f"{command}: exit {code}\n{out[-1500:]}\n{err[-1500:]}"
        if expected == 2:
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1 and re.search(r"holds a (finished|single) run", lines[0]), (command, lines)
            assert "--overwrite" in lines[0]
        status = _git(clone, "status", "--porcelain")
        assert status == "", f"{command} changed tracked files:\n{status}"
