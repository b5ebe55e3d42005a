"""No module over ~400 lines without a stated reason: a newcomer reads a module whole, and a long one either
splits or says in its docstring why it is one piece ("Longer than ~400 lines because ...")."""
import ast
import os

from test_layering import ROOT, source_files

LIMIT = 400
REASON = "Longer than ~400 lines because"


def long_without_reason(files):
    """[(file, lines)] of the files over LIMIT lines whose module docstring gives no reason."""
    out = []
    for rel in files:
        with open(os.path.join(ROOT, rel)) as f:
            source = f.read()
        lines = source.count("\n")
        doc = ast.get_docstring(ast.parse(source)) or ""
        if lines > LIMIT and REASON not in " ".join(doc.split()):
            out.append((rel, lines))
    return out


def test_no_module_is_long_without_a_stated_reason():
    assert long_without_reason(source_files()) == []


def test_a_long_module_without_a_reason_is_caught(tmp_path, monkeypatch):
    import test_layering
    monkeypatch.setattr(test_layering, "ROOT", str(tmp_path))
    (tmp_path / "long.py").write_text('"""A module."""\n' + "x = 1\n" * (LIMIT + 1))
    (tmp_path / "why.py").write_text(f'"""A module.\n\n{REASON} it must be.\n"""\n' + "x = 1\n" * (LIMIT + 1))
    (tmp_path / "short.py").write_text('"""A module."""\nx = 1\n')
    import test_module_size
    monkeypatch.setattr(test_module_size, "ROOT", str(tmp_path))
    assert long_without_reason(["long.py", "why.py", "short.py"]) == [("long.py", LIMIT + 2)]
