"""Write a preset folder's report: results.json, results.md and the figures, from its run folders alone."""
import json
import os

from utils.checkpoint import atomic_write_json, atomic_write_text, read_json
from utils.errors import UserError

from .collect import collect
from .figures import figures
from .names import kd_arms
from .tables import markdown


def build(exp_root, extra=None, strict=False):
    """Collect exp_root and write its results.json (without the per-epoch histories), results.md and figures;
    extra (what reproduce.py recorded of its run) joins what the folder's results.json already held. strict:
    refuse a folder with a row trained from other weights than its teacher's. Returns the collected dict."""
    res = collect(exp_root)
    bad = {n: p for n, p in res["provenance"].items() if p["status"] == "mismatch"}
    if strict and bad:
        name = next(iter(bad))
        raise UserError(f"{exp_root}: {len(bad)} row(s) were not trained from the teacher beside them, e.g. {name} "
                        f"({bad[name]['why']}); re-run reproduce.py on this folder, or drop --strict to mark them")
    old = read_json(os.path.join(exp_root, "results.json")) or {}
    extra = dict(old.get("extra", {}), **(extra or {}))
    slim = json.loads(json.dumps(res))
    for group in (slim["teachers"], slim["dfad"]):
        for t in group.values():
            t.pop("history", None)
    for s in slim["students"].values():
        for k in ("scratch", "ls"):
            s.get(k, {}).pop("history", None)
        for a in kd_arms(s):
            a.pop("history", None)
    slim["extra"] = extra
    atomic_write_json(os.path.join(exp_root, "results.json"), slim)
    atomic_write_text(os.path.join(exp_root, "results.md"), markdown(res, extra))
    figures(res, exp_root)
    return res
