"""What both command lines share: one line per error, validated values, clean-up on SIGTERM.

Every failure a user can cause ends as ``error: <what, where, what was expected>`` on stderr and exit
status 2 (click's usage errors included, which click itself prints over several lines). Anything
else is a bug of ours: still one line, exit status 1, and ``EMMA_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import traceback

import click

from .bundle import BundleError
from .images import ImageError
from .limits import RequestError
from .paths import UnsafePathError

# failures of the user's input, files or machine (as opposed to bugs of ours)
USER_ERRORS: tuple[type[BaseException], ...] = (BundleError, RequestError, ImageError, UnsafePathError, OSError, MemoryError)


def fail(msg: str, code: int = 2):
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def _on_sigterm(signum, frame):
    # SystemExit unwinds through every ``finally``/``except BaseException``: temporary folders are removed
    raise SystemExit(128 + signum)


class OneLineGroup(click.Group):
    """A click group whose every error is one ``error:`` line (see the module docstring)."""

    user_errors: tuple[type[BaseException], ...] = USER_ERRORS

    def main(self, args=None, prog_name=None, **extra):  # noqa: D401 - click's entry point
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as e:  # a bare group: its help, as click would print it
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.ClickException as e:
            fail(_one_line(e.format_message()), 2)
        except click.exceptions.Abort:
            fail("interrupted", 130)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except SystemExit:
            raise
        except self.user_errors as e:
            fail(_one_line(_describe(e)), 2)
        except Exception as e:  # noqa: BLE001 - a bug: still one line, and the traceback on request
            if os.environ.get("EMMA_DEBUG"):
                traceback.print_exc()
            fail(f"internal error ({type(e).__name__}: {_one_line(str(e))[:300]}); EMMA_DEBUG=1 shows the traceback", 1)


def _describe(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "out of memory (the request or model is larger than this machine can hold)"
    if isinstance(e, OSError) and e.filename and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


class Finite(click.ParamType):
    """A float that is finite and inside [lo, hi] (``lo`` excluded with ``open_lo``): click's FloatRange
    lets NaN through, since every comparison with NaN is false."""

    name = "number"

    def __init__(self, lo: float = -math.inf, hi: float = math.inf, open_lo: bool = False):
        self.lo, self.hi, self.open_lo = lo, hi, open_lo

    def convert(self, value, param, ctx):
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if v < self.lo or v > self.hi or (self.open_lo and v == self.lo):
            lo = f"> {self.lo:g}" if self.open_lo else f">= {self.lo:g}"
            hi = "" if self.hi == math.inf else f" and <= {self.hi:g}"
            self.fail(f"{v:g} is out of range: must be {lo}{hi}", param, ctx)
        return v
