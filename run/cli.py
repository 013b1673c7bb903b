"""The command line of ldalign.py and the tools: --key value options, --help, and user errors as one line.

    cfg = dict(DEFAULTS, **read_overrides(argv, DEFAULTS, help_text))   # --key value, typed like the default
    help_text = __doc__ + defaults_help(__file__)   # --help: the commented DEFAULTS block of a script
    report_errors(main)        # a UserError or SystemExit("...") -> "error: ..." on one line, exit status 2
"""
import ast
import os
import sys


class UserError(ValueError):
    """A mistake in the input or the settings that the user can fix (a bad path, line or value). The command line
    reports it as one line naming the option or file:line, with exit status 2 and no traceback (report_errors);
    settings checks raise SystemExit(message), reported the same way. Anything else is a bug and keeps its traceback."""


_LOG = []  # the run's log.txt, once RunDir knows it: user errors are written there too


def log_errors_to(path):
    """Append the user errors that report_errors prints to `path` too (the run folder's log.txt)."""
    _LOG[:] = [path]


def report_errors(main, argv=None):
    """Run main(argv); a user error becomes one line on stderr (and in log.txt), exit status 2. Under torchrun
    every rank meets the same error, and only rank 0 reports it; train.sh sets LDALIGN_ERROR_FILE, where the line
    goes instead, and prints it after the launcher's own failure report, as the last line the user sees."""
    try:
        main(argv)
    except (UserError, SystemExit) as e:
        msg = str(e) if isinstance(e, UserError) else e.code
        if not isinstance(msg, str):  # SystemExit(0) of --help, or a plain exit status
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            if os.environ.get("LDALIGN_ERROR_FILE"):
                with open(os.environ["LDALIGN_ERROR_FILE"], "w") as f:
                    f.write(f"error: {msg}\n")
            else:
                print(f"error: {msg}", file=sys.stderr, flush=True)
            if _LOG:
                with open(_LOG[0], "a") as f:
                    f.write(f"error: {msg}\n")
        raise SystemExit(2) from None


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
