"""Command-line plumbing shared by the entry points: value parsers and the error boundary."""

import argparse
import errno
import functools
import math
import numbers
import re
import sys
import traceback

from utils.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, UserError

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_FRACTION = re.compile(rf"\s*({_NUMBER})\s*(?:/\s*({_NUMBER})\s*)?")
_FRACTION_FORMS = "a non-negative number such as 0.0314 or a fraction such as 8/255"


def parse_fraction(text, name: str = "value") -> float:
    """Read ε or α written as ``8/255``, ``0.0314`` or given as a number; no ``eval``."""
    if isinstance(text, bool):
        value = math.nan  # a flag passed by mistake must not read as 0 or 1
    elif isinstance(text, numbers.Real):
        value = float(text)
    elif isinstance(text, str):
        match = _FRACTION.fullmatch(text)
        if match is None:
            value = math.nan
        else:
            numerator = float(match.group(1))
            denominator = 1.0 if match.group(2) is None else float(match.group(2))
            value = numerator / denominator if denominator != 0 else math.nan
    else:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{name} {text!r} is not valid; write {_FRACTION_FORMS}.")
    return value


def fraction(text):
    """argparse type for ε and α: '8/255' or '0.0314'."""
    try:
        return parse_fraction(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def resolve_sizes(regime: str, eps: float, alpha=None, test_eps=None, test_alpha=None):
    """``(alpha, test_eps, test_alpha)`` with the unset ones (None) given by the one rule of both
    stages: the training step is 1.25 ε for FGSM-RS (fat; Wong et al. 2020) and ε/4 for PGD (the
    paper's 2/255 at ε = 8/255); robust evaluation attacks at the training radius, with PGD's ε/4."""
    if alpha is None:
        alpha = 1.25 * eps if regime == "fat" else eps / 4
    if test_eps is None:
        test_eps = eps
    if test_alpha is None:
        test_alpha = test_eps / 4
    return alpha, test_eps, test_alpha


def positive_int(text):
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got '{text}'")
    return value


def int_list(text):
    """'50,75' -> [50, 75]; '' -> []."""
    try:
        return [int(v) for v in str(text).replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 50,75, got '{text}'") from None


def class_list(text):
    """'0-4' or '5,6,7' -> a list of class labels."""
    out = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected classes like 0-4 or 5,6,7, got '{text}'") from None
    if len(set(out)) != len(out) or not out:
        raise argparse.ArgumentTypeError(f"class list '{text}' is empty or repeats a class")
    return out


def shows_default(action):
    """Whether ``--help`` says the default of ``action`` by itself: an option taking a value, not
    required, with a default that is a value (a None default depends on other flags, so its help
    text must say what is used)."""
    return (bool(action.option_strings) and action.nargs != 0 and not action.required
            and action.help is not argparse.SUPPRESS and action.default not in (None, argparse.SUPPRESS)
            and "default" not in (action.help or "").lower())


class _ShowDefaults:
    """Help formatter mixin: an option whose help does not state its default gets "(default: X)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not shows_default(action):
            return text
        value = ",".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {value})" if text else f"default: {value}"


class ArgumentParser(argparse.ArgumentParser):
    """The project's command-line parser: a flag is read only by its full name, so a misspelt
    ``--see 7`` is an error rather than ``--seed 7``, a usage error is one line naming the
    problem with a pointer to ``--help`` (exit status 2), and ``--help`` shows every option's default."""

    def __init__(self, *args, **kwargs):
        base = kwargs.pop("formatter_class", argparse.HelpFormatter)
        kwargs["formatter_class"] = type(f"ShowDefaults{base.__name__}", (_ShowDefaults, base), {})
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        message = " ".join(str(message).split()).rstrip(".")
        self.exit(EXIT_USER_ERROR, f"error: {message}; see {self.prog} --help\n")


def given_flags(parser, argv=None):
    """The flags given on the command line ``argv`` (default ``sys.argv[1:]``): dest -> the option
    string as typed (an alias such as ``--train_steps`` counts for its dest).

    Read from the arguments themselves, not by comparing values with defaults, so a flag given
    with its default value counts as given. Exact option strings only: the project's parser
    takes no abbreviations, and argparse reads such a string as that option wherever it stands.
    """
    options = {option: action.dest for action in parser._actions for option in action.option_strings}
    given = {}
    for token in sys.argv[1:] if argv is None else argv:
        if token == "--":
            break
        option = token.split("=", 1)[0] if token.startswith("--") else token
        if option in options:
            given.setdefault(options[option], option)
    return given


@functools.lru_cache(maxsize=None)
def _built(build_parser):
    return build_parser()


def flag_applies_in(build_parser, scope, context_keys, name, context):
    """Whether the flag ``name`` (a dest such as ``train_steps`` or an option string) of the parser
    ``build_parser()`` has an effect on a run described by ``context``, and where it applies:
    (bool, text). ``scope`` is as in refuse_flags_without_effect.

    ``context`` holds some of ``context_keys``; the others take the parser's defaults. A required
    flag left out (default None) is unknown, and a flag whose rule needs it is taken to apply.
    """
    parser = _built(build_parser)
    options = {option: action.dest for action in parser._actions for option in action.option_strings}
    dest = options.get(name, name)
    if dest not in options.values():
        raise UserError(f"'{name}' is not a flag of {parser.prog}.")
    unknown = sorted(set(context) - set(context_keys))
    if unknown:
        raise TypeError(f"unknown run context {', '.join(unknown)}; known: {', '.join(context_keys)}")
    if dest not in scope:
        return True, "applies to every run"
    applies, where = scope[dest]
    return bool(applies({**{k: parser.get_default(k) for k in context_keys}, **context})), where


def refuse_flags_without_effect(parser, argv, scope, context):
    """Raise one UserError naming every flag given in ``argv`` that has no effect on this run.

    ``scope``: dest -> (``applies(context) -> bool``, where it applies, e.g. "applies only to
    --regime at"); dests not in ``scope`` apply to every run. Called at the end of a stage's
    parse_args, so nothing has been written yet."""
    refused = [(option, scope[dest][1]) for dest, option in given_flags(parser, argv).items()
               if dest in scope and not scope[dest][0](context)]
    if len(refused) == 1:
        option, where = refused[0]
        raise UserError(f"{option} has no effect on this run: it {where}; drop it.")
    if refused:
        by_where = {}
        for option, where in refused:
            by_where.setdefault(where, []).append(option)
        listed = "; ".join(f"{', '.join(options)}: {where}" for where, options in by_where.items())
        raise UserError(f"{', '.join(o for o, _ in refused)} have no effect on this run ({listed}); drop them.")


_ENVIRONMENT_FIXES = {
    errno.ENOSPC: "free space on that file system (or choose another --save-dir)",
    errno.EDQUOT: "free space within your disk quota (or choose another --save-dir)",
    errno.EROFS: "the file system is read-only; choose a writable --save-dir",
    errno.EACCES: "fix the permissions of that path (or choose another --save-dir)",
    errno.EPERM: "fix the permissions of that path (or choose another --save-dir)",
}


def environment_error_message(exc):
    """One line for a full disk, an exceeded quota, a read-only file system or a permission
    problem (None for any other OSError). Every file is written atomically, so what was saved
    before the failure is intact and the same command resumes once the cause is fixed."""
    fix = _ENVIRONMENT_FIXES.get(getattr(exc, "errno", None))
    if fix is None:
        return None
    reason = exc.strerror or errno.errorcode.get(exc.errno, str(exc.errno))
    where = f"cannot write '{exc.filename}'" if exc.filename else "a file could not be written"
    if exc.errno in (errno.EACCES, errno.EPERM):
        where = f"cannot write or read '{exc.filename}'" if exc.filename else "a file could not be written or read"
    return f"{where}: {reason}; {fix}, then rerun the same command (files written before this are intact)."


def run_main(main, argv=None):
    """Call ``main(argv)``; turn a UserError into one line on stderr and exit status 2."""
    try:
        return main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint.", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        message = environment_error_message(exc)
        if message is None:
            traceback.print_exc()
            sys.exit(1)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except Exception as exc:
        if isinstance(exc, Preempted):  # a requested stop, not a failure: the scheduler requeues on this status
            print(f"{exc}; the state is saved: rerun the same command to resume from this step.", file=sys.stderr,
                  flush=True)
            sys.exit(EXIT_PREEMPTED)
        traceback.print_exc()
        sys.exit(1)


_LABEL = re.compile(r"[A-Za-z0-9._-]+")


def label(text):
    """argparse type for a label that names folders (--pretrain): letters, digits, '.', '_' and '-'
    only, and not '.' or '..', so it can never lead a path out of the folder it is put in."""
    text = str(text)
    if not _LABEL.fullmatch(text) or text in (".", ".."):
        raise argparse.ArgumentTypeError(f"label {text!r} is not a name: use letters, digits, '.', '_' and '-' "
                                         "only (e.g. std, fat, at), and not '.' or '..'")
    return text
