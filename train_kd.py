"""Steal a frozen teacher into a student by knowledge distillation: vanilla KD and the adaptive attacks.

    python train_kd.py --save_path exps/mini/kd_cnn_original [--attack rereverse --tau 1 ...]
    python train_kd.py --save_path exps/mini/kd_cnn_rml_tau_sweep --tau_sweep 1,4,10,20

Attacks (utils/attacks.py, METHOD.md sections 4 and 7): vanilla (Hinton KD); rereverse (the teacher's
non-target logits are reversed again, around its own argmax or the label, before KD); dkd (decoupled KD,
non-target part weighted by dkd_beta); tckd (dkd with dkd_beta = 0: only the target-vs-rest binary part);
hardlabel (CE on the teacher's argmax alone); markov (Markov KD: per-class Markov matrices learnt jointly);
skeptical (the Skeptical student: the teacher distilled into an auxiliary head on an intermediate stage after
kd_delay epochs, the final head learning from labels and that head).
With tau_sweep the attack runs once per tau into SAVE_PATH/tau_<tau>/ and SAVE_PATH/sweep.json names the best;
alpha_sweep adds the KD weight (SAVE_PATH/tau_<tau>_alpha_<alpha>/). The best is picked on the test split (an
upper bound) unless val_split > 0: then val_split of the thief's own training images are held out (a draw fixed
by subset_seed, never trained on) and the thief picks there, as a real thief would, by top-1 or (select_by
val_nll) by cross-entropy; runs_from picks among another sweep's finished runs, training nothing. tau_from then
runs any attack at what such a sweep picked: the thief's own tau (and alpha), for the same images and teacher.
A finished run in SAVE_PATH/tau_<tau>/ made with the sweep's config is reused, a lone run trained there too
(a sweep split over processes).

    python train_kd.py --save_path exps/t/kd_vanilla_nasty_sweep --tau_sweep 1,4,10,20 --val_split 500
    python train_kd.py --save_path exps/t/kd_dkd_nasty --attack dkd --tau_from exps/t/kd_vanilla_nasty_sweep

    python train_kd.py --battery exps/mini/kd_vanilla_rml_cnn,exps/mini/kd_tckd_rml_cnn,...

trains several runs of one teacher (same data keys and seed) in one pass: one teacher forward per batch
serves every student, each still writing its own folder (utils/battery.py). reproduce.py does this by default.
"""
import os
import sys
from collections import Counter

import torch

import models
from utils.checkpoint import (atomic_write_json, file_sha256, finished_weights, freeze, git_commit, input_record)
from utils.config import (TRAIN_DEFAULTS, checkpoint_keys, close_match, parse_config, resolve_config, thief_has_labels,
                          write_config)
from utils.constants import DATASETS
from utils.engine import Engine, Member, Task, refuse_finished, train_together, tracked_by_git
from utils.errors import UserError, cli_main
from utils.attacks import ATTACKS, attack_keys
from utils import battery as bat
from utils.thief import (SELECT_BY, SINGLE_RUN_FILES, SWEEP_PROTOCOL, VAL_PROTOCOL, check_sweep_keys, load_teacher,
                         nll_from_weights, sweep_runs, tau_name, tuned, val_scores, val_sums)

DEFAULTS = dict(TRAIN_DEFAULTS, teacher="", **checkpoint_keys("teacher"), tau=4.0, attack="vanilla", **attack_keys(),
                tau_sweep=[], alpha_sweep=[], val_split=0, select_by="val_acc", runs_from="", tau_from="",
                teacher_cache="auto")
HELP_NOTES = {"teacher_cache": "keep the frozen teacher's answer for each augmented version of a training image "
                               "and answer repeats from it (auto: on a CPU, when the table fits in 1 GiB and it "
                               "saves at least a fifth of the teacher's forwards, as on a small thief set trained "
                               "long; on a GPU only with on)",
              "select_by": "how a sweep with val_split picks its run: val_acc (the highest top-1 on the held-out "
                           "images) or val_nll (the lowest cross-entropy there)",
              "runs_from": "the folder of a finished sweep with the same runs (select_by aside): this sweep picks "
                           "among them there and trains nothing"}



