"""The training engine every script shares: device, precision, DDP, the loop, evaluation, checkpoints, logs.

A script hands the engine a Task: the model being trained and the one step that differs (CE; RML or
Nasty against a frozen original; KD against a frozen teacher; DFAD's student/generator steps). The step
returns a dict of named loss terms; the engine sums them, backpropagates, and logs each one.

There is one training loop, train_together: Engine.fit runs a lone run through it as a battery of one, and
train_kd.py --battery runs several students of one teacher through it (utils/battery.py).

Longer than ~400 lines because the Engine is one object on purpose: a run's folder, resume, precision, DDP,
evaluation and logs share its state, and the one loop reads all of them; the pieces that need none of it (lr
factors, the signal helper, the stop checks) are the module's functions, and tests/test_engine.py tests them.
"""
import contextlib
import csv
import io
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import (WEIGHTS_FILE, atomic_write_json, atomic_write_text, export_weights, git_commit,
                         input_record, load_checkpoint, model_record, processor, save_checkpoint, unwrap)
from .config import ADDED_KEYS, changed_result_key
from .constants import DATASETS
from .diagnostics import expected_calibration_error
from .errors import UserError

# A training loss this large (in absolute value) means the run has diverged even while it is still finite:
# no loss of these scripts comes near it in a healthy run, and float32 overflows only at ~3e38.
LOSS_LIMIT = 1e6

PROTOCOL = ("final_acc (last epoch) is the headline figure; best_acc is picked on the test split "
            "and is reported only beside it")


def lr_factor(cfg, progress):
    """Multiplier of the base lr after `progress` epochs (a float) of cfg['epochs']."""
    total, name = cfg["epochs"], cfg["schedule"]
    if name == "constant":
        return 1.0
    if name == "step":
        return cfg["lr_decay"] ** sum(progress >= m for m in cfg["milestones"])
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress / total, 1.0)))
    rise = cfg["warmup"] * total  # onecycle: linear up to lr, then linear down to 0
    if progress < rise:
        return max(progress / rise, 0.02)
    return max((total - progress) / max(total - rise, 1e-8), 0.0)


def refuse_finished(save_path, script):
    """A finished run (metrics.json) is never replaced by accident: without --resume or --overwrite, stop here,
    before anything is written."""
    if os.path.isfile(os.path.join(save_path, "metrics.json")):
        raise UserError(f"{save_path} holds a finished run (metrics.json) and stays as it is; nothing is left to do "
                        f"(--resume finds it finished); to train it again from the start add --overwrite (the old "
                        f"results are kept until the new run's first checkpoint), or use another --save_path")


