"""Make an anti-distillation teacher from a frozen original: any defence of utils/defences.py (method).

    python train_possessive.py --save_path exps/mini/rml_resnet20 [--method nasty --omega 0.04 ...]

Trained defences fine-tune (or train) a teacher against the original:
RML (docs/METHOD.md section 2):
    CE + alpha tau^2 KL(b(z_o)||b(z_p)) + beta tau^2 KL(q(reverse(z_o))||q(z_p)) - gamma tau^2 KL(q(z_o)||q(z_p))
Nasty (section 3): CE - omega tau^2 KL(softmax(z_n/tau) || softmax(z_o/tau)).
Training-free defences (stingy, posthoc; section 7) train nothing: the run scores the original answering
through the defence and writes weights.pth as the original's weights plus the defence's name and settings.
"""
import os
import sys

import torch

import models
from utils.checkpoint import finished_weights, model_record
from utils.config import (TRAIN_DEFAULTS, checkpoint_keys, checkpoint_options, close_match, parse_config,
                          require_labels, resolve_config, write_config)
from utils.diagnostics import class_response, compare_to_original, expected_calibration_error
from utils.engine import Engine, Task
from utils.errors import UserError, cli_main
from utils.defences import (DEFENCES, REVERSE_SCOPES, DefendedModel, build_from_checkpoint, defence_keys,
                            key_fingerprint, secret_key)

# RML: alpha (binary term), beta (reversed non-target term), gamma (Nasty-style maximisation over non-targets),
# beta_warmup (epochs of linear ramp), reverse_scope; Nasty: omega; Stingy: stingy_ratio (utils/defences.py).
# The defaults are the recommended settings: those of the mini preset's RML teacher (reproduce.py PRESETS,
# chosen by the sweep in exps/mini/rml_sweep): 3 epochs fine-tuning the original at lr 0.01 with beta 0.3.
# Trained from scratch for 12 epochs with beta 1, RML cost the teacher 4.7 points (README).
RECOMMENDED = {"init_from_original": True, "epochs": 3, "lr": 0.01, "beta": 0.3}
DEFAULTS = dict(
    TRAIN_DEFAULTS,
    method="rml",            # a name in utils.defences.DEFENCES
    original="",             # checkpoint of the original model (from train_scratch.py, or from elsewhere)
    **checkpoint_keys("original"),
    **defence_keys(),
    init_from_original=False,
)
DEFAULTS.update(RECOMMENDED)
METHODS = tuple(DEFENCES)
HELP_NOTES = {k: "the mini preset's RML setting" for k in RECOMMENDED}


class PossessiveTask(Task):
    def __init__(self, model, original, cfg):
        self.model, self.original, self.cfg = model, original, cfg
        self.defence = DEFENCES[cfg["method"]](cfg)
        self.engine = None

    def setup(self, engine):
        if self.engine is engine:
            return
        self.engine = engine
        self.original = engine.prepare_frozen(self.original)

    def loss(self, batch):
        x, y = batch
        with torch.no_grad():
            original_logits = self.original(x)
        logits = self.train_model(x)
        progress = self.engine.progress if self.engine is not None else 0.0
        return self.defence.loss(logits, original_logits, y, progress), logits, y

    @torch.no_grad()
    def eval_batch(self, x, logits, y):
        """Has the defence taken hold? Distance from the original and reversal of its non-target order."""
        tau = self.cfg["tau"]
        with self.engine.autocast():
            original_logits = self.original(x)
        return compare_to_original(logits, original_logits.float(), y, tau)

    def metrics(self):
        """Besides the method: the mean softmax response per class at tau of this teacher and of the
        original (report.py draws them), and the original's calibration error."""
        tau = self.cfg["tau"]
        logits, labels = self.engine.final_logits, self.engine.final_labels
        original_logits, _ = self.engine.predict(self.original)
        return {"method": self.cfg["method"], "trained": self.defence.trained, "original": self.cfg["original"],
                "original_acc": self.original_acc,
                "original_ece": float(expected_calibration_error(original_logits, labels)),
                "response_tau": tau,
                "class_response": class_response(logits, labels, tau).tolist(),
                "original_class_response": class_response(original_logits, labels, tau).tolist()}


