"""One writer per folder: FOLDER/.lock, created with O_CREAT|O_EXCL and holding the writer's pid.

A lock whose process is gone (killed, crashed) is stale: the next writer takes it over and says so. Every
lock taken while a script's main() runs is released when it returns or exits (utils.errors.cli_main), and
at interpreter exit as a last resort.
"""
import atexit
import os

from .errors import UserError

LOCK_FILE = ".lock"

_held = []  # paths of the lock files this process holds, in the order taken


def _alive(pid):
    """Whether process `pid` exists and is not a zombie (a killed child not yet reaped holds no lock)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_pid(path):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def acquire(folder, what="run folder", log=print):
    """Take FOLDER/.lock for this process; UserError when another live process holds it.

    Taking a lock this process already holds is a no-op (a sweep's engine inside the sweep's own lock)."""
    path = os.path.abspath(os.path.join(folder, LOCK_FILE))
    if path in _held:
        return path
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid = _read_pid(path)
            if pid is not None and _alive(pid) and pid != os.getpid():
                raise UserError(f"{what} {folder} is in use by process {pid} (lock {path}); wait for it to end, or "
                                f"use another folder; if that process is not one of these scripts, delete the lock "
                                f"file") from None
            if pid is None:  # being written this instant, or left empty by a crash: look again once
                import time
                time.sleep(0.2)
                if _read_pid(path) is not None:
                    continue
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            log(f"note: took over the stale lock {path} of process {pid if pid is not None else '(unknown)'}, "
                f"which is gone")
            continue
        except OSError as e:
            raise UserError(f"cannot create the lock {path} ({e.strerror}); choose a writable folder") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        _held.append(path)
        return path
    raise UserError(f"cannot take the lock {path}: other processes keep taking it; run one writer at a time")


def release(path):
    if path in _held:
        _held.remove(path)
        if _read_pid(path) == os.getpid():
            try:
                os.unlink(path)
            except OSError:
                pass


def held():
    return list(_held)


def release_since(count):
    """Release the locks taken after the first `count` (cli_main: those of the main() call that ends)."""
    for path in reversed(_held[count:]):
        release(path)


atexit.register(lambda: release_since(0))
