"""Bring a teacher into an experiment folder: load a checkpoint (this project's or another codebase's), score it.

    python import_teacher.py --save_path exps/judge_mine/yours --source my_teacher.pth --teacher_arch resnet32x4
    python import_teacher.py --save_path exps/judge_mine/yours --source my.pth --original exps/judge_mine/original

Trains nothing. The file is loaded as a teacher (utils/foreign.py: RepDistiller/mdistiller, Nasty-Teacher,
pytorch-cifar, a plain state dict, a `module.` prefix; teacher_arch, teacher_mean and teacher_std say what the
file does not; a checkpoint of a run that did not finish is refused unless allow_unfinished_teacher), scored on
the test split and written back as a finished teacher run leaves it: weights.pth (this project's format, the
weights' digest recorded) and metrics.json (accuracy, calibration, the class response at tau; with an
original, the distance from it and the reversal of its non-target order, as train_possessive.py records).
judge.py runs it for the teacher a user brings; students then load SAVE_PATH/weights.pth.
"""
import hashlib
import os
import sys

import torch

from utils.checkpoint import finished_weights, model_record
from utils.config import TRAIN_DEFAULTS, checkpoint_keys, checkpoint_options, parse_config, resolve_config, write_config
from utils.constants import DATASETS
from utils.defences import build_from_checkpoint
from utils.diagnostics import class_response, compare_to_original, expected_calibration_error
from utils.engine import Engine, Task
from utils.errors import UserError, cli_main

DEFAULTS = dict(
    TRAIN_DEFAULTS,
    source="",              # the teacher's checkpoint file (or a finished run folder of this project)
    source_sha256="",       # the file's sha256, when known: a different file at that path is refused
    **checkpoint_keys("teacher"),
    original="",            # optional: the undefended original, a checkpoint of this project (import it first)
    tau=4.0,                # temperature of the recorded class response and of the distance from the original
)


def file_sha256(path):
    """sha256 of a file's bytes: which file a user brought, whatever its format."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ImportTask(Task):
    """Scores a frozen teacher (and how far it answers from its original, when one is given)."""

    def __init__(self, model, original, cfg):
        self.model, self.original, self.cfg = model, original, cfg
        self.engine = None
        self.record = {}

    def setup(self, engine):
        if self.engine is engine:
            return
        self.engine = engine
        if self.original is not None:
            self.original = engine.prepare_frozen(self.original)

    @torch.no_grad()
    def eval_batch(self, x, logits, y):
        if self.original is None:
            return {}
        with self.engine.autocast():
            original_logits = self.original(x)
        return compare_to_original(logits, original_logits.float(), y, self.cfg["tau"])

    def metrics(self):
        tau = self.cfg["tau"]
        logits, labels = self.engine.final_logits, self.engine.final_labels
        out = dict(self.record, response_tau=tau, final_ece=float(expected_calibration_error(logits, labels)),
                   class_response=class_response(logits, labels, tau).tolist())
        if self.original is not None:
            original_logits, _ = self.engine.predict(self.original)
            out.update(original=self.cfg["original"], original_acc=self.original_acc,
                       original_ece=float(expected_calibration_error(original_logits, labels)),
                       original_class_response=class_response(original_logits, labels, tau).tolist())
        return out


def load_teacher(path, what, dataset, **options):
    """A brought file as it will be scored, checked before anything is written: (the file, model, checkpoint).
    A run folder means its finished weights; a keyed teacher is refused (its key stays in its own folder)."""
    path = finished_weights(path, what)
    model, ckpt = build_from_checkpoint(path, what, dataset=dataset, num_classes=DATASETS[dataset].num_classes,
                                        **options)
    spec = ckpt.get("defence") or {}
    if spec.get("key_sha256"):
        raise UserError(f"{what} {path} is keyed ({spec.get('name')}): its key stays in its own folder; attack it "
                        f"there (train_kd.py --teacher {path}) or bring the plain original")
    return path, model, ckpt


def check(cfg, source="config"):
    if not cfg["source"]:
        raise UserError(f"{source}: 'source' is required: the teacher's checkpoint file (--source FILE)")
    if not cfg["tau"] > 0:
        raise UserError(f"{source}: 'tau' must be > 0, got {cfg['tau']}")


@cli_main
def main(argv=None):
    args, _ = parse_config(__doc__.splitlines()[0], DEFAULTS, argv, script="import_teacher.py")
    cfg = resolve_config(args, DEFAULTS, checks=[check])
    cfg["source"] = finished_weights(cfg["source"], "teacher")
    if not os.path.isfile(cfg["source"]):
        raise UserError(f"source {cfg['source']} not found; give the teacher's checkpoint file")
    digest = file_sha256(cfg["source"])
    if cfg["source_sha256"] and cfg["source_sha256"] != digest:
        raise UserError(f"source {cfg['source']} has sha256 {digest[:12]}, source_sha256 says "
                        f"{cfg['source_sha256'][:12]}: the file changed; import it again without source_sha256")
    # everything about the files is checked before the engine touches the folder
    _, teacher, ckpt = load_teacher(cfg["source"], "teacher", cfg["dataset"], **checkpoint_options(cfg, "teacher"))
    spec = ckpt.get("defence")
    original, original_ckpt = None, None
    if cfg["original"]:
        cfg["original"], original, original_ckpt = load_teacher(cfg["original"], "original", cfg["dataset"])
    cfg["model"] = ckpt["arch"]  # what is scored is the file's architecture, whatever the defaults say
    engine = Engine(cfg, args.save_path, "import_teacher.py", resume=False, overwrite=args.overwrite)
    engine.add_input("teacher", cfg["source"], ckpt)
    if original_ckpt is not None:
        engine.add_input("original", cfg["original"], original_ckpt)
    engine.load_data(train=False)
    if engine.is_main:
        write_config(args.save_path, cfg)
    task = ImportTask(teacher, original, cfg)
    task.record = {"imported": {"source": cfg["source"], "source_sha256": digest,
                                "source_format": ckpt.get("source_format", "this project's checkpoint")}}
    task.setup(engine)
    if original is not None:
        task.original_acc, _ = engine.evaluate(task.original, diagnostics=False)
        engine.log(f"original {original_ckpt['arch']} from {cfg['original']}: test acc {task.original_acc:.2f}")
    record = model_record(ckpt["model"], ckpt["arch"], cfg["dataset"])
    record.update({k: list(ckpt[k]) for k in ("mean", "std") if ckpt.get(k)})  # the file's own normalisation
    if spec:
        record["defence"] = dict(spec)
    engine.publish(task, teacher, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
