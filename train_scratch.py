"""Train a normal teacher, or a student from scratch (the baseline every attack is measured against).

    python train_scratch.py --save_path exps/mini/teacher_resnet20 [--epochs 2 --model resnet8 ...]
"""
import os
import sys

import models
from utils.config import require_labels, TRAIN_DEFAULTS, parse_config, resolve_config, write_config
from utils.engine import Engine, Task, cross_entropy
from utils.errors import cli_main

DEFAULTS = dict(TRAIN_DEFAULTS)


class ScratchTask(Task):
    """Cross-entropy (with optional label smoothing, the KD-resistance bar) on the training set."""

    def __init__(self, model, label_smoothing):
        self.model = model
        self.label_smoothing = label_smoothing

    def loss(self, batch):
        x, y = batch
        logits = self.train_model(x)
        return {"ce": cross_entropy(logits, y, self.label_smoothing)}, logits, y


def list_models():
    print(f"{'name':<14} {'params (10 classes)':>20}  description")
    for name, params, desc in models.describe():
        print(f"{name:<14} {params / 1e6:>19.2f}M  {desc}")


@cli_main
def main(argv=None):
    args, _ = parse_config(__doc__.splitlines()[0], DEFAULTS, argv, lambda p: p.add_argument(
        "--list-models", action="store_true", help="print the model zoo and exit"), script="train_scratch.py")
    if args.list_models:
        list_models()
        return 0
    cfg = resolve_config(args, DEFAULTS)
    require_labels(cfg, os.path.join(args.save_path, "params.json"), "train_scratch.py (scratch and label smoothing)")
    engine = Engine(cfg, args.save_path, "train_scratch.py", resume=args.resume, overwrite=args.overwrite)
    engine.load_data()
    if engine.is_main:
        write_config(args.save_path, cfg)
    model = models.build(cfg["model"], engine.info.num_classes)
    engine.fit(ScratchTask(model, cfg["label_smoothing"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
