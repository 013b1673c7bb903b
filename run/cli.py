"""The command line of ldalign.py and the tools: --key value options, --help, and what the user can act on as one line.

    cfg = dict(DEFAULTS, **read_overrides(argv, DEFAULTS, help_text))   # --key value, typed like the default
    help_text = __doc__ + defaults_help(__file__)   # --help: the commented DEFAULTS block of a script
    report_errors(main)        # a UserError or SystemExit("..."), a NaN stop, a full disk -> "error: ..." on one
                               # line, exit status 2; ctrl-C -> one line saying how to resume, exit status 130
"""
import ast
import errno
import os
import shutil
import sys


class UserError(ValueError):
    """A mistake in the input or the settings that the user can fix (a bad path, line or value). The command line
    reports it as one line naming the option or file:line, with exit status 2 and no traceback (report_errors);
    settings checks raise SystemExit(message), reported the same way. Anything else is a bug and keeps its traceback."""


_LOG = []  # the run's log.txt, once RunDir knows it: user errors are written there too

# Exit status of a run stopped by ctrl-C (KeyboardInterrupt): 128 + SIGINT, what a shell reports for it
INTERRUPTED = 130
RESUME = "rerun the same command to resume from the last saved step or finished stage"


def log_errors_to(path):
    """Append the user errors that report_errors prints to `path` too (the run folder's log.txt)."""
    _LOG[:] = [path]


def report_errors(main, argv=None):
    """Run main(argv). What the user can act on becomes one line on stderr (and in log.txt), without a traceback:
    a user error (UserError, SystemExit("...")), a NaN stop (dpo's FloatingPointError, whose message says what to
    lower) and a full disk (disk_full), exit status 2; ctrl-C, exit status INTERRUPTED, saying that the same command
    resumes. Anything else is a bug and keeps its traceback. Under torchrun every rank meets the same error, and only
    rank 0 reports it; train.sh sets LDALIGN_ERROR_FILE, where the line goes instead, and prints it after the
    launcher's own failure report, as the last line the user sees."""
    try:
        main(argv)
    except KeyboardInterrupt:
        _report(f"interrupted (ctrl-C); what was stored is kept: {RESUME}")
        raise SystemExit(INTERRUPTED) from None
    except (UserError, SystemExit) as e:
        msg = str(e) if isinstance(e, UserError) else e.code
        if not isinstance(msg, str):  # SystemExit(0) of --help, or a plain exit status
            raise
        _report(f"error: {msg}")
        raise SystemExit(2) from None
    except FloatingPointError as e:
        _report(f"error: {e}")
        raise SystemExit(2) from None
    except Exception as e:
        # a full disk met outside rundir.atomic_path (which names what it was writing): log.txt, say
        if not disk_full(e):
            raise
        _report(f"error: {disk_full_message(_filename(e) or 'the run folder')}")
        raise SystemExit(2) from None


def _report(line):
    """`line` on stderr (LDALIGN_ERROR_FILE under train.sh) and in log.txt, by rank 0 only."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if os.environ.get("LDALIGN_ERROR_FILE"):
        with open(os.environ["LDALIGN_ERROR_FILE"], "w") as f:
            f.write(line + "\n")
    else:
        print(line, file=sys.stderr, flush=True)
    if _LOG:
        try:
            with open(_LOG[0], "a") as f:
                f.write(line + "\n")
        except OSError:  # a full disk, say: the line on stderr is what matters
            pass


# Free bytes under which a filesystem counts as full: what is left when a write failed for want of space
FULL_BELOW = 1 << 20


def disk_full(exc, folder=None):
    """Did the exception `exc` come from a full disk? An OSError ENOSPC anywhere in its chain (__cause__,
    __context__), or "No space left on device" in one of their messages (safetensors' error, DCP's report of its
    ranks' errors); or, for writers whose errors do not say it (torch's zip writer in a step checkpoint: "unexpected
    pos ..."), fewer than FULL_BELOW bytes free on the filesystem of `folder` (None: not looked at)."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        todo += [e.__cause__, e.__context__]
    while folder and not os.path.isdir(folder):  # (a folder not made yet: the nearest one that is)
        folder = os.path.dirname(folder)
    try:
        return bool(folder) and shutil.disk_usage(folder).free < FULL_BELOW
    except OSError:
        return False


class DiskFull(UserError):
    """A write stopped by a full disk (rundir.atomic_path): one line naming what was written, exit status 2."""


def disk_full_message(what):
    """The one line of a full disk met while writing `what`."""
    return (f"the disk is full (no space left on device) while writing {what}; nothing stored was lost (an "
            f"unfinished write is removed): free some space, then {RESUME}")


def _filename(exc):
    """The file named by an OSError in the chain of `exc` (None if none is)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.filename:
            return exc.filename
        exc = exc.__cause__ or exc.__context__
    return None


def read_overrides(argv, defaults, help_text):
    """`--key value`, `--key=value` or a bare `--flag` (= true), keys checked against `defaults`, values typed
    like the default. -h / --help prints help_text."""
    if "-h" in argv or "--help" in argv:
        print(help_text)
        raise SystemExit(0)
    raw, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            raise SystemExit(f"bad argument {a!r}: use --key value (keys: {', '.join(defaults)})")
        if "=" in a:
            k, v = a[2:].split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            k, v = a[2:], argv[i + 1]
            i += 2
        else:
            k, v = a[2:], "true"  # bare flag
            i += 1
        if k not in defaults:
            raise SystemExit(f"unknown option --{k}; known: {', '.join(defaults)}")
        d = defaults[k]
        if isinstance(d, bool):
            if v.lower() not in ("1", "0", "true", "false"):
                raise SystemExit(f"--{k} takes true/false, got {v!r}")
            raw[k] = v.lower() in ("1", "true")
        else:
            try:
                raw[k] = type(d)(v)
            except ValueError:
                raise SystemExit(f"--{k} takes a {type(d).__name__}, got {v!r}") from None
    return raw


def defaults_help(path, name="DEFAULTS"):
    """The source of the assignment `name = ...` in the Python file `path`, with the comment lines right above it
    and every comment inside it: what --help prints, each default beside the comment that explains it. The
    assignment is found by Python's parser (ast), not by searching the text, so any edit of a comment or a
    default keeps it whole."""
    with open(path) as f:
        src = f.read()
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            lines = src.splitlines()
            first = node.lineno - 1
            while first > 0 and lines[first - 1].lstrip().startswith("#"):
                first -= 1
            return "\n".join(lines[first:node.end_lineno])
    raise ValueError(f"{path} has no assignment to {name}")
