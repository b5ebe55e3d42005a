"""The commands of the README and docs/RESULTS.md, run on a fresh copy of the repository (every committed step
done), change no tracked file: a rebuild with nothing new leaves results.md and results.json as they are, and a
script run on a finished folder refuses instead of replacing it.

The README shows no command that is not run here: each of its command lines is one of COMMANDS, the CI's own
set-up and test commands (.ci/run), or a template whose placeholders (DIR, FILE, ARCH) stand for the user's
paths and whose options the script accepts. Every one of COMMANDS is shown in the README or docs/RESULTS.md.

The copy holds the working tree's tracked files in a new git repository, so `git status` there tells what a
command changed. Each command is run in this process (main(argv)), from the copy's root.
"""
import os
import re
import shlex
import shutil
import subprocess

import pytest

import import_teacher
import judge
import report
import reproduce
import train_dfad
import train_kd
import train_possessive
import train_scratch
import fakedata
from conftest import ROOT, run_main

MAIN = {"reproduce.py": reproduce.main, "report.py": report.main, "train_scratch.py": train_scratch.main,
        "train_possessive.py": train_possessive.main, "train_kd.py": train_kd.main, "train_dfad.py": train_dfad.main,
        "judge.py": judge.main, "import_teacher.py": import_teacher.main}

# (command as the README or docs/RESULTS.md writes it, after `python `; ./data standing for an empty data folder,
# except in the set-up command, which reads the generated data the test puts in the copy's ./data; exit code)
SETUP = "reproduce.py --preset mini --download --jobs 2"
COMMANDS = [
    (SETUP, 0),
    ("reproduce.py --preset mini --data_root ./data --jobs 2", 0),
    ("reproduce.py --preset mini --data_root ./data --defences keyed,keyedflat --jobs 2", 0),
    ("reproduce.py --preset mini --data_root ./data --only dfad --jobs 2", 0),
    ("train_possessive.py --save_path exps/mini/rml_resnet20", 2),
    ("train_possessive.py --save_path exps/mini/nasty_resnet20", 2),
    ("train_kd.py --save_path exps/mini/kd_vanilla_rml_cnn", 2),
    ("train_kd.py --save_path exps/mini/kd_vanilla_rml_cnn --tau_sweep 1,4,10,20", 2),
    ("train_dfad.py --save_path exps/mini/dfad_rml_resnet8", 2),
    ("report.py exps/mini", 0),
    ("reproduce.py --preset mini --threat p10 --data_root ./data --dry_run", 0),
    ("reproduce.py --preset mini --threat p2 --data_root ./data --dry_run --cost exps/threat_p2", 0),
    ("reproduce.py --schedule mini_curve --data_root ./data --jobs 2", 0),
    ("reproduce.py --schedule mini_long --data_root ./data --jobs 2", 0),
    ("reproduce.py --schedule mini_long --data_root ./data --dry_run", 0),
    ("reproduce.py --schedule mini_dfad_curve --data_root ./data --jobs 2", 0),
    ("reproduce.py --schedule threat_curve --data_root ./data --jobs 2", 0),
    ("reproduce.py --schedule mini_fp32 --data_root ./data --jobs 2", 0),
    ("reproduce.py --schedule mini_rml_screen --data_root ./data --jobs 2", 0),
    ("reproduce.py --schedule mini_skeptical --data_root ./data --jobs 2", 0),
]
PLACEHOLDERS = {"DIR", "FILE", "ARCH"}
FIRST_SCREEN = 30  # lines: where the README's set-up and test commands must be
PYTHON = ("python ", "python3 ", ".venv/bin/python ")


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


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def command_lines(markdown):
    """(line number, command) of every shell command in the code blocks (indented or fenced) of a markdown
    text: lines that start with python, python3, .venv/bin/python or torchrun, with continuation lines joined
    and a trailing comment dropped."""
    out, fenced, pending = [], False, None
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if pending is not None:
            pending = (pending[0], pending[1] + " " + line.strip())
        elif (fenced or line.startswith("    ")) and line.strip().startswith(PYTHON + ("torchrun ",)):
            pending = (number, line.strip())
        else:
            continue
        if pending[1].endswith("\\"):
            pending = (pending[0], pending[1][:-1].rstrip())
            continue
        out.append((pending[0], re.sub(r"\s+#.*$", "", pending[1]).strip()))
        pending = None
    return out


def _script_command(command):
    """The command without its interpreter: 'train_kd.py --save_path ...'."""
    for prefix in PYTHON:
        if command.startswith(prefix):
            return command[len(prefix):]
    return command


def test_the_readme_shows_only_commands_that_are_run(capsys):
    readme = _read("README.md")
    ci = [line.strip() for line in _read(".ci/run").splitlines()]
    tested = {command for command, _ in COMMANDS}
    shown = command_lines(readme)
    assert len(shown) >= 10, shown
    first_screen = [command for number, command in shown if number <= FIRST_SCREEN]
    setup = [c for c in first_screen if "&&" in c]
    assert len(setup) == 1, first_screen
    venv, pip, run = [part.strip() for part in setup[0].split("&&")]
    assert venv in ci and any(line.startswith(".venv/bin/pip install") and line.endswith(pip.split("install", 1)[1])
                              for line in ci), (venv, pip)
    assert _script_command(run) == SETUP
    test_command = [c for c in first_screen if "pytest" in c]
    assert test_command and test_command[0] in ci, (test_command, ci)  # the CI runs exactly the README's tests
    for number, command in shown:
        if command in (setup[0], test_command[0]):
            continue
        script_command = _script_command(command)
        if script_command in tested:
            continue
        tokens = shlex.split(script_command)
        assert PLACEHOLDERS & set(tokens), (
            f"README line {number}: {command!r} is neither run by this test nor a template")
        assert tokens[0] in MAIN, f"README line {number}: {tokens[0]} is not a script"
        capsys.readouterr()
        assert run_main(MAIN[tokens[0]], ["--help"]) == 0
        usage = capsys.readouterr().out
        for option in (t for t in tokens if t.startswith("--")):
            assert re.search(rf"{re.escape(option)}\b", usage), f"README line {number}: {tokens[0]} has no {option}"


def test_every_command_run_here_is_shown_in_the_docs():
    docs = " ".join((_read("README.md") + _read("docs/RESULTS.md")).split())  # inline code may wrap
    for command, _ in COMMANDS:
        assert f"python {command}" in docs or f"python3 {command}" in docs or \
            f".venv/bin/python {command}" in docs, f"{command!r} is in neither the README nor docs/RESULTS.md"


def test_readme_commands_change_no_tracked_file(clone, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()  # every step is done: no command may read it
    fakedata.make_cifar10(os.path.join(clone, "data"), train_per_class=2, test_per_class=1)  # git-ignored
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
