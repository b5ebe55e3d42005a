"""Projected device time of a preset, from epoch times measured on the device (bench/cuda_check.py writes them),
or from the finished runs of a folder (what is left of a grid, at the pace its landed runs kept).

    python reproduce.py --preset paper --dry_run --cost bench/cuda_check_out/epoch_times.json
    python reproduce.py --preset mini --threat p2 --dry_run --cost exps/threat_p2

A folder's epoch times (epoch_times_from_runs, read by reproduction.state.epoch_times_of) are, per script/model, the
median of train_time_s / epochs over its finished lone runs (a battery's students share one clock, a sweep's runs sit
a level down: both left out), with the batch size and the thief's image count they ran at: a step with another count
gets no estimate. They hold for the machine those runs ran on, one run per slot (a CPU thread or a GPU, as they ran):
with --jobs N, divide the total by N.

The epoch times file maps "script/model" to the seconds one epoch of that script takes with the preset's
settings, either as a number or as {"seconds_per_epoch": s, ...}; an entry may also record the batch_size
it was measured at (a step with another batch size gets no estimate) and, for train_dfad.py, the k and
iters_per_epoch it was measured at (another k gets no estimate; a DFAD epoch is iters_per_epoch x (k student
steps + one generator step), so another iters_per_epoch is scaled).

A step costs runs x epochs x seconds per epoch, where a tau sweep makes one run per tau. A step whose
script and model have no measured time is listed as such and left out of the total: no guesses. Time a run
spends outside its epochs (start-up, the teacher's evaluation, the final predictions) is not counted.
"""
import json
import math
import os

from .errors import UserError


def _entry(key, value, path):
    """One epoch-time entry as a dict with a positive seconds_per_epoch."""
    entry = value if isinstance(value, dict) else {"seconds_per_epoch": value}
    seconds = entry.get("seconds_per_epoch")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) \
            or seconds <= 0:
        raise UserError(f"{path}: '{key}' needs a positive number of seconds per epoch, got {json.dumps(seconds)}")
    if "/" not in key:
        raise UserError(f"{path}: key '{key}' must read script/model, e.g. train_scratch.py/resnet18")
    return entry


def load_epoch_times(path):
    """The {"script/model": entry} of an epoch times file, checked; any problem is one UserError (a folder of
    finished runs: reproduction.state.epoch_times_of reads their metrics for epoch_times_from_runs)."""
    if not os.path.isfile(path):
        raise UserError(f"epoch times file {path} not found; bench/cuda_check.py writes one "
                        f"(OUT/epoch_times.json)")
    try:
        with open(path) as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
    return check_epoch_times(data.get("epoch_times") if isinstance(data, dict) else None, path)


def check_epoch_times(times, source):
    """The {"script/model": entry} of an epoch_times object, every entry a dict with positive seconds."""
    if not isinstance(times, dict):
        raise UserError(f"{source} holds no 'epoch_times' object of \"script/model\": seconds per epoch")
    return {key: _entry(key, value, source) for key, value in times.items()}


def epoch_times_from_runs(runs, folder):
    """{"script/model": {seconds_per_epoch, batch_size, subset, measured_runs}} from the metrics.json contents
    `runs` of the run folders directly under `folder`: the median of train_time_s / epochs per script/model over the
    finished lone runs, at the thief's image count most of them hold. A UserError when there is no such run."""
    groups = {}
    for m in runs:
        cfg = m.get("config") if isinstance(m.get("config"), dict) else {}
        if "battery" in m or cfg.get("tau_sweep") or not m.get("epochs") or not m.get("train_time_s") \
                or not m.get("script") or not m.get("model"):
            continue
        key = f"{m['script']}/{m['model']}"
        groups.setdefault(key, {}).setdefault((cfg.get("subset", 0), cfg.get("batch_size")), []).append(
            (m["train_time_s"] / m["epochs"], cfg))
    if not groups:
        raise UserError(f"{folder} holds no finished lone run (a run folder with metrics.json, not a battery's or a "
                        f"sweep's) to take epoch times from; give an epoch times file or another folder")
    times = {}
    for key, by_data in groups.items():
        (subset, batch), runs = max(by_data.items(), key=lambda kv: len(kv[1]))
        seconds = sorted(s for s, _ in runs)
        mid = len(seconds) // 2
        entry = {"seconds_per_epoch": seconds[mid] if len(seconds) % 2 else (seconds[mid - 1] + seconds[mid]) / 2,
                 "subset": subset, "measured_runs": len(runs)}
        if batch is not None:
            entry["batch_size"] = batch
        if key.startswith("train_dfad.py/"):
            entry.update({k: runs[0][1][k] for k in ("k", "iters_per_epoch") if k in runs[0][1]})
        times[key] = entry
    return check_epoch_times(times, folder)