def check_kd_config(cfg, source):
    """The KD keys train_scratch's checks do not cover; raised before anything is written."""
    if cfg["attack"] not in ATTACKS:
        raise UserError(f"{source}: 'attack' must be one of {', '.join(ATTACKS)}, got '{cfg['attack']}'"
                        f"{close_match(str(cfg['attack']), ATTACKS)}")
    if not cfg["tau"] > 0:
        raise UserError(f"{source}: 'tau' must be > 0, got {cfg['tau']}")
    if cfg["teacher_cache"] not in bat.CACHE_MODES:
        raise UserError(f"{source}: 'teacher_cache' must be one of {', '.join(bat.CACHE_MODES)}, got "
                        f"'{cfg['teacher_cache']}'{close_match(str(cfg['teacher_cache']), bat.CACHE_MODES)}")
    for attack in ATTACKS.values():  # every key is checked, also those the chosen attack does not read
        attack.check(cfg, source)
    if cfg["label_smoothing"]:
        raise UserError(f"{source}: 'label_smoothing' is not used by train_kd.py; remove it (the label-smoothing "
                        f"student is trained by train_scratch.py)")
    check_sweep_keys(cfg, source)


class KDTask(Task):
    """Student trained on the thief's view of the teacher's logits for the same augmented batch; the
    teacher never changes. What is read and how it is distilled is the attack's (utils/attacks.py)."""

    def __init__(self, student, teacher, cfg, teacher_arch=None, teacher_acc=None, num_classes=None):
        self.model, self.teacher, self.cfg = student, teacher, cfg
        num_classes = num_classes or DATASETS[cfg["dataset"]].num_classes
        self.attack = ATTACKS[cfg["attack"]](cfg, num_classes)
        self.attack.attach(student)
        self.tau = cfg["tau"]
        self.labels = thief_has_labels(cfg)
        self.teacher_path, self.teacher_arch, self.teacher_acc = cfg["teacher"], teacher_arch, teacher_acc
        self.engine = None
        self._parts = None

    def setup(self, engine):
        self.engine = engine
        self.teacher = engine.prepare_frozen(self.teacher)

    def parts(self):
        if self._parts is None:
            self._parts = self.attack.parts()
        return self._parts

    @torch.no_grad()
    def teacher_logits(self, x, y):
        """(the thief's view of the teacher's answer for this batch (the attack's query), the target class).

        A thief without labels (labels false, or transfer data) never sees y: wherever an attack needs a target
        class (CE, DKD's target, Markov KD's matrix, re-reversal around the label) it gets the teacher's argmax."""
        answer = self.teacher(x)
        if not self.labels:
            y = answer.argmax(1)
        return self.attack.query(answer, y), y

    def loss(self, batch):
        x, y = batch
        view, y = self.teacher_logits(x, y)
        s = self.train_model(x)
        modules = {name: part.module for name, part in self.parts().items()}
        return self.attack.loss(s, view, y, self.engine.progress, modules), s, y

    @torch.no_grad()
    def val_scores(self):
        """{"val_acc": top-1 (%), "val_nll": mean cross-entropy} of the student on the thief's validation split,
        against the labels the thief holds (the teacher's argmax for a thief without labels); {} without one."""
        engine = self.engine
        loader = engine.loaders.get("val")
        if loader is None:
            return {}
        model = engine.model
        was = model.training
        model.eval()
        sums = val_sums(model, loader, self.teacher, self.labels, engine.autocast)
        model.train(was)
        return val_scores(engine.all_reduce(sums))

    def answer_cache(self):
        """The AnswerCache around the teacher (inside a battery's SharedForward), or None."""
        teacher = self.teacher.module if isinstance(self.teacher, bat.SharedForward) else self.teacher
        return teacher if isinstance(teacher, bat.AnswerCache) else None

    def metrics(self):
        m = {"attack": self.attack.name, "tau": self.tau, "teacher": self.teacher_path,
             "teacher_arch": self.teacher_arch, "teacher_acc": self.teacher_acc}
        m.update(self.attack.metrics())
        cache = self.answer_cache()
        if cache is not None:
            m["teacher_answers"] = cache.record()
        m.update(self.val_scores())
        return m


