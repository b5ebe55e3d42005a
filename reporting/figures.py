"""The report's figures, one function per figure; matplotlib is imported only when a figure is drawn."""
import os

from utils.stats import MIN_SEEDS

from .cells import fmt
from .names import TEACHER_NAMES, count_attacks, teacher_order
from .verdicts import bar_name, floor_of

PALETTE = ["#55a868", "#c44e52", "#dd8452", "#8172b3", "#937860", "#da8bc3", "#64b5cd", "#ccb974"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_plot(fig, ax, xlabel, ylabel, path, legend_size, dpi):
    """Label the axes, add the legend and a light grid, write the figure to path and close it."""
    plt = _pyplot()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=legend_size)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def epoch_ticks(ax, epochs):
    """A log-2 epoch axis ticked at the schedules measured, labelled in epochs."""
    ax.set_xscale("log", base=2)
    ticks = sorted(epochs)
    ax.set_xticks(ticks, [str(e) for e in ticks])
    ax.minorticks_off()


def figures(res, exp_root, response_class=3):
    """Draw a collected folder's figures into exp_root; returns the names of those drawn (a figure with nothing
    to show is not drawn)."""
    drawn = {"fig_accuracy.png": accuracy_figure(res, os.path.join(exp_root, "fig_accuracy.png")),
             "fig_response.png": response_figure(res, os.path.join(exp_root, "fig_response.png"), response_class),
             "fig_curves.png": curves_figure(res, os.path.join(exp_root, "fig_curves.png")),
             "fig_frontier.png": frontier_figure(res, os.path.join(exp_root, "fig_frontier.png"))}
    return [name for name, done in drawn.items() if done]


def accuracy_bars(res):
    """(labels, values, colours) of the accuracy figure: teachers, then per student architecture scratch,
    label smoothing and every attack x teacher, coloured by teacher."""
    labels, values, colours = [], [], []
    order = teacher_order(res)
    colour = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(order)}
    for key in order:
        if key in res["teachers"]:
            labels.append(f"teacher\n{TEACHER_NAMES[key]}")
            values.append(res["teachers"][key]["acc"])
            colours.append("#4c72b0")
    for arch, s in res["students"].items():
        for src in ("scratch", "ls"):
            if src in s:
                labels.append(f"{arch}\n{src}")
                values.append(s[src]["acc"])
                colours.append("#8c8c8c")
        for teacher, attacks in s["kd"].items():
            for attack, a in attacks.items():
                labels.append(f"{arch} KD\n{teacher}/{attack}")
                values.append(a["acc"])
                colours.append(colour[teacher])
    return labels, values, colours