def tracked_by_git(folder, names):
    """Which of folder/names are tracked by git (a released run); [] when git or a repository is not there."""
    import subprocess
    try:
        out = subprocess.run(["git", "ls-files", "--", *names], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    if out.returncode != 0:
        return []
    listed = set(out.stdout.split())
    return [os.path.join(folder, n) for n in names if n in listed]


def cpu_supports_bf16():
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Task:
    """What a script trains. Override `loss`; the rest has defaults for supervised training on the train loader."""

    model = None

    def setup(self, engine):
        """Called once the engine knows the device; move frozen models there (engine.prepare_frozen)."""

    def steps_per_epoch(self, engine):
        return len(engine.loaders["train"])

    def train_batches(self, engine, epoch, start_step):
        loader = engine.loaders["train"]
        loader.set_epoch(epoch)
        return loader.iterate(start_step)

    def loss(self, batch):
        """Return (terms: dict name -> scalar tensor, logits, targets); logits/targets may be None."""
        raise NotImplementedError

    def parts(self):
        """{name: Part}: modules trained beside the model (Markov KD's matrices, DFAD's
        generator); the engine moves them to the device, builds their optimizers, follows the lr schedule,
        checkpoints and resumes them. Called once, after setup()."""
        return {}

    def after_step(self, engine, step):
        """Called after the optimizer step (DFAD's generator step lives here)."""

    def eval_batch(self, x, logits, y):
        """Diagnostics on a test batch: dict name -> tensor summed over the batch (the engine averages)."""
        return {}

    def end_epoch(self, engine, epoch, row):
        """Called on every rank after evaluation; `row` is the epoch's log row (add keys to it)."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def metrics(self):
        """Extra entries for metrics.json."""
        return {}


class Part:
    """A trainable module a task (an attack's, DFAD's generator) adds beside the model: the engine builds its
    optimizer (`optimizer`: a dict of optimizer, lr, momentum, nesterov, weight_decay), follows the model's lr
    schedule with `optimizer['lr']` as the peak, saves and restores it with the run. joint=True: stepped
    by the engine together with the model, from the same loss; joint=False: the task steps it itself."""

    def __init__(self, module, optimizer, joint=True):
        self.module, self.optimizer_cfg, self.joint = module, dict(optimizer), joint
        self.optimizer = None


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def catch_stop_signals(handler):
    """Route SIGTERM and SIGINT to handler(signum, frame); returns the function that puts the previous
    handlers back. Outside the main thread (a test harness thread), where Python refuses handlers, nothing
    is installed and the returned function does nothing."""
    old = {}
    try:
        for s in STOP_SIGNALS:
            old[s] = signal.signal(s, handler)
    except ValueError:
        pass

    def restore():
        for s, h in old.items():
            signal.signal(s, h)
    return restore


class Engine:
    def __init__(self, cfg, save_path, script, resume=False, overwrite=False):
        """A --resume must keep every key of cfg except NON_RESULT_KEYS (checked here, before anything is
        written), and the weights of every checkpoint the run loads (checked by add_input). A finished run
        (metrics.json) is trained again only with overwrite, and its results are kept until the new run
        writes its first checkpoint. The folder is locked for this process (utils/lock.py)."""
        self.cfg, self.save_path, self.script, self.resume = cfg, save_path, script, resume
        if resume and overwrite:
            raise UserError("give either --resume (continue the run) or --overwrite (train it again from the "
                            "start), not both")
        if not resume and not overwrite:
            refuse_finished(save_path, script)
        self._replaced = []  # results of the finished run being overwritten, removed at the first checkpoint
        self.inputs = {}
        self.parts = {}
        self.export_record = None  # what weights.pth holds, when not the trained model (see publish)
        self.notes = {}  # extra metrics.json entries the caller adds (a battery names its students)
        self._resume_ckpt = self._read_resume() if resume else None  # first: a refused resume touches nothing
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = self._pick_device(cfg["device"])
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.amp_dtype = self._pick_amp(cfg["amp"])
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        torch.manual_seed(cfg["seed"])
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.is_main = self.rank == 0
        self.info = DATASETS[cfg["dataset"]]
        self.loaders = {}
        self._stop_signal = None
        self.progress = 0.0
        if self.is_main:
            self._check_writable()

    # --- set-up -----------------------------------------------------------------------------------
    def _pick_device(self, name):
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UserError("device 'cuda' asked for but no CUDA GPU is visible; use --device cpu or auto")
            if self.world_size > 1:
                name = f"cuda:{self.local_rank}"
            device = torch.device(name)
            if device.index is None:  # torch.cuda.set_device refuses a device without an index
                device = torch.device("cuda", 0)
            if device.index >= torch.cuda.device_count():
                raise UserError(f"device {device} asked for but {torch.cuda.device_count()} CUDA GPU(s) are visible "
                                f"(one per process under torchrun); use fewer processes or another --device")
            torch.cuda.set_device(device)
            return device
        return torch.device("cpu")

    def _pick_amp(self, amp):
        if amp == "off":
            return None
        if self.device.type == "cuda":
            if amp == "auto":
                return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.bfloat16 if amp == "bf16" else torch.float16
        if amp == "fp16":
            raise UserError("amp fp16 is for CUDA only; on CPU use --amp bf16 or off")
        if amp == "auto":
            return torch.bfloat16 if cpu_supports_bf16() else None
        return torch.bfloat16

    def _check_writable(self):
        try:
            os.makedirs(self.save_path, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create save_path {self.save_path} ({e.strerror})") from None
        if not os.access(self.save_path, os.W_OK):
            raise UserError(f"save_path {self.save_path} is not writable; choose another --save_path")
        from .lock import acquire
        acquire(self.save_path)
        for name in os.listdir(self.save_path):  # left by a write that a SIGKILL cut short
            if name.startswith(".tmp-"):
                try:
                    os.unlink(os.path.join(self.save_path, name))
                except OSError:
                    pass

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, model):
        model = model.to(self.device)
        if self.cfg["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        return model

    def prepare_frozen(self, model):
        """A frozen helper model (original, teacher) on the device: eval mode, no grads, never wrapped in DDP."""
        from .checkpoint import freeze
        return freeze(self.to_device(model))

    def load_data(self, train=True):
        from .data import build_loaders
        self.loaders = build_loaders(self.cfg, self.device, self.rank, self.world_size, train=train)
        return self.loaders

    def log(self, msg):
        if self.is_main:
            print(msg, flush=True)
            with open(os.path.join(self.save_path, "train.log"), "a") as f:
                f.write(msg + "\n")

    def all_reduce(self, t):
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    # --- optimisation ----------------------------------------------------------------------------
    def build_optimizer(self, params, cfg=None, prefix=""):
        cfg = cfg or self.cfg
        name, lr, wd = cfg[prefix + "optimizer"], cfg[prefix + "lr"], cfg[prefix + "weight_decay"]
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=cfg[prefix + "momentum"], weight_decay=wd,
                                   nesterov=cfg[prefix + "nesterov"] and cfg[prefix + "momentum"] > 0)
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=wd)
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)

    def prepare_parts(self, task):
        """The task's extra trainable modules on the device, each with its optimizer (see Task.parts)."""
        self.parts = dict(task.parts())
        for part in self.parts.values():
            part.module.to(self.device)
            part.optimizer = self.build_optimizer(list(part.module.parameters()), part.optimizer_cfg)
        return self.parts

    def set_lr(self, progress):
        """Set the lr of the model's optimizer and of every part for `progress` epochs; return the model's."""
        factor = lr_factor(self.cfg, progress)
        for g in self.optimizer.param_groups:
            g["lr"] = self.cfg["lr"] * factor
        for part in self.parts.values():
            for g in part.optimizer.param_groups:
                g["lr"] = part.optimizer_cfg["lr"] * factor
        return self.cfg["lr"] * factor

    # --- checkpoints -----------------------------------------------------------------------------
    def _state(self, epoch, step):
        state = model_record(self.model, self.cfg["model"], self.cfg["dataset"])
        state.update({
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"schedule": self.cfg["schedule"], "global_step": self.global_step},
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "epoch": epoch, "step": step, "best_acc": self.best_acc, "best_epoch": self.best_epoch,
            "config": self.cfg, "history": self.history, "train_time": self.train_time,
            "images_seen": self.images_seen, "rng": {"torch": torch.get_rng_state()},
            "task": self.task.state_dict(), "git_commit": self.commit, "script": self.script,
            "inputs": self.inputs,
            "parts": {name: {"module": part.module.state_dict(), "optimizer": part.optimizer.state_dict()}
                      for name, part in self.parts.items()},
        })
        if self.device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save(self, name, epoch, step=0):
        self._check_weights(name)
        self._clear_results()
        if self.is_main:
            save_checkpoint(os.path.join(self.save_path, name), self._state(epoch, step))

    def _read_resume(self):
        """Read and check last.pth before anything is written, so a bad --resume changes nothing."""
        path = os.path.join(self.save_path, "last.pth")
        ckpt = load_checkpoint(path, "resume checkpoint")
        missing = [k for k in ("config", "optimizer", "scheduler", "epoch", "step", "rng", "history") if k not in ckpt]
        if missing:
            raise UserError(f"cannot resume: {path} holds no training state (no '{missing[0]}'); it is a weights-only "
                            f"checkpoint, not the last.pth of a training run; start without --resume")
        old = dict({k: v for k, v in ADDED_KEYS.items() if k in self.cfg}, **ckpt["config"])
        key = changed_result_key(old, self.cfg)
        if key is not None:
            raise UserError(f"cannot resume: {path} was written with {key}={old.get(key)!r}, this run has "
                            f"{key}={self.cfg.get(key)!r}; use the same config or start without --resume "
                            f"(in another --save_path, to keep this run)")
        if ckpt["epoch"] >= old.get("epochs", 0) and os.path.isfile(os.path.join(self.save_path, "metrics.json")):
            raise UserError(f"cannot resume: the run in {self.save_path} is finished ({ckpt['epoch']} of "
                            f"{old.get('epochs')} epochs, metrics.json written) and stays as it is; train in "
                            f"another --save_path, or use --overwrite instead of --resume to train it again")
        return ckpt

    def add_input(self, role, path, ckpt):
        """Record a checkpoint this run loads (original, teacher): metrics.json and every checkpoint carry its
        path and weights digest. A --resume whose input's weights changed since the run began is refused."""
        record = input_record(path, ckpt)
        if self._resume_ckpt is not None:
            old = self._resume_ckpt.get("inputs", {}).get(role)
            if old is None or old["weights_sha256"] != record["weights_sha256"]:
                was = old["weights_sha256"][:12] if old else "unrecorded"
                raise UserError(f"cannot resume: the {role} {path} now has weights {record['weights_sha256'][:12]}, "
                                f"the run in {self.save_path} began with {was}; start without --resume to train "
                                f"against the new {role}")
        self.inputs[role] = record
        return record

    def _load_resume(self):
        ckpt = self._resume_ckpt
        unwrap(self.model).load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.task.load_state_dict(ckpt.get("task", {}))
        for name, part in self.parts.items():
            saved = ckpt.get("parts", {}).get(name)
            if saved is None:
                raise UserError(f"cannot resume: {self.save_path}/last.pth holds no state for '{name}' (it was written "
                                f"by another script or an older version); start without --resume")
            part.module.load_state_dict(saved["module"])
            part.optimizer.load_state_dict(saved["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
        self.global_step = ckpt["scheduler"]["global_step"]
        self.best_acc, self.best_epoch = ckpt["best_acc"], ckpt["best_epoch"]
        self.history, self.train_time = ckpt["history"], ckpt["train_time"]
        self.images_seen = ckpt["images_seen"]
        return ckpt["epoch"], ckpt["step"]

    # --- stopping --------------------------------------------------------------------------------
    def request_stop(self, signum):
        """Stop this run after its current step: the loop writes last.pth and exits with 128 + signum. The
        loop's signal handler calls it on SIGTERM/SIGINT; a task may call it too."""
        self._stop_signal = signum

    @property
    def stop_signal(self):
        """The signal number a stop was requested with, or None while the run goes on."""
        return self._stop_signal

    # --- the loop --------------------------------------------------------------------------------
    def fit(self, task):
        """Train task.model to the end of the schedule; returns the metrics. A lone run is a battery of one:
        it goes through the one loop, train_together."""
        return train_together([Member(self, task, self.begin(task))])[0]

    def begin(self, task):
        """Everything before the first step: the model, its optimizer and parts on the device, the resume
        state, the log header. Returns (start epoch, start step, steps per epoch). fit() and a shared battery
        (utils/battery.py) both start here."""
        cfg = self.cfg
        self.task = task
        task.setup(self)
        model = self.to_device(task.model)
        self.model = model
        self.num_params = sum(p.numel() for p in model.parameters())
        self.optimizer = self.build_optimizer([p for p in model.parameters() if p.requires_grad])
        self.prepare_parts(task)
        self.global_step, self.best_acc, self.best_epoch = 0, -1.0, -1
        self.history, self.train_time, self.images_seen = [], 0.0, 0
        self.commit = git_commit()
        start_epoch, start_step = 0, 0
        self._plan_replace()
        if self.resume:
            start_epoch, start_step = self._load_resume()
            self.log(f"resumed from {os.path.join(self.save_path, 'last.pth')} "
                     f"at epoch {start_epoch} step {start_step}")
        elif self.is_main and os.path.exists(os.path.join(self.save_path, "last.pth")):
            self.log(f"note: starting afresh; the old checkpoints in {self.save_path} will be replaced "
                     f"(use --resume to continue them)")
        train_model = model
        if self.world_size > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg["compile"]:
            train_model = torch.compile(train_model)
        task.train_model = train_model
        steps = task.steps_per_epoch(self)
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(self.save_path, "tb"))
        self.log(f"{self.script}: {cfg['model']} ({self.num_params / 1e6:.2f}M params) on {cfg['dataset']}, "
                 f"device {self.device}, amp {self.amp_dtype or 'off'}, world size {self.world_size}, "
                 f"{cfg['epochs']} epochs x {steps} steps, batch {cfg['batch_size']}")
        return start_epoch, start_step, steps

    def _plan_replace(self):
        """The results of an earlier run in this folder stop describing it once this run has a checkpoint of
        its own: until then they stay (an overwrite stopped early loses nothing), then they are removed."""
        if not self.is_main:
            return
        self._replaced = [n for n in ("metrics.json", WEIGHTS_FILE) if os.path.isfile(os.path.join(self.save_path, n))]
        if not self._replaced:
            return
        self.log(f"note: --overwrite: the finished run's {' and '.join(self._replaced)} in {self.save_path} stay "
                 f"until this run writes its first checkpoint, then they are removed")
        tracked = tracked_by_git(self.save_path, self._replaced)
        if tracked:
            self.log(f"note: {', '.join(tracked)} {'is' if len(tracked) == 1 else 'are'} tracked by git; this run "
                     f"replaces {'it' if len(tracked) == 1 else 'them'} (git checkout -- {self.save_path} brings the "
                     f"committed files back)")

    def _clear_results(self):
        """Remove the overwritten run's results (see _plan_replace), once."""
        for name in self._replaced:
            if os.path.isfile(os.path.join(self.save_path, name)):
                os.unlink(os.path.join(self.save_path, name))
        self._replaced = []

    def publish(self, task, model, record):
        """Finish a run that trains nothing (a training-free defence): score `model` once, write metrics.json
        (history: that one evaluation, as epoch 0) and weights.pth holding `record`."""
        self.task = task
        task.setup(self)
        self.model = self.to_device(model)
        self.num_params = sum(p.numel() for p in model.parameters())
        self.history, self.train_time, self.images_seen = [], 0.0, 0
        self.commit = git_commit()
        self.export_record = record
        self._plan_replace()
        if self.is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(self.save_path, "tb"))
        wall0 = time.time()
        acc, diag = self.evaluate()
        self._clear_results()
        self.history = [dict({"epoch": 0, "test_acc": acc}, **{f"test_{k}": v for k, v in diag.items()})]
        self.best_acc, self.best_epoch = acc, 0
        self.log(f"{self.script}: {self.cfg['model']} answering through a training-free defence, nothing trained; "
                 f"test acc {acc:.2f} " + " ".join(f"{k}={v:.3f}" for k, v in diag.items()))
        return self.finish(time.time() - wall0)

    def begin_epoch(self, epoch, start_step, steps, bar=True):
        """Reset the epoch's running sums (kept on the device) and open its progress bar (bar=False: the
        caller draws one, as a battery does for all its students)."""
        self.model.train()
        dev = self.device
        self._ep = {"epoch": epoch, "start": start_step, "steps": steps, "sums": {}, "seen": 0,
                    "correct": torch.zeros((), device=dev), "lr": self.cfg["lr"], "n": 0,
                    "first_bad": torch.full((), -1, device=dev, dtype=torch.long), "t0": time.time()}
        self._bar = None
        if self.is_main and bar:
            from tqdm import tqdm
            self._bar = tqdm(total=steps, initial=start_step, desc=f"epoch {epoch + 1}/{self.cfg['epochs']}",
                             dynamic_ncols=True, leave=False, mininterval=1.0 if sys.stderr.isatty() else 30.0)

    def close_bar(self):
        """Close the epoch's progress bar, if open (before a line is logged under it)."""
        if getattr(self, "_bar", None) is not None:
            self._bar.close()
            self._bar = None

    def train_step(self, step, batch):
        """One optimisation step of the model (and its joint parts) on `batch`, step `step` of the epoch."""
        cfg, task, ep = self.cfg, self.task, self._ep
        epoch, steps, start_step = ep["epoch"], ep["steps"], ep["start"]
        self.progress = epoch + step / steps  # in epochs; tasks read it for warm-ups
        ep["lr"] = self.set_lr(self.progress)
        with self.autocast():
            terms, logits, targets = task.loss(batch)
        loss = sum(terms.values())
        optimizers = [self.optimizer] + [p.optimizer for p in self.parts.values() if p.joint]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        self._reduce_part_grads()
        for opt in optimizers:
            if self.scaler:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler:
            self.scaler.update()
        task.after_step(self, step)
        self.global_step += 1
        sums = ep["sums"]
        with torch.no_grad():  # accumulate on the device: no host sync per step
            loss = loss.detach().float()
            diverged = ~torch.isfinite(loss) | (loss.abs() > LOSS_LIMIT)
            ep["first_bad"] = torch.where(diverged & (ep["first_bad"] < 0), step, ep["first_bad"])
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            sums["loss"] = sums.get("loss", 0) + loss
            if logits is not None:
                ep["correct"] += (logits.argmax(1) == targets).sum()
                ep["seen"] += targets.shape[0]
        n = batch[0].shape[0] if isinstance(batch, (tuple, list)) else cfg["batch_size"] // self.world_size
        ep["n"] = n
        self.images_seen += n * self.world_size
        done = step + 1 - start_step
        if done % cfg["log_every"] == 0 or step + 1 == steps or self._stop_signal is not None:
            self._check_finite(ep["first_bad"], epoch)
            if self._bar is not None:
                vals = {k: (v / done).item() for k, v in sums.items()}
                post = {"loss": f"{vals['loss']:.3f}"}
                if ep["seen"]:
                    post["acc"] = f"{100 * ep['correct'].item() / ep['seen']:.1f}"
                post["img/s"] = f"{n * self.world_size * done / (time.time() - ep['t0']):.0f}"
                self._bar.set_postfix(post)
                self._bar.update(done - (self._bar.n - start_step))

    def end_epoch_train(self):
        """The epoch's training row (mean loss terms, train accuracy, lr, images/s), averaged over ranks."""
        cfg, ep, dev = self.cfg, self._ep, self.device
        sums, steps, start_step = ep["sums"], ep["steps"], ep["start"]
        elapsed = time.time() - ep["t0"]
        self.train_time += elapsed
        done = max(steps - start_step, 1)
        red = self.all_reduce(torch.stack([v / done for v in sums.values()] +
                                          [ep["correct"], torch.tensor(float(ep["seen"]), device=dev)]).float())
        vals = (red / torch.tensor([self.world_size] * len(sums) + [1, 1], device=dev)).tolist()
        self._epoch_row = {"epoch": ep["epoch"] + 1, "lr": ep["lr"] if steps else cfg["lr"],
                           "train_img_per_s": round(done * cfg["batch_size"] / elapsed, 1)}
        self._epoch_row.update({f"train_{k}": v for k, v in zip(sums, vals[:len(sums)])})
        if vals[-1]:
            self._epoch_row["train_acc"] = 100.0 * vals[-2] / vals[-1]

    def _reduce_part_grads(self):
        """DDP averages the model's gradients; a joint part's are averaged here, so every rank steps alike."""
        if self.world_size == 1:
            return
        for part in self.parts.values():
            if part.joint:
                for p in part.module.parameters():
                    if p.grad is not None:
                        self.all_reduce(p.grad).div_(self.world_size)

    def _check_finite(self, first_bad, epoch):
        bad = int(self.all_reduce(first_bad.clone().clamp(min=-1) + 1).item())
        if bad > 0:
            step = int(first_bad.item())
            msg = (f"loss became NaN/inf (or above {LOSS_LIMIT:g}) at epoch {epoch + 1}, step {step + 1}; the likely "
                   f"cause is a learning rate too high for this model (lr={self.cfg['lr']}) or a loss weight "
                   f"too large; lower --lr and start again (the last good checkpoint in {self.save_path} is kept)")
            raise UserError(msg)

    def _check_weights(self, name):
        """Never write a checkpoint of NaN/inf weights: an update can diverge after a finite loss."""
        for key, value in unwrap(self.model).state_dict().items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise UserError(f"weights became NaN/inf ({key}) before {name} was written; the likely cause is a "
                                f"learning rate too high for this model (lr={self.cfg['lr']}) or a loss weight too "
                                f"large; lower --lr and start again (the last good checkpoint in {self.save_path} "
                                f"is kept)")

    def save_stopped(self, epoch, step, how=None):
        """last.pth at (epoch, step) after a stop signal, and the line that says how to resume."""
        self.save("last.pth", epoch, step)
        name = signal.Signals(self._stop_signal).name
        how = how or f"python {self.script} --save_path {self.save_path} --resume"
        self.log(f"stopped by {name} at epoch {epoch + 1}, step {step}; last.pth written. Resume with: {how}")

    @torch.no_grad()
    def evaluate(self, model=None, loader=None, diagnostics=True):
        """Top-1 accuracy (%) on the test loader, and the task's diagnostics averaged per image."""
        model = model or self.model
        loader = loader or self.loaders["test"]
        was_training = model.training
        model.eval()
        correct = torch.zeros((), device=self.device)
        total = torch.zeros((), device=self.device)
        diag = {}
        for x, y in loader:
            with self.autocast():
                logits = model(x)
            logits = logits.float()
            correct += (logits.argmax(1) == y).sum()
            total += y.shape[0]
            if diagnostics:
                for k, v in self.task.eval_batch(x, logits, y).items():
                    diag[k] = diag.get(k, 0) + v.float()
        keys = list(diag)
        red = self.all_reduce(torch.stack([correct, total] + [diag[k] for k in keys]))
        vals = red.tolist()
        model.train(was_training)
        return 100.0 * vals[0] / vals[1], {k: v / vals[1] for k, v in zip(keys, vals[2:])}

    @torch.no_grad()
    def predict(self, model):
        """(logits float32, labels) of the whole test split, on the CPU; every rank computes all of it."""
        loader = self.loaders["test"]
        was_training = model.training
        model.eval()
        out = []
        for i in range(0, len(loader.labels), loader.batch_size):
            with self.autocast():
                out.append(model(loader.normalise(loader.images[i:i + loader.batch_size])).float().cpu())
        model.train(was_training)
        return torch.cat(out), loader.labels.cpu()

    def close_epoch(self, epoch):
        """Evaluate after an epoch's training, log the row, write best.pth and last.pth, log.csv and TensorBoard."""
        row = self._epoch_row
        epochs, every = self.cfg["epochs"], self.cfg.get("eval_every", 1)
        acc = None
        if (epoch + 1) % every == 0 or epoch + 1 == epochs:  # the last epoch is always scored
            acc, diag = self.evaluate()
            row["test_acc"] = acc
            row.update({f"test_{k}": v for k, v in diag.items()})
        self.task.end_epoch(self, epoch, row)
        self.history.append(row)
        improved = acc is not None and acc > self.best_acc
        if improved:
            self.best_acc, self.best_epoch = acc, epoch + 1
        # best.pth first: if the run dies between the two writes, last.pth still holds the previous epoch, so
        # --resume runs this epoch again and rewrites both (written the other way round, best.pth would be lost)
        if improved:
            self.save("best.pth", epoch + 1, 0)
        self.save("last.pth", epoch + 1, 0)
        if self.is_main:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k.replace("_", "/", 1), v, epoch + 1)
            self.tb.flush()
            self._write_csv()
        extra = " ".join(f"{k}={v:.3f}" for k, v in diag.items()) if acc is not None else ""
        train_acc = f"train_acc {row['train_acc']:.2f} " if "train_acc" in row else ""  # DFAD has no labels
        test_acc = f"test_acc {acc:.2f} " if acc is not None else ""
        self.log(f"epoch {epoch + 1}/{self.cfg['epochs']}: loss {row.get('train_loss', float('nan')):.4f} "
                 f"{train_acc}{test_acc}"
                 f"{row['train_img_per_s']:.0f} img/s {extra}".rstrip())

    def _write_csv(self):
        keys = []
        for row in self.history:
            keys += [k for k in row if k not in keys]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys)
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(os.path.join(self.save_path, "log.csv"), buf.getvalue())

    def finish(self, wall):
        """metrics.json and weights.pth of a finished run (wall: its wall seconds); returns the metrics."""
        last = self.history[-1] if self.history else {}
        metrics = {
            "script": self.script, "model": self.cfg["model"], "dataset": self.cfg["dataset"],
            "final_acc": last.get("test_acc"), "best_acc": self.best_acc, "best_epoch": self.best_epoch,
            "epochs": self.cfg["epochs"], "params": self.num_params,
            "wall_time_s": round(wall, 1), "train_time_s": round(self.train_time, 3),  # ms: a tiny run is timed too
            "images_per_s": round(self.images_seen / max(self.train_time, 1e-9), 1),
            "seed": self.cfg["seed"], "batch_size": self.cfg["batch_size"], "world_size": self.world_size,
            "device": str(self.device), "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
            "torch": torch.__version__, "processor": processor(self.device), "git_commit": self.commit,
            "protocol": PROTOCOL,
            "final_diagnostics": {k[5:]: v for k, v in last.items() if k.startswith("test_") and k != "test_acc"},
            "config": self.cfg, "history": self.history,
        }
        # the final model's test logits, kept for the task's metrics() so no one predicts them twice
        self.final_logits, self.final_labels = self.predict(self.model)
        metrics["final_ece"] = float(expected_calibration_error(self.final_logits, self.final_labels))
        train_loader = self.loaders.get("train")
        if getattr(train_loader, "thief", None) is not None:
            metrics["thief"] = train_loader.thief
        metrics.update(self.task.metrics())
        metrics.update(self.notes)
        metrics["inputs"] = self.inputs
        metrics["weights_file"] = WEIGHTS_FILE
        if self.is_main:  # the weights first: a metrics.json on disk always has its weights beside it
            record = self.export_record or model_record(self.model, self.cfg["model"], self.cfg["dataset"])
            metrics["weights_sha256"] = export_weights(os.path.join(self.save_path, WEIGHTS_FILE), record)
            atomic_write_json(os.path.join(self.save_path, "metrics.json"), metrics)
            self.tb.close()
            self.log(f"done: final test acc {metrics['final_acc']:.2f} (best {self.best_acc:.2f} at epoch "
                     f"{self.best_epoch}), {metrics['wall_time_s']:.0f} s, {metrics['images_per_s']:.0f} img/s; "
                     f"metrics in {os.path.join(self.save_path, 'metrics.json')}")
        if self.world_size > 1:
            dist.barrier()
        return metrics


