"""One exception type for bad user input, and the wrapper that turns it into one line and exit code 2."""
import functools
import sys


class UserError(Exception):
    """A problem the user can fix (bad config, missing file, mismatched checkpoint). Printed as one line."""


def cli_main(fn):
    """Decorate a script's main(): UserError -> 'error: ...' on stderr and exit 2, never a traceback. The folder
    locks main() took (utils/lock.py) are released however it ends."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from . import lock
        taken = len(lock.held())
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            msg = " ".join(str(e).split())  # keep it on one line
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)
        finally:
            lock.release_since(taken)

    return wrapper
