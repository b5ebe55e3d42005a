"""Running a plan: the steps to bring up to date, one after another in this process or several at once as
processes (each with its share of the cores or its own GPU), KD students of one teacher merged into batteries."""
import importlib
import json
import os
import subprocess
import sys
import time

from utils.checkpoint import WEIGHTS_FILE, atomic_write_json
from utils.engine import catch_stop_signals
from utils.errors import UserError

from .plan import dependencies, dependency_keys, describe, resolve_paths, waits_on
from .state import finished_record, step_state, weights_digest, write_params

# The repository root: where the scripts a step runs live.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_step(script, argv):
    """Run a script's main() in this process (one torch import for the whole chain); return its exit code."""
    module = importlib.import_module(script[:-3])
    try:
        return module.main(argv) or 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1



def job_env(slot, jobs, share=None):
    """Environment of the process in job slot `slot` of `jobs`: its share of the CPU cores, its own GPU.

    share: how many steps the cores are split between (default jobs); a step that starts while fewer steps
    can run (the original teacher, which every other step waits for) gets the cores of the idle slots too.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not os.environ.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // (share or jobs)))
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):
        import torch
        gpus = torch.cuda.device_count()
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    return env


def job_names(job):
    """The steps a job trains: one, or every student of a battery."""
    return [s["name"] for s in job.get("steps", [job["step"]])]


def batteries(todo):
    """Merge the KD jobs that can share their teacher's forward (utils/battery.py: same teacher, seed and data
    keys, all new or all resuming, no tau sweep) into one `train_kd.py --battery` job each; the rest as they are."""
    from utils.battery import SHARED_KEYS
    out, groups = [], {}
    for job in todo:
        step = job["step"]
        if step["script"] != "train_kd.py" or step["params"].get("tau_sweep"):
            out.append(job)
            continue
        key = (job["verb"],) + tuple(json.dumps(step["params"].get(k), sort_keys=True) for k in SHARED_KEYS)
        if key not in groups:
            groups[key] = []
            out.append(groups[key])
        groups[key].append(job)
    merged = []
    for item in out:
        if isinstance(item, dict):
            merged.append(item)
        elif len(item) == 1:
            merged.append(item[0])
        else:
            first = item[0]
            folders = [j["folder"] for j in item]
            argv = ["--battery", ",".join(folders)] + first["argv"][2:]  # first argv: --save_path FOLDER ...
            heads = ", ".join(j["head"].split("]")[0] + "]" for j in item)
            merged.append(dict(first, steps=[j["step"] for j in item], argv=argv, folders=folders,
                               head=f"{heads} train_kd.py battery of {len(item)} ({', '.join(folders)})"))
    return merged


def run_parallel(todo, jobs, t0):
    """Run the steps in `todo` with up to `jobs` processes at once, each step once its teachers are done.

    A failed step stops new steps from starting; the running ones finish (their work is kept) and the
    error names the failed steps and their logs. SIGTERM/SIGINT are passed on to the running steps,
    which save a checkpoint and stop, so the same command resumes them.
    """
    pending = list(todo)
    pending_names = {n for j in todo for n in job_names(j)}
    running = {}  # slot -> (job, Popen, log file, start time)
    failed = []
    stopping = []

    def forward(signum, frame):
        stopping.append(signum)
        for _, proc, _, _ in running.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    restore = catch_stop_signals(forward)
    try:
        while pending or running:
            for slot in [s for s in range(jobs) if s not in running]:
                if failed or stopping:
                    break
                ready = [j for j in pending if not waits_on(j["step"]) & pending_names]
                if not ready:
                    break
                job = ready[0]
                pending.remove(job)
                env = job_env(slot, jobs, min(jobs, len(running) + len(ready)))
                log = open(os.path.join(job["folder"], "run.log"), "a")
                for other in job.get("folders", [])[1:]:  # a battery's output is in its first student's folder
                    with open(os.path.join(other, "run.log"), "a") as f:
                        f.write(f"trained in a battery with {', '.join(job['folders'])}; its output: {log.name}\n")
                proc = subprocess.Popen([sys.executable, job["step"]["script"]] + job["argv"],
                                        stdout=log, stderr=subprocess.STDOUT, env=env,
                                        cwd=ROOT)
                running[slot] = (job, proc, log, time.time())
                threads = env.get("OMP_NUM_THREADS", "?")
                print(f"{job['head']}: {job['verb']} in slot {slot}, {threads} thread(s) "
                      f"({(time.time() - t0) / 60:.1f} min so far; log in {log.name})", flush=True)
            if not running:
                break
            time.sleep(0.5)
            for slot, (job, proc, log, start) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                log.close()
                del running[slot]
                name = " + ".join(job_names(job))
                if code == 0:
                    pending_names.difference_update(job_names(job))
                    print(f"{job['head']}: finished in {(time.time() - start) / 60:.1f} min", flush=True)
                else:
                    failed.append((name, code, log.name))
                    print(f"{job['head']}: FAILED (exit {code}); last lines of {log.name}:\n{tail(log.name)}",
                          flush=True)
    finally:
        restore()
    if stopping:
        raise UserError("stopped by a signal; re-run the same command: finished steps are skipped and "
                        "interrupted ones resume")
    if failed:
        names = ", ".join(f"{n} (exit {c}, see {path})" for n, c, path in failed)
        raise UserError(f"step(s) failed: {names}; fix the cause and re-run the same command: finished steps "
                        f"are skipped and interrupted ones resume")
    if pending:
        raise UserError("steps left that wait on a teacher that never finished: "
                        + ", ".join(n for j in pending for n in job_names(j)))


def tail(path, lines=5):
    """The last non-empty lines of a log (progress bars' carriage returns count as line ends)."""
    with open(path, errors="replace") as f:
        text = f.read().replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def run_plan(steps, selected, exp_root, teachers_root, manifest, data_root, device="auto", jobs=1, dry_run=False,
             battery=True):
    """Bring the `selected` steps of a plan up to date: a finished step is skipped, an interrupted one resumes,
    a stale or new one is trained from the start. Students go to exp_root, teachers to teachers_root;
    manifest (steps.json without its steps: preset, threat model, where the teachers are) is written there
    with every step of the plan, so the report reads it. dry_run: print each step's state, change nothing, and
    return the selected steps that are not done. Returns the jobs that ran (a battery counts once)."""
    t0 = time.time()
    if not dry_run:  # a dry run changes nothing, not even the plan the report reads
        os.makedirs(exp_root, exist_ok=True)
        from utils.lock import acquire
        acquire(exp_root, "experiment root")  # its steps lock their own folders, below it
        manifest = dict(manifest, steps=[{k: s[k] for k in ("name", "script", "role")} for s in steps])
        atomic_write_json(os.path.join(exp_root, "steps.json"), manifest)
    todo, left = [], []
    counts = {}
    loaded = {d for s in steps for d in dependencies(s)}  # steps whose weights later steps load
    digests = {}  # teacher step -> digest of the weights its dependents will load (None: trained in this run)
    training = set()  # the steps this run trains (or picks again)
    for step in steps:
        name = step["name"]
        folder = os.path.normpath(os.path.join(teachers_root if step["role"]["kind"] == "teacher" else exp_root, name))
        params = resolve_paths(step, teachers_root, exp_root)
        deps = {key: (dep, digests.get(dep)) for key, dep in dependency_keys(step).items()}
        state, reason = step_state(folder, params, deps, weights_needed=name in loaded)
        picks_from = step["params"].get("runs_from")
        if state == "done" and picks_from in training:  # the runs it picked among are trained again first
            state, reason = "stale", f"the runs of {picks_from}, which it picks among, are to be trained again"
        chosen = step in selected
        if chosen and state != "done":
            training.add(name)
        if name in loaded:
            if state == "done":
                digests[name] = finished_record(folder, params)["weights_sha256"]
            elif not chosen:  # not run now: its dependents load whatever file is there
                digests[name] = weights_digest(os.path.join(folder, WEIGHTS_FILE))
            else:
                digests[name] = None
        if not chosen:
            continue
        counts[state] = counts.get(state, 0) + 1
        head = f"[{selected.index(step) + 1}/{len(selected)}] {step['script']} {folder}"
        why = f" ({reason})" if reason else ""
        if dry_run:
            print(f"{head}: {state}{why}")
            if state != "done":
                left.append(step)
            continue
        if state == "done":
            print(f"{head}: done, skipped", flush=True)
            continue
        if state == "stale":
            print(f"{head}: stale{why}; training it again", flush=True)
        elif reason:
            print(f"{head}: {state}{why}", flush=True)
        write_params(folder, params, step.get("comment") or describe(step, manifest["preset"]), step["script"])
        argv = ["--save_path", folder, "--data_root", data_root, "--device", device]
        # a stale or new step is trained from the start: a finished run there (older config or teachers) is
        # replaced knowingly, so the scripts' refusal of a finished folder does not stop the chain
        argv.append("--resume" if state == "resume" else "--overwrite")
        todo.append({"step": step, "head": head, "argv": argv, "folder": folder,
                     "verb": "resuming" if state == "resume" else "running"})
    print(f"{len(selected)} steps: " + ", ".join(f"{counts[k]} {k}" for k in ("done", "stale", "resume", "new")
                                                 if counts.get(k)), flush=True)
    if dry_run:
        return left
    if battery:
        todo = batteries(todo)
    if jobs == 1:
        for job in todo:
            print(f"{job['head']}: {job['verb']} ({(time.time() - t0) / 60:.1f} min so far)", flush=True)
            code = run_step(job["step"]["script"], job["argv"])
            if code != 0:
                raise UserError(f"step {' + '.join(job_names(job))} failed (exit {code}); fix the cause and "
                                f"re-run the same command: finished steps are skipped and this one resumes")
    elif todo:
        run_parallel(todo, jobs, t0)
    return todo