class Member:
    """One run in the loop: its engine, its task, where it starts (engine.begin's (epoch, step, steps per
    epoch)) and its own global RNG state, swapped in around its own work so that runs sharing the loop do
    not draw from one another's stream (for a lone run the swap changes nothing)."""

    def __init__(self, engine, task, start):
        self.engine, self.task, self.start = engine, task, start
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(engine.device) if engine.device.type == "cuda" else None

    @contextlib.contextmanager
    def own_rng(self):
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng, self.engine.device)
        try:
            yield
        finally:
            self.rng = torch.get_rng_state()
            if self.cuda_rng is not None:
                self.cuda_rng = torch.cuda.get_rng_state(self.engine.device)


def train_together(members, resume_how=None):
    """The training loop, for a lone run (Engine.fit: a battery of one) and for a battery (utils/battery.py):
    every member trains on the same batches, drawn by the first member's task, to the end of the schedule.
    Returns their metrics, in order.

    Members may start at different (epoch, step): a battery stopped hard (killed between one student's
    checkpoint and the next's) resumes with its students an epoch apart. The loop starts at the earliest, and
    each member joins it at its own start; the batches of an epoch depend only on the seed and the epoch
    (utils/data.py), so a member that joins late trains on what its lone run would have seen.

    Each epoch: every member's training steps, batch by batch; then every member's train row (so one
    member's evaluation is not in another's epoch time); then each one's evaluation, log and checkpoints.
    A stop (SIGTERM/SIGINT, or a task's engine.request_stop) stops every member after the current step;
    each one that has started writes last.pth and logs how to resume (resume_how: the command line;
    default, its own run's), then the process exits with 128 + the signal (a member still waiting for its
    start keeps the last.pth it resumed from). A second signal stops at once.
    """
    steps = members[0].start[2]
    if any(m.start[2] != steps for m in members):
        raise ValueError("the members of one loop have one number of steps per epoch")
    start_epoch, start_step = min(m.start[:2] for m in members)
    lead = members[0]
    engines = [m.engine for m in members]
    epochs = lead.engine.cfg["epochs"]
    alone = len(members) == 1  # a lone run draws its own progress bar; a battery one bar for all
    active = []  # the members that have joined the loop, in the order of `members`

    def on_signal(signum, frame):
        if any(e.stop_signal is not None for e in engines):  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        for e in engines:
            e.request_stop(signum)

    def join(epoch, step):
        new = [m for m in members if m not in active and m.start[:2] == (epoch, step)]
        for m in new:
            m.engine.begin_epoch(epoch, step, steps, bar=alone)
        if new:
            active[:] = [m for m in members if m in active or m in new]
        return bool(new)

    restore = catch_stop_signals(on_signal)
    bar = None
    wall0 = time.time()
    try:
        for epoch in range(start_epoch, epochs):
            first = start_step if epoch == start_epoch else 0
            for m in active:
                m.engine.begin_epoch(epoch, first, steps, bar=alone)
            t0 = time.time()
            for step, batch in enumerate(lead.task.train_batches(lead.engine, epoch, first), start=first):
                if (join(epoch, step) or step == first) and not alone and lead.engine.is_main:
                    bar = _closed(bar, [])  # a new epoch, or a member joined: the bar counts from here
                    from tqdm import tqdm
                    bar = tqdm(total=steps, initial=step, desc=f"battery of {len(active)}: epoch {epoch + 1}/{epochs}",
                               dynamic_ncols=True, leave=False, mininterval=1.0 if sys.stderr.isatty() else 30.0)
                for m in active:
                    with m.own_rng():
                        m.engine.train_step(step, batch)
                if bar is not None:
                    bar.update(1)
                    if (step + 1 - first) % lead.engine.cfg["log_every"] == 0:
                        each = len(batch[1]) * (step + 1 - first) / (time.time() - t0)
                        bar.set_postfix({"img/s each": f"{each:.0f}", "all": f"{each * len(active):.0f}"})
                signum = next((e.stop_signal for e in engines if e.stop_signal is not None), None)
                if signum is not None:
                    bar = _closed(bar, engines)  # so the resume lines are not printed onto a bar
                    for m in active:
                        m.engine.request_stop(signum)
                        with m.own_rng():
                            m.engine.save_stopped(epoch, step + 1, resume_how)
                    sys.exit(128 + signum)
            join(epoch, steps)  # one stopped after the epoch's last step, before its evaluation
            bar = _closed(bar, engines)
            for m in active:
                m.engine.end_epoch_train()
            for m in active:
                with m.own_rng():
                    m.engine.close_epoch(epoch)
        wall = time.time() - wall0
        results = []
        for m in members:
            with m.own_rng():
                results.append(m.engine.finish(wall))
        return results
    finally:
        _closed(bar, engines)
        restore()


def _closed(bar, engines):
    """Close the battery's bar and every engine's own; returns None, the bar's new value."""
    if bar is not None:
        bar.close()
    for e in engines:
        e.close_bar()
    return None


def cross_entropy(logits, targets, label_smoothing=0.0):
    """CE in float32 (safe under autocast)."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