def check(cfg, source="config"):
    if cfg["method"] not in DEFENCES:
        raise UserError(f"{source}: 'method' must be one of {', '.join(DEFENCES)}, got '{cfg['method']}'"
                        f"{close_match(str(cfg['method']), DEFENCES)}")
    if not cfg["tau"] > 0:
        raise UserError(f"{source}: 'tau' must be > 0, got {cfg['tau']}")
    for defence in DEFENCES.values():  # every key is checked, also those the chosen defence does not read
        defence.check(cfg, source)
    require_labels(cfg, source, "train_possessive.py (the owner's teacher)")


@cli_main
def main(argv=None):
    args, _ = parse_config(__doc__.splitlines()[0], DEFAULTS, argv,
                           choices={"method": METHODS, "reverse_scope": REVERSE_SCOPES},
                           script="train_possessive.py", notes=HELP_NOTES)
    cfg = resolve_config(args, DEFAULTS, checks=[check])
    cfg["original"] = finished_weights(cfg["original"], "original")
    engine = Engine(cfg, args.save_path, "train_possessive.py", resume=args.resume, overwrite=args.overwrite)
    original, ckpt = build_from_checkpoint(cfg["original"], "original", dataset=cfg["dataset"],
                                           num_classes=engine.info.num_classes, **checkpoint_options(cfg, "original"))
    engine.add_input("original", cfg["original"], ckpt)
    defence = DEFENCES[cfg["method"]]
    if not defence.trained:  # checked before anything is written
        if models.ALIASES.get(cfg["model"], cfg["model"]) != ckpt["arch"]:
            raise UserError(f"method {cfg['method']} trains nothing and answers with the original: set model to "
                            f"'{ckpt['arch']}' (the original's), got '{cfg['model']}'")
        if isinstance(original, DefendedModel):
            raise UserError(f"original {cfg['original']} is itself a training-free defence; give the plain original")
    model = models.build(cfg["model"], engine.info.num_classes)
    if cfg["init_from_original"]:
        if models.ALIASES.get(cfg["model"], cfg["model"]) != ckpt["arch"]:
            raise UserError(f"init_from_original needs model '{ckpt['arch']}' (the original's), got '{cfg['model']}'")
        model.load_state_dict(ckpt["model"])
    engine.load_data()
    if engine.is_main:
        write_config(args.save_path, cfg)
    task = PossessiveTask(model, original, cfg)
    task.setup(engine)
    task.original_acc, _ = engine.evaluate(task.original, diagnostics=False)
    engine.log(f"original {ckpt['arch']} from {cfg['original']}: test acc {task.original_acc:.2f}")
    if defence.trained:
        engine.fit(task)
        return 0
    settings, runtime = defence.settings(cfg), {}
    if defence.needs_key:  # the key stays in the folder (or the environment); only its fingerprint is recorded
        key, where = secret_key(args.save_path, create=engine.is_main)
        settings["key_sha256"] = key_fingerprint(key)
        runtime = defence.runtime(settings, key, engine.info.num_classes)
        engine.log(f"secret key from {where} (fingerprint {settings['key_sha256']}); keep it: the teacher cannot "
                   f"answer without it")
    task.model = DefendedModel(task.original, cfg["method"], settings, runtime)
    record = dict(model_record(ckpt["model"], ckpt["arch"], cfg["dataset"]), defence=dict(settings, name=cfg["method"]))
    record.update({k: list(ckpt[k]) for k in ("mean", "std") if ckpt.get(k)})  # the original's normalisation
    engine.publish(task, task.model, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
