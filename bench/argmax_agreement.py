"""How often a teacher's argmax is the true label on the thief's own images: the target class a thief without
labels gets in the label's place (train_kd.py: the teacher's argmax of each augmented query).

    python bench/argmax_agreement.py [--teachers exps/mini/teacher_resnet20 exps/mini/nasty_resnet20 ...]
                                     [--subset 1000] [--seeds 0 1 2] [--epochs 20] [--data_root ./data]

For each teacher and seed: the thief's class-balanced subset of `--subset` training images (subset_seed = the
seed, as the grid's threat models draw it), and the share of answers whose argmax is the image's label, on the
clean images and on the first `--epochs` epochs of augmented queries a student of that seed sends (the training
loader of that seed: the same crops and flips). A label-free thief's cross-entropy, DKD's and TCKD's target
class, Markov KD's matrix and re-reversal all read that argmax; where it is not the label, the labelled thief's
run and the label-free one differ (they are the same run where every argmax is the label). No timing: it prints
the shares as a markdown table (--json FILE also writes them).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train_kd import DEFAULTS  # noqa: E402
from utils.checkpoint import finished_weights, freeze  # noqa: E402
from utils.data import build_loaders  # noqa: E402
from utils.errors import UserError, cli_main  # noqa: E402
from utils.thief import load_teacher  # noqa: E402

TEACHERS = ("teacher_resnet20", "rml_resnet20", "nasty_resnet20", "stingy_resnet20", "posthoc_resnet20",
            "rmlnasty_resnet20")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", nargs="+", default=[os.path.join("exps", "mini", t) for t in TEACHERS],
                        help="teacher run folders or weights files (default: the released teachers of exps/mini)")
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--subset", type=int, default=1000, help="the thief's training images (default 1000: p2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20, help="augmented epochs of queries counted (default 20)")
    parser.add_argument("--batch_size", type=int, default=128, help="the students' batch size (the queries' "
                        "crops and flips depend on it through the loader's plan; default 128, the grid's)")
    parser.add_argument("--data_root", default="./data")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    return parser.parse_args(argv)


@torch.no_grad()
def agreement(teacher, loader, epochs):
    """(share of clean images whose argmax is the label, the same over `epochs` epochs of augmented queries)."""
    clean = 0
    for i in range(0, len(loader.labels), 500):
        clean += (teacher(loader.normalise(loader.images[i:i + 500])).argmax(1) == loader.labels[i:i + 500]).sum()
    hits = seen = 0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            hits += (teacher(x).argmax(1) == y).sum()
            seen += len(y)
    return clean.item() / len(loader.labels), hits.item() / max(seen, 1)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.subset < 1 or args.epochs < 1:
        raise UserError(f"--subset and --epochs must be at least 1, got {args.subset} and {args.epochs}")
    cfg = dict(DEFAULTS, dataset=args.dataset, data_root=args.data_root, subset=args.subset, labels=True,
               batch_size=args.batch_size, channels_last=False)
    # every teacher loaded once, before any image is read: a bad file stops the run first
    teachers = [(path, freeze(load_teacher(dict(cfg, teacher=finished_weights(path, "teacher")))[0]))
                for path in args.teachers]
    rows = []
    for seed in args.seeds:
        loader = build_loaders(dict(cfg, subset_seed=seed, seed=seed), torch.device("cpu"))["train"]
        for path, teacher in teachers:
            clean, augmented = agreement(teacher, loader, args.epochs)
            rows.append({"teacher": path, "seed": seed, "subset": args.subset, "epochs": args.epochs,
                         "clean": clean, "augmented": augmented})
    print(f"| teacher | seed | argmax = label, clean {args.subset} images | argmax = label, "
          f"{args.epochs} epochs of augmented queries |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['teacher']} | {r['seed']} | {r['clean']:.1%} | {r['augmented']:.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