def prepare(cfg, save_path, resume=False, shared=None, overwrite=False, tuned_by=None):
    """(engine, task) of one attack run into save_path, ready for engine.fit or a battery.

    shared: the battery's {"teacher": SharedForward, "teacher_acc", "loaders"} once its first student is
    prepared. The teacher checkpoint is still read here for every student: its digest goes into the run's
    inputs, and building it draws from the RNG before the student is built, as in a lone run, so the
    student starts from the same weights either way. tuned_by: the record of the sweep whose pick this run's tau
    is (tuned), kept in metrics.json as `tau_from`.
    """
    engine = Engine(cfg, save_path, "train_kd.py", resume=resume, overwrite=overwrite)
    if tuned_by is not None:
        engine.notes["tau_from"] = tuned_by
    teacher, ckpt = load_teacher(cfg)
    engine.add_input("teacher", cfg["teacher"], ckpt)
    if shared:
        teacher, engine.loaders = shared["teacher"], shared["loaders"]
    else:
        teacher = engine.prepare_frozen(teacher)
        engine.load_data()
        teacher = bat.answer_cache(teacher, cfg, engine.loaders["train"], engine.info.num_classes)
    if engine.is_main:
        write_config(save_path, cfg, ATTACKS[cfg["attack"]].as_used(cfg))
    student = models.build(cfg["model"], engine.info.num_classes)
    if shared:
        teacher_acc = shared["teacher_acc"]
    else:
        teacher_acc, _ = engine.evaluate(teacher, diagnostics=False)
    picked = "" if tuned_by is None else f" (picked on {tuned_by['val_images']} held-out images by {tuned_by['path']})"
    engine.log(f"teacher {cfg['teacher']} ({ckpt['arch']}): test acc {teacher_acc:.2f}; attack {cfg['attack']}, "
               f"tau {cfg['tau']:g}{picked}")
    if isinstance(teacher, bat.AnswerCache):  # a battery's later students hold its SharedForward
        loader = engine.loaders["train"]
        engine.log(f"teacher_cache: the teacher's answers to the {teacher.size:,} versions of the "
                   f"{len(loader.labels):,} training images are kept (expected to save "
                   f"{bat.expected_saved(cfg['epochs'], loader.variants):.0%} of its forwards)")
    return engine, KDTask(student, teacher, cfg, ckpt["arch"], teacher_acc)


def train(cfg, save_path, resume=False, overwrite=False, tuned_by=None):
    """One attack run into save_path; returns its metrics."""
    engine, task = prepare(cfg, save_path, resume, overwrite=overwrite, tuned_by=tuned_by)
    return engine.fit(task)


def battery(folders, args):
    """Train the attack runs of `folders` (each with its params.json) against their one teacher in one pass
    (utils/battery.py, in the engine's loop); command-line keys override every folder's params. Returns their
    metrics. One folder is a battery of one: it trains as its lone run would."""
    cfgs, records = [], []
    for folder in folders:
        args.save_path = folder
        cfg = resolve_config(args, DEFAULTS, checks=[check_kd_config])
        cfg["teacher"] = finished_weights(cfg["teacher"], "teacher")
        if cfg["tau_sweep"] or cfg["alpha_sweep"]:
            raise UserError(f"{folder}/params.json: a tau_sweep or alpha_sweep run is not trained in a battery; run "
                            f"it alone (--save_path {folder})")
        cfg, record = tuned(cfg, f"{folder}/params.json")
        records.append(record)
        if cfgs and cfg["val_split"] != cfgs[0]["val_split"]:
            raise UserError(f"--battery: {folder} has val_split={cfg['val_split']!r}, {folders[0]} has "
                            f"val_split={cfgs[0]['val_split']!r}; the students of a battery must share val_split "
                            f"(they share batches and teacher); run them in separate batteries or alone")
        cfgs.append(cfg)
    bat.check_members(cfgs, folders)
    for folder in folders:  # every resume (and every finished run) is checked before anything is written
        if args.resume and not os.path.isfile(os.path.join(folder, "last.pth")):
            raise UserError(f"cannot resume: {folder}/last.pth not found; run the battery without --resume")
        if not args.resume and not args.overwrite:
            refuse_finished(folder, "train_kd.py")
    how = f"python train_kd.py --battery {','.join(folders)} --resume"
    runs = [(cfg, folder, args.resume, args.overwrite, record) for cfg, folder, record in zip(cfgs, folders, records)]
    return train_shared(runs, how)


def train_shared(runs, how):
    """Train runs [(cfg, folder, resume, overwrite, tuned_by)] of one teacher, with the same batches, in one pass:
    one teacher forward per batch serves every run (utils/battery.py). Runs at different resume positions join
    the loop at their own. Returns their metrics, in the order of `runs`; each run's metrics.json names the battery."""
    folders = [folder for _, folder, *_ in runs]
    members, shared = [], None
    for cfg, folder, resume, overwrite, record in runs:
        engine, task = prepare(cfg, folder, resume, shared, overwrite=overwrite, tuned_by=record)
        if shared is None:
            shared = {"teacher": bat.SharedForward(task.teacher), "teacher_acc": task.teacher_acc,
                      "loaders": engine.loaders}
            task.teacher = shared["teacher"]
        engine.notes["battery"] = list(folders)
        members.append(Member(engine, task, engine.begin(task)))
    if not members:  # a sweep whose every run is done
        return []
    starts = Counter(m.start[:2] for m in members)
    if len(starts) > 1:
        members[0].engine.log("battery: its students resume at " + ", ".join(
            f"epoch {e} step {s} ({n})" for (e, s), n in sorted(starts.items()))
            + "; each joins the others when the loop reaches its start")
    return train_together(members, how)


