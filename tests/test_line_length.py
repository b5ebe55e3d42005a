"""No line of a tracked .py file is longer than 120 characters: the code is read in diffs side by side, two files
across one screen, and a longer line means scrolling sideways or a wrapped mess. The rule is 120 characters (Python's
count, so a τ or a Δ is one), the same for the scripts, the packages and the tests."""
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 120
SHOWN = 20


def _python_files():
    """The git-tracked .py files, relative to the repo root; without git (or outside a checkout), every .py file under
    the root except in hidden folders and .venv."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "*.py"], cwd=ROOT, capture_output=True, check=True).stdout
        return [p for p in out.decode("utf-8").split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        found = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != ".venv")
            found += [os.path.relpath(os.path.join(folder, f), ROOT) for f in sorted(files) if f.endswith(".py")]
        return found


def test_no_line_is_longer_than_120_characters():
    files = _python_files()
    assert files, f"no .py file found under {ROOT}"
    offenders = []
    for path in files:
        full = os.path.join(ROOT, path)
        if not os.path.isfile(full):  # tracked but deleted in the working tree
            continue
        with open(full, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                length = len(line.rstrip("\r\n"))
                if length > LIMIT:
                    offenders.append(f"{path}:{number}:{length}")
    more = len(offenders) - SHOWN
    shown = "\n".join(offenders[:SHOWN]) + (f"\n... and {more} more" if more > 0 else "")
    assert not offenders, (f"{len(offenders)} line(s) longer than {LIMIT} characters (file:line:length); wrap them "
                           f"inside brackets or split the string, never with a backslash:\n{shown}")
