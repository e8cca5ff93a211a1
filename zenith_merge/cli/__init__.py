"""The `zenith-merge` command: subcommands over the library. The only package that prints and exits.

Exit codes: 0 success, 1 a check failed (smoke test, update-config --check) or an internal error,
2 a user error (bad config, unreadable checkpoint, full disk, ...), 130 interrupted.
"""

from __future__ import annotations

import logging
import sys

from ..errors import ZenithError, from_os_error
from .parser import build_parser

__all__ = ["build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `zenith-merge` console script.

    Every error a user can act on (a `ZenithError`, or an OSError: permission, full disk) is one line and
    exit 2. Anything else is a bug: one line saying so, the traceback in a file (printed with --verbose),
    exit 1.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.fn(args)
    except ZenithError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {from_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun with --resume to continue", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: say so in one line, keep the traceback for the report
        return _internal_error(err, verbose=args.verbose)


def _internal_error(err: Exception, *, verbose: bool) -> int:
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(err))
    with tempfile.NamedTemporaryFile("w", prefix="zenith-merge-error-", suffix=".txt", delete=False) as f:
        f.write(text)
    if verbose:
        print(text, file=sys.stderr, end="")
    print(f"internal error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} (a zenith-merge "
          f"bug; the traceback is in {f.name}: please report it)", file=sys.stderr)
    return 1