def runs_of(params):
    """Training runs a step makes: one per distinct tau of a sweep, else one; none for a sweep that picks among
    another's runs (runs_from)."""
    if params.get("runs_from"):
        return 0
    return len({float(t) for t in params.get("tau_sweep") or []}) or 1


def _seconds_per_epoch(script, params, entry):
    """(seconds per epoch of this step, None) from its measured entry, or (None, why not)."""
    seconds = float(entry["seconds_per_epoch"])
    batch = entry.get("batch_size")
    if batch is not None and params.get("batch_size") is not None and batch != params["batch_size"]:
        return None, f"measured at batch {batch}, this step uses {params['batch_size']}"
    if "subset" in entry and entry["subset"] != params.get("subset", 0):
        images = lambda n: f"{n:,} images" if n else "all the training images"  # noqa: E731
        return None, f"measured on {images(entry['subset'])}, this step uses {images(params.get('subset', 0))}"
    if script == "train_dfad.py":
        if entry.get("k", params["k"]) != params["k"]:
            return None, f"measured with k {entry['k']}, this step uses {params['k']}"
        if "iters_per_epoch" in entry:  # an epoch is iters_per_epoch x (k student steps + a generator step)
            seconds *= params["iters_per_epoch"] / entry["iters_per_epoch"]
    return seconds, None


def project(steps, epoch_times):
    """(rows, total hours) of a preset's steps (reproduce.plan) against measured epoch times.

    A row: {step, script, model, runs, epochs, seconds_per_epoch, hours, note}; seconds_per_epoch and
    hours are None (note says why) for a step without a usable measured time, and such a step is left out
    of the total.
    """
    rows, total = [], 0.0
    for step in steps:
        params, script = step["params"], step["script"]
        key = f"{script}/{params['model']}"
        row = {"step": step["name"], "script": script, "model": params["model"], "runs": runs_of(params),
               "epochs": params["epochs"], "seconds_per_epoch": None, "hours": None, "note": ""}
        entry = epoch_times.get(key)
        if entry is None:
            row["note"] = f"no measured epoch time for {key}"
        else:
            row["seconds_per_epoch"], why = _seconds_per_epoch(script, params, entry)
            if why:
                row["note"] = why
            else:
                row["hours"] = row["runs"] * row["epochs"] * row["seconds_per_epoch"] / 3600
                total += row["hours"]
        rows.append(row)
    return rows, total


def projection_text(steps, epoch_times, source):
    """The projection as a markdown table and a total line."""
    rows, total = project(steps, epoch_times)
    measured = (f"the median over the finished lone runs of {source}, one run per slot as they ran there"
                if os.path.isdir(source) else f"as measured in {source}")
    lines = [f"Projected device time of the {len(rows)} steps not done (seconds per epoch: {measured}; time outside "
             f"the epochs is not counted; with --jobs N, about 1/N of the total in wall time):", "",
             "| step | script | model | runs x epochs | s/epoch | device-hours |",
             "|---|---|---|---|---:|---:|"]
    for r in rows:
        spe = f"{r['seconds_per_epoch']:.1f}" if r["seconds_per_epoch"] is not None else "-"
        hours = f"{r['hours']:.2f}" if r["hours"] is not None else f"not counted: {r['note']}"
        lines.append(f"| {r['step']} | {r['script']} | {r['model']} | {r['runs']} x {r['epochs']} | {spe} | {hours} |")
    missing = [r for r in rows if r["hours"] is None]
    lines += ["", f"Total: {total:.1f} device-hours for {len(rows) - len(missing)} of {len(rows)} steps."]
    if missing:
        keys = sorted({f"{r['script']}/{r['model']}" for r in missing})
        lines.append(f"{len(missing)} steps have no usable measured time and are not in the total "
                     f"({', '.join(keys)}); measure them with bench/cuda_check.py"
                     + (", or finish one such run in the folder." if os.path.isdir(source) else "."))
    return "\n".join(lines) + "\n"
