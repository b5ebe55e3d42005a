"""No code outside the tests reaches into another module's or object's underscore names.

The rule, checked with `ast` on every .py file of the repository outside tests/ (and outside hidden folders):
  1. an attribute access `x._y` is refused unless x is the bare name `self` or `cls` (an object's own state);
     dunders (`x.__name__`) are public and allowed;
  2. `getattr/setattr/hasattr/delattr(x, "_y")` with a literal name is refused on the same terms (the same
     access, spelt as a call);
  3. `from m import _x` is refused (`from m import x as _x` is a local alias and allowed), and so is a dotted
     module path with an underscore component (`import m._x`, `from m._x import y`).
What a module keeps private is then used by that module alone; another module gets a public name.

ALLOWED lists the exceptions, each with its reason: third-party private names for which the library offers
no public way. A stale entry (no longer found) fails the test as well, so the list only shrinks.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (file, the access as ast.unparse writes it) -> why it is allowed
ALLOWED = {
    ("utils/engine.py", "torch.ops.mkldnn._is_mkldnn_bf16_supported"):
        "torch has no public query of CPU bf16 support; cpu_supports_bf16 wraps it and answers False if it goes",
    ("utils/checkpoint.py", "getattr(model, '_orig_mod', model)"):
        "torch.compile's wrapper gives the compiled module only as _orig_mod; unwrap needs it to save bare keys",
}

ATTR_CALLS = ("getattr", "setattr", "hasattr", "delattr")


def _private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own(node):
    return isinstance(node, ast.Name) and node.id in ("self", "cls")


def violations(source, filename="<source>"):
    """[(line, the offending code)] of one file's source, by the rule in the module docstring."""
    out = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and _private(node.attr) and not _own(node.value):
            out.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ATTR_CALLS
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _private(node.args[1].value) and not _own(node.args[0])):
            out.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.ImportFrom):
            path = (node.module or "").split(".")
            if any(_private(p) for p in path):
                out.append((node.lineno, f"from {'.' * node.level}{node.module} import ..."))
            out += [(node.lineno, f"from {'.' * node.level}{node.module or ''} import {a.name}")
                    for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, f"import {a.name}") for a in node.names
                    if any(_private(p) for p in a.name.split("."))]
    return out


def source_files():
    """Every .py file of the repository outside tests/, hidden folders and caches, relative to ROOT."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                         and not (folder == ROOT and d == "tests"))
        out += [os.path.relpath(os.path.join(folder, f), ROOT) for f in sorted(files) if f.endswith(".py")]
    return out


def test_no_code_reaches_into_another_modules_underscore_names():
    files = source_files()
    assert "utils/engine.py" in files and "train_kd.py" in files and not any(f.startswith("tests") for f in files)
    found, used = [], set()
    for rel in files:
        with open(os.path.join(ROOT, rel)) as f:
            for line, code in violations(f.read(), rel):
                if (rel, code) in ALLOWED:
                    used.add((rel, code))
                else:
                    found.append(f"{rel}:{line}: {code}")
    assert not found, "underscore names used from outside their own object or module (give them a public " \
                      "name, or add an entry with its reason to ALLOWED):\n" + "\n".join(found)
    assert used == set(ALLOWED), f"stale ALLOWED entries (no longer found): {sorted(set(ALLOWED) - used)}"
    assert all(reason.strip() for reason in ALLOWED.values())


@pytest.mark.parametrize("code,bad", [
    ("engine._stop_signal = 2", "engine._stop_signal"),
    ("x = loader._normalise(images)", "loader._normalise"),
    ("x = a.b._c", "a.b._c"),
    ("x = other.__secret", "other.__secret"),
    ("from utils.losses import _kl", "from utils.losses import _kl"),
    ("from .losses import kd_loss, _kl", "from .losses import _kl"),
    ("from utils._private import x", "from utils._private import ..."),
    ("import utils._private", "import utils._private"),
    ("getattr(engine, '_stop_signal', None)", "getattr(engine, '_stop_signal', None)"),
    ("setattr(engine, '_stop_signal', 2)", "setattr(engine, '_stop_signal', 2)"),
])
def test_the_rule_refuses(code, bad):
    assert [c for _, c in violations(code)] == [bad]


@pytest.mark.parametrize("code", [
    "self._stop_signal = 2",
    "cls._registry = {}",
    "getattr(self, '_bar', None)",
    "name = model.__class__.__name__",
    "from utils.config import NON_RESULT_KEYS as _RUN_NON_RESULT_KEYS",
    "from . import cnn as _cnn",
    "x = loader.normalise(images)",
    "_local = 1\nprint(_local)",
])
def test_the_rule_allows(code):
    assert violations(code) == []
