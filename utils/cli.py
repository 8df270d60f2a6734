"""Command-line plumbing shared by the entry points: value parsers and the error boundary."""

import argparse
import sys
import traceback

from utils.errors import EXIT_USER_ERROR, UserError


def fraction(text):
    """argparse type for ε and α: '8/255' or '0.0314'."""
    from attacks import parse_fraction
    try:
        return parse_fraction(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors also exit with status 2 and one clear line (argparse's default)."""


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
    except Exception:
        traceback.print_exc()
        sys.exit(1)