def sweep(cfg, save_path, resume=False, overwrite=False):
    """Run the attack once per tau (and alpha: alpha_sweep) in-process, one engine each, trained together as a
    battery of one teacher (each run ends where its lone run ends), and record the best in sweep.json: picked on
    the thief's validation split when val_split > 0, else on the test split (an upper bound).

    The folder holds the sweep alone: the files of a single run there (a folder used before without
    tau_sweep) are refused, or removed with overwrite. With overwrite every run is trained again; with runs_from
    the runs are that sweep's, none is trained, and sweep.json names them by their path from this folder."""
    from utils.lock import acquire
    single = [n for n in SINGLE_RUN_FILES if os.path.isfile(os.path.join(save_path, n))]
    if single and not overwrite:
        raise UserError(f"{save_path} holds a single run ({', '.join(single)}), not a sweep; add --overwrite to "
                        f"remove it and run the sweep there, or give the sweep a folder of its own")
    teacher_model, ckpt = load_teacher(cfg)  # a bad teacher stops the sweep before any folder is made
    teacher = input_record(cfg["teacher"], ckpt)
    # a finished run of this config is reused; --overwrite trains this folder's runs again (never runs_from's)
    plan = sweep_runs(cfg, save_path, teacher, overwrite)
    # finished runs that predate val_nll are scored from their weights, before anything is trained or written
    older = {p[2]: p[4] for p in plan if cfg["select_by"] == "val_nll" and p[4] and "val_nll" not in p[4]}
    if older:
        for sub, nll in nll_from_weights(cfg, older, freeze(teacher_model)).items():
            older[sub]["val_nll"] = nll
    scored_after = [p[0] for p in plan if p[2] in older]
    is_main = int(os.environ.get("RANK", 0)) == 0
    if is_main:
        acquire(save_path)
        if single:
            tracked = tracked_by_git(save_path, single)
            for n in single:
                os.unlink(os.path.join(save_path, n))
            print(f"--overwrite: removed the single run's {', '.join(single)} from {save_path}, which now holds the "
                  f"sweep alone" + (f" ({', '.join(tracked)} tracked by git: git checkout -- {save_path} brings "
                                    f"them back)" if tracked else ""), flush=True)
        write_config(save_path, cfg)
        summary_path = os.path.join(save_path, "sweep.json")
        if os.path.isfile(summary_path) and any(p[4] is None for p in plan):
            os.remove(summary_path)  # stale until every run is done: a half-run sweep must not look finished
    results, todo = {}, []
    for name, what, sub, sub_cfg, done, stale in plan:
        if done is None:
            if is_main:
                if stale:
                    print(f"{what}: {stale}; running it again", flush=True)
                os.makedirs(sub, exist_ok=True)
                atomic_write_json(os.path.join(sub, "params.json"),
                                  dict(sub_cfg, _comment=f"{what} of the sweep in {save_path}", _script="train_kd.py"))
            sub_resume = resume and os.path.isfile(os.path.join(sub, "last.pth"))
            todo.append((name, (sub_cfg, sub, sub_resume, not sub_resume, None)))
        else:
            if is_main:
                print(f"{what}: {sub}/metrics.json exists, skipped", flush=True)
            results[name] = done
    # The runs left train together, one teacher forward per batch for all of them (they differ in tau/alpha
    # alone, so they see the same batches): a sweep of four costs about what a battery of four students does,
    # not four lone runs. Under torchrun (a battery is one process) they train one after another.
    runs = [run for _, run in todo]
    if bat.one_process():
        trained = train_shared(runs, f"python train_kd.py --save_path {save_path} --resume")
    else:
        trained = [train(sub_cfg, sub, resume=sub_resume, overwrite=over) for sub_cfg, sub, sub_resume, over, _ in runs]
    results.update(zip([name for name, _ in todo], trained))
    results = {name: results[name] for name, *_ in plan}  # the sweep's order: a tie goes to the first
    on_val = cfg["val_split"] > 0
    score = cfg["select_by"] if on_val else "final_acc"
    best = SELECT_BY.get(score, max)(results, key=lambda n: results[n][score])  # a tie: the first, in sweep order
    best_cfg = next(p[3] for p in plan if p[0] == best)
    summary = {
        "final_acc": {n: m["final_acc"] for n, m in results.items()},
        "best_acc_per_tau": {n: m["best_acc"] for n, m in results.items()},
        "runs": {n: os.path.relpath(sub, save_path) for n, _, sub, *_ in plan},
        "best_tau": best_cfg["tau"], "best_acc": results[best]["final_acc"],
        "attack": cfg["attack"], "model": cfg["model"], "teacher": cfg["teacher"],
        "teacher_acc": results[best].get("teacher_acc"), "protocol": VAL_PROTOCOL if on_val else SWEEP_PROTOCOL,
        "inputs": {"teacher": teacher}, "config": cfg, "git_commit": git_commit(),
    }
    if cfg["runs_from"]:  # the runs it picked among, as they were: a later change to them makes this pick stale
        summary["inputs"]["runs"] = {n: file_sha256(os.path.join(sub, "metrics.json")) for n, _, sub, *_ in plan}
    if cfg["alpha_sweep"]:
        summary.update(best_alpha=best_cfg["alpha"], best_run=best)
    if on_val:
        summary.update(selected_on="val", selected_by=score, val_acc={n: m["val_acc"] for n, m in results.items()},
                       val_images=results[best].get("thief", {}).get("val_images"))
        if all("val_nll" in m for m in results.values()):
            summary["val_nll"] = {n: m["val_nll"] for n, m in results.items()}
            if score == "val_nll" and scored_after:
                summary["val_nll_from_weights"] = scored_after  # their metrics.json predate val_nll
    if is_main:
        atomic_write_json(os.path.join(save_path, "sweep.json"), summary)
        label = "tau/alpha" if cfg["alpha_sweep"] else "tau"
        width = 10 if cfg["alpha_sweep"] else 8
        nll = "val_nll" in summary
        print(f"\n{label:>{width}}  final_acc" + ("    val_acc" if on_val else "") + ("    val_nll" if nll else ""))
        for n, m in results.items():
            val = (f"  {m['val_acc']:9.2f}" if on_val else "") + (f"  {m['val_nll']:9.4f}" if nll else "")
            print(f"{n:>{width}}  {m['final_acc']:9.2f}{val}{'  <- best' if n == best else ''}")
        alpha = f", alpha {best_cfg['alpha']:g}" if cfg["alpha_sweep"] else ""
        where = f" (on the validation split, by {score})" if on_val else ""
        print(f"best tau {tau_name(best_cfg['tau'])}{alpha}{where}" +
              f": final test acc {summary['best_acc']:.2f} ({cfg['attack']} KD of {cfg['model']} from "
              f"{cfg['teacher']}); {os.path.join(save_path, 'sweep.json')}", flush=True)
    return summary


