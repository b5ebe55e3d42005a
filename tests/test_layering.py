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

And the modules of utils/ and models/ sit in layers (LAYERS, lowest first): a module imports modules of its own
layer or of lower ones, never of a higher one, whether at the top of the file or inside a function. The rest of
the repository (the scripts, reporting/, bench/) is the top layer, so no module of utils/ or models/ imports it.
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


def source_files(tests=False):
    """Every .py file of the repository outside hidden folders and caches (and outside tests/ unless tests),
    relative to ROOT."""
    out = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                         and (tests or not (folder == ROOT and d == "tests")))
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


# ------------------------------------------------------------------------------------------ import layers
# The layers of utils/ and models/, lowest first: (what the layer is, its modules; "p.*": the package p and all
# its modules).
LAYERS = (
    ("foundations: the datasets' constants, the user error, folder locks, the registry helper",
     ("utils", "utils.constants", "utils.errors", "utils.lock", "utils.registry")),
    ("the model zoo and computations on tensors and numbers",
     ("models.*", "utils.losses", "utils.diagnostics", "utils.stats", "utils.generator", "utils.foreign",
      "utils.cost")),
    ("storage: saving and loading checkpoints, digests, rebuilding a stored model", ("utils.checkpoint",)),
    ("configuration, data, and the defences (with the loader that puts a defence around a stored model)",
     ("utils.config", "utils.data", "utils.defences")),
    ("training: the engine and the battery of students", ("utils.engine", "utils.battery")),
    ("the attacks (their learnt parts are the engine's) and the thief's sweeps and tuning around them",
     ("utils.attacks", "utils.thief")),
)
TOP = len(LAYERS)  # the scripts, reporting/, bench/
LAYERED = ("utils", "models")


def module_name(rel):
    """utils/checkpoint.py -> utils.checkpoint; a package's __init__.py is the package."""
    parts = rel[:-len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules():
    """{module name: (its file, whether it is a package)} of every .py file outside tests/ and hidden folders."""
    return {module_name(rel): (rel, rel.endswith("__init__.py")) for rel in source_files()}


def layer_of(module):
    """The index of a module's layer in LAYERS (TOP outside utils/ and models/), or None if it is not declared."""
    if module.split(".")[0] not in LAYERED:
        return TOP
    for index, (_, members) in enumerate(LAYERS):
        for m in members:
            if module == m.removesuffix(".*") or (m.endswith(".*") and module.startswith(m[:-1])):
                return index
    return None


def layer_title(module):
    index = layer_of(module)
    return "the scripts, reporting/, bench/" if index == TOP else LAYERS[index][0]


def imports(source, module, is_package, known):
    """[(line, imported project module)] of one module's source, every import statement anywhere in it;
    known: the project's module names (anything else, torch or the standard library, is left out)."""
    def project(name):
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in known:
                return ".".join(parts[:i])
        return None

    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            names = [f"{base}.{a.name}" if base else a.name for a in node.names]  # a submodule, or a name in base
        else:
            continue
        out += [(node.lineno, m) for m in dict.fromkeys(map(project, names)) if m is not None]
    return out


def upward_imports(source, module, is_package=False, known=None):
    """[(line, imported module)] of the imports of one module's source that reach a higher layer."""
    known = project_modules() if known is None else known
    return [(line, target) for line, target in imports(source, module, is_package, known)
            if layer_of(target) is not None and layer_of(target) > layer_of(module)]


def test_every_module_of_utils_and_models_has_one_layer():
    modules = [m for m in project_modules() if m.split(".")[0] in LAYERED]
    assert "utils.checkpoint" in modules and "models.resnet" in modules
    undeclared = [m for m in modules if layer_of(m) is None]
    assert not undeclared, f"modules without a layer (add them to LAYERS): {undeclared}"
    declared = [m.removesuffix(".*") for _, members in LAYERS for m in members]
    assert len(declared) == len(set(declared)), "a module is in two layers"
    assert set(declared) <= set(modules), f"LAYERS names modules that are gone: {sorted(set(declared) - set(modules))}"


def test_no_module_imports_a_higher_layer():
    known = project_modules()
    found, seen = [], set()
    for module, (rel, is_package) in known.items():
        if layer_of(module) == TOP:
            continue
        with open(os.path.join(ROOT, rel)) as f:
            source = f.read()
        seen |= {(module, target) for _, target in imports(source, module, is_package, known)}
        found += [f"{rel}:{line}: imports {target} (layer '{layer_title(target)}') from layer "
                  f"'{layer_title(module)}'" for line, target in upward_imports(source, module, is_package, known)]
    assert not found, "imports of a higher layer (move the code that needs it up, or pass it in from above):\n" + \
        "\n".join(found)
    # the scan sees imports at the top, inside functions, relative and absolute, and between models' own modules
    assert {("utils.defences", "utils.checkpoint"), ("utils.errors", "utils.lock"), ("utils.engine", "utils.data"),
            ("utils.diagnostics", "utils.losses"), ("utils.checkpoint", "models"),
            ("models.cnn", "models.resnet_cifar")} <= seen


@pytest.mark.parametrize("module,code,bad", [
    ("utils.checkpoint", "def load(path):\n    from .defences import DEFENCES\n", [(2, "utils.defences")]),
    ("utils.checkpoint", "import utils.engine as engine", [(1, "utils.engine")]),
    ("utils.checkpoint", "from utils import attacks", [(1, "utils.attacks")]),
    ("utils.losses", "import reproduce", [(1, "reproduce")]),
    ("models.cnn", "from utils.checkpoint import WEIGHTS_FILE", [(1, "utils.checkpoint")]),
    ("utils.engine", "from reporting.names import label", [(1, "reporting.names")]),
])
def test_a_planted_upward_import_is_caught(module, code, bad):
    assert upward_imports(code, module) == bad


@pytest.mark.parametrize("module,code", [
    ("utils.errors", "def main():\n    from . import lock\n"),  # the same layer
    ("utils.checkpoint", "import models\nfrom .foreign import fit_state_dict\nfrom .constants import DATASETS"),
    ("utils.defences", "from .checkpoint import rebuild_model"),
    ("models.cnn", "from .resnet_cifar import init_weights"),
    ("utils.data", "from torchvision.datasets.utils import download_and_extract_archive\nimport torch.nn as nn"),
    ("reproduce", "from utils.attacks import ATTACKS"),
])
def test_imports_of_the_same_or_a_lower_layer_pass(module, code):
    assert upward_imports(code, module) == []