def accuracy_figure(res, path):
    """fig_accuracy.png: a bar per teacher and student (accuracy_bars), the label-smoothing students drawn
    across. False when there is nothing to draw."""
    labels, values, colours = accuracy_bars(res)
    if not values:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(values)), 4.5))
    ax.bar(range(len(values)), values, color=colours)
    ax.set_xticks(range(len(values)), labels, rotation=70, fontsize=7)
    ax.set_ylabel("test accuracy (%)")
    lo = min(values)
    ax.set_ylim(max(0, lo - 10), min(100, max(values) + 3))
    bars = [s["ls"]["acc"] for s in res["students"].values() if "ls" in s]
    for i, bar in enumerate(bars):
        ax.axhline(bar, color="k", ls="--", lw=0.8, label="label-smoothing student" if i == 0 else None)
    if bars:
        ax.legend(loc="lower right", fontsize=7)
    ax.set_title("Teachers and students (KD at the thief's best τ)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def response_figure(res, path, response_class):
    """fig_response.png: the mean softmax response of the original and of each defended teacher that recorded
    one, to test images of one class. False when no teacher recorded a response."""
    responses = {}
    for key in [k for k in teacher_order(res) if k != "original"]:
        t = res["teachers"].get(key)
        if t and t.get("class_response"):
            responses[TEACHER_NAMES[key]] = t["class_response"]
            if t.get("original_class_response"):  # a teacher judged without its original has none
                responses.setdefault("original", t["original_class_response"])
    if not responses:
        return False
    plt = _pyplot()
    order = ["original"] * ("original" in responses) + [k for k in responses if k != "original"]
    fig, axes = plt.subplots(1, len(order), figsize=(4 * len(order), 3.2), sharey=True)
    axes = axes if len(order) > 1 else [axes]
    tau = next(t.get("response_tau") for t in res["teachers"].values() if t.get("response_tau"))
    for ax, name in zip(axes, order):
        row = responses[name][response_class]
        ax.bar(range(len(row)), row, color=["#c44e52" if i == response_class else "#4c72b0" for i in range(len(row))])
        ax.set_title(f"{name}")
        if len(row) == 10:
            ax.set_xticks(range(10), CIFAR10_CLASSES, rotation=70, fontsize=7)
    axes[0].set_ylabel(f"mean softmax at τ={tau:g}")
    cls = CIFAR10_CLASSES[response_class] if len(responses[order[0]]) == 10 else str(response_class)
    fig.suptitle(f"Mean response to test images of class '{cls}'")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def curves_figure(res, path):
    """fig_curves.png: test accuracy per epoch of the teachers, the scratch, label-smoothing and vanilla KD
    students and DFAD (an arm's first seed). False when no run recorded a history."""
    curves = [(f"teacher {TEACHER_NAMES[k]}", t["history"]) for k, t in res["teachers"].items()]
    for arch, s in res["students"].items():
        curves += [(f"{arch} {src}", s[src]["history"]) for src in ("scratch", "ls") if src in s]
        curves += [(f"{arch} KD {t}/{a}", v["history"]) for t, atts in s["kd"].items() for a, v in atts.items()
                   if a == "vanilla"]
    curves += [(f"DFAD {t}", d["history"]) for t, d in res["dfad"].items()]
    # a run with eval_every > 1 (the threat models' long schedules) has test accuracy at its evaluated epochs only
    curves = [(n, [r for r in h if r.get("test_acc") is not None]) for n, h in curves]
    curves = [(n, h) for n, h in curves if h]
    if not curves:
        return False
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    for name, hist in curves:
        ax.plot([r["epoch"] for r in hist], [r["test_acc"] for r in hist], marker=".", label=name)
    save_plot(fig, ax, "epoch", "test accuracy (%)", path, 7, 110)
    return True


def frontier_figure(res, path):
    """fig_frontier.png: each teacher's accuracy against its strongest attack's student, the label-smoothing bar
    (and in a threat model's folder the hard-label floor, the bar without labels) and the original's accuracy less
    half a point drawn. False when the folder has no frontier."""
    points = res["frontier"]
    if not points:
        return False
    fig, ax = _pyplot().subplots(figsize=(7, 4.5))
    colour = {t: PALETTE[i % len(PALETTE)] for i, t in enumerate(teacher_order(res))}
    for r in points:
        ax.errorbar([r["teacher_acc"]], [r["acc"]], yerr=r["std"], fmt="o", color=colour[r["teacher"]], capsize=3,
                    label=f"{TEACHER_NAMES[r['teacher']]} ({r['strongest']})")
    floor_is_bar = bar_name(res) == "hardlabel"
    for arch, student in res["students"].items():
        ls = (student.get("ls") or {}).get("acc")
        if ls is not None:
            ax.axhline(ls, color="grey", linestyle="--", linewidth=1,
                       label=f"label smoothing ({arch})" if floor_is_bar else f"label-smoothing bar ({arch})")
        floor = floor_of(res, student).get("acc") if "threat" in res else None
        if floor is not None:  # a threat model's other bar: what the teacher's argmax alone gives
            ax.axhline(floor, color="black" if floor_is_bar else "grey", linestyle="-.", linewidth=1,
                       label=f"hard-label floor{' (the bar)' if floor_is_bar else ''} ({arch})")
    original = res["teachers"].get("original")
    if original:
        ax.axvline(original["acc"] - 0.5, color="grey", linestyle=":", linewidth=1,
                   label="original − 0.5 point")
    ax.set_title("each teacher against the attack that steals the most from it", fontsize=9)
    save_plot(fig, ax, "teacher test accuracy (%)", "strongest attack's student accuracy (%)", path, 7, 110)
    return True


def convergence_figure(arms, path):
    """fig_convergence.png: each arm's mean final accuracy against its schedule length; arms: curve.json's."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # an arm per colour up to 20
    for arm in arms:
        ax.plot(arm["epochs"], arm["mean"], marker="o", label=arm["label"])
    epoch_ticks(ax, {e for arm in arms for e in arm["epochs"]})
    save_plot(fig, ax, "epochs (log 2)", "final test accuracy (%)", path, 8, 120)


def schedule_figure(sched, path):
    """fig_schedule.png: every KD arm's Δ against the label-smoothing student of its schedule, over schedules."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    ax.axhline(0.0, color="black", lw=1, label="label-smoothing bar")
    for s in sched:
        ax.plot([r["epochs"] for r in s["rows"]], [r["diff"] for r in s["rows"]], marker="o", label=s["label"])
    epoch_ticks(ax, {r["epochs"] for s in sched for r in s["rows"]})
    save_plot(fig, ax, "epochs (log 2)", "student − label-smoothing student (points)", path, 7, 120)


def schedule_frontier_figure(front, path):
    """Δ of each teacher's strongest attack against the bar, a marker per schedule, teachers in the order of
    their accuracy (written under each name)."""
    plt = _pyplot()
    teachers = list(dict.fromkeys((f["model"], f["teacher"]) for f in front))  # in the table's order
    acc = {(f["model"], f["teacher"]): f["teacher_acc"] for f in front}
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(teachers)), 4.5))
    ax.axhline(0.0, color="black", lw=1, label="label-smoothing bar")
    markers = "os^Dv<>p*h"
    for i, e in enumerate(sorted({f["epochs"] for f in front})):
        pts = [(teachers.index((f["model"], f["teacher"])), f["diff"], count_attacks(f["attacks"]))
               for f in front if f["epochs"] == e]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], s=50,
                   label=f"{e} epochs", zorder=3)
        for x, y, k in pts:
            ax.annotate(str(k), (x, y), textcoords="offset points", xytext=(6, -3), fontsize=7)
    names = [f"{t}\n{fmt(acc[(m, t)])}" + (f"\n{m}" if len({m for m, _ in teachers}) > 1 else "") for m, t in teachers]
    ax.set_xticks(range(len(teachers)), names, fontsize=7)
    ax.set_title("strongest attack per teacher (the number beside a point: attacks compared)", fontsize=8)
    save_plot(fig, ax, "teacher (test accuracy %)", "strongest stolen student − bar (points)", path, 8, 120)


