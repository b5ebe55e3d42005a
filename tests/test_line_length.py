"""No line of a .py file of the repository is longer than 120 characters: the code is read in diffs side by side,
two files across one screen, and a longer line means scrolling sideways or a wrapped mess. The rule is 120
characters (Python's count, so a τ or a Δ is one), the same for the scripts, the packages and the tests."""
import os

from test_layering import ROOT, source_files

LIMIT = 120
SHOWN = 20


def test_no_line_is_longer_than_120_characters():
    files = source_files(tests=True)
    assert "utils/engine.py" in files and "tests/test_line_length.py" in files, f"no .py files found under {ROOT}"
    offenders = []
    for path in files:
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                length = len(line.rstrip("\r\n"))
                if length > LIMIT:
                    offenders.append(f"{path}:{number}:{length}")
    more = len(offenders) - SHOWN
    shown = "\n".join(offenders[:SHOWN]) + (f"\n... and {more} more" if more > 0 else "")
    assert not offenders, (f"{len(offenders)} line(s) longer than {LIMIT} characters (file:line:length); wrap them "
                           f"inside brackets or split the string, never with a backslash:\n{shown}")