def _battery_arg(parser):
    parser.add_argument("--battery", metavar="DIR,DIR,...", default=None,
                        help="train these run folders (each with its params.json) against their one teacher in one "
                             "pass over the data: one teacher forward per batch serves every student")


def parse_args(argv=None):
    """The command line of train_kd.py: (args namespace, parser), as utils/config.py parse_config gives them."""
    return parse_config(__doc__.splitlines()[0], DEFAULTS, argv, extra_args=_battery_arg,
                        choices={"attack": tuple(ATTACKS), "rereverse_target": ATTACKS["rereverse"].TARGETS,
                                 "select_by": tuple(SELECT_BY),
                                 "teacher_cache": bat.CACHE_MODES},
                        script="train_kd.py", notes=HELP_NOTES)


@cli_main
def main(argv=None):
    args, _ = parse_args(argv)
    if args.battery:
        if args.save_path:
            raise UserError("give either --save_path (one run) or --battery (several), not both")
        folders = [f for f in args.battery.split(",") if f]
        if len(folders) < 2:
            raise UserError(f"--battery needs at least two run folders, comma-separated; got '{args.battery}' "
                            f"(one run: --save_path)")
        battery(folders, args)
        return 0
    cfg = resolve_config(args, DEFAULTS, checks=[check_kd_config])
    cfg["teacher"] = finished_weights(cfg["teacher"], "teacher")
    if cfg["tau_sweep"] or cfg["alpha_sweep"]:
        sweep(cfg, args.save_path, args.resume, args.overwrite)
    else:
        cfg, record = tuned(cfg, os.path.join(args.save_path, "params.json"))
        train(cfg, args.save_path, args.resume, args.overwrite, tuned_by=record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