def threat_figure(models_, teachers, path):
    """fig_threats.png: each teacher's strongest-attack Δ against its bar over the thief's images, a panel for a
    thief with labels and one without; a filled marker is a strongest attack run on MIN_SEEDS seeds or more, a
    hollow one on fewer (no verdict yet)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, labels in zip(axes, (True, False)):
        sizes = set()
        for i, (arch, teacher) in enumerate(teachers):
            rows = sorted((m["threat"]["images"] or 50000, m["rows"][f"{arch}/{teacher}"]) for m in models_
                          if m["threat"]["labels"] is labels and f"{arch}/{teacher}" in m["rows"]
                          and m["rows"][f"{arch}/{teacher}"]["delta"] is not None)
            if not rows:
                continue
            color = PALETTE[i % len(PALETTE)]
            ax.plot([x for x, _ in rows], [r["delta"] for _, r in rows], color=color,
                    label=f"{TEACHER_NAMES[teacher]} ({arch})")
            for x, r in rows:
                ax.plot([x], [r["delta"]], marker="o", color=color,
                        markerfacecolor=color if r["n"] >= MIN_SEEDS else "white")
            sizes.update(x for x, _ in rows)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log")
        if sizes:
            ax.set_xticks(sorted(sizes), [f"{x:,}" for x in sorted(sizes)])
        else:
            ax.set_xticks([])
            ax.text(0.5, 0.5, "no threat model of this kind in these folders", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8, color="grey")
        ax.minorticks_off()
        ax.set_title("thief with labels: Δ vs label smoothing" if labels
                     else "thief without labels: Δ vs hard-label floor", fontsize=9)
        ax.set_xlabel(f"thief's training images (hollow: n < {MIN_SEEDS} seeds)")
    axes[0].set_ylabel("strongest attack's student − bar (points)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
