"""The one error path of every script: a known error prints `error: <message>` on one line to stderr
and exits 2; anything else keeps its traceback (it is a bug to report, not a wrong input).

Why: a wrong input file, config key or path is the user's to fix, and the message already names the
file, line and field; a traceback above it is noise, and exit 1 reads like a crash.

Known errors:
  - the project's input errors (config, schema, store, checkpoint, evidence, builder, KB log, LLM
    endpoint), listed by name in `KNOWN_ERRORS` so this module imports none of them;
  - `ValueError`s raised by a `raise` statement of the project's own code (its input checks), not
    by a library or a failing expression;
  - missing / unreadable files (`FileNotFoundError`, `IsADirectoryError`, ...);
  - bad command-line values: argparse errors, `UsageError`, `SystemExit("message")`.
Set KBLAMPP_TRACEBACK=1 to get the traceback of a known error too.

Each script ends with
    if __name__ == "__main__":
        from kblampp.cli import run_main
        sys.exit(run_main(main))
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn, TextIO

EXIT_ERROR = 2
TRACEBACK_ENV = "KBLAMPP_TRACEBACK"
REPO = Path(__file__).resolve().parents[1]

KNOWN_ERRORS = frozenset({
    "kblampp.config.ConfigError", "kblampp.schema.SchemaError", "kblampp.store_io.StoreError",
    "kblampp.kb_params.KBCheckpointError", "kblampp.kv_encoder.KVEncoderError",
    "kblampp.evaluation.evidence.EvidenceError", "kblampp.builders.common.BuildError",
    "kblampp.serving.kb_log.KBLogError", "kblampp.synth.llm_client.LLMError", "kblampp.cli.UsageError",
})
FILE_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


class UsageError(ValueError):
    """A command-line value that parsed but cannot be used (the message names the flag)."""


def _class_names(err: BaseException) -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in type(err).__mro__}


def _raised_in_project(err: BaseException) -> bool:
    """True when a `raise` statement of the project's own code raised it (an input check), not a
    library or a failing expression (e.g. numpy's shape errors surface on the calling line)."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    where = Path(frames[-1].filename).resolve()
    own = where.is_relative_to(REPO) and not {"site-packages", ".venv"} & set(where.parts)
    return own and (frames[-1].line or "").lstrip().startswith("raise ")


def is_known(err: BaseException) -> bool:
    """Whether `err` is a user-facing error (one line, exit 2) rather than a bug (traceback)."""
    if _class_names(err) & KNOWN_ERRORS or isinstance(err, FILE_ERRORS):
        return True
    return isinstance(err, ValueError) and _raised_in_project(err)


def error_line(err: BaseException) -> str:
    """The one-line message: `path: reason` for OS errors, the first problem (+ how many more) otherwise."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    problems = getattr(err, "problems", None)
    if _class_names(err) & {"kblampp.schema.SchemaError"} and problems:
        first = problems[0].format(err.path)
        if len(problems) == 1:
            return first
        return (f"{first} (and {len(problems) - 1} more problem(s); list them all with "
                f"offline/sanity_check_5tuple.py {err.path})")
    text = str(err).strip() or type(err).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[0] if len(lines) == 1 else f"{lines[0]} (and {len(lines) - 1} more line(s))"


def report_error(err: BaseException, stream: TextIO | None = None) -> int:
    """Print `error: <message>` on one line and return the exit code (2)."""
    print(f"error: {error_line(err)}", file=stream or sys.stderr, flush=True)
    return EXIT_ERROR


@contextmanager
def one_line_usage_errors() -> Iterator[None]:
    """argparse errors become UsageError (one line, exit 2) instead of usage text + message."""
    original = argparse.ArgumentParser.error

    def error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
        raise UsageError(f"{parser.prog}: {message} (see {parser.prog} --help)")

    argparse.ArgumentParser.error = error  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original  # type: ignore[method-assign]


def run_main(main: Callable[..., int | None], argv: list[str] | None = None) -> int:
    """Run a script's `main` and return its exit code; a known error is one line and code 2.
    Off a terminal, library progress bars are turned off too (kblampp.progress.quiet_library_bars)."""
    from kblampp.progress import quiet_library_bars

    quiet_library_bars()
    show_traceback = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    try:
        with one_line_usage_errors():
            code = main() if argv is None else main(argv)
    except SystemExit as exc:  # --help (0), or SystemExit("message") raised as an error
        if isinstance(exc.code, str) and not show_traceback:
            return report_error(UsageError(exc.code))
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the filter below re-raises everything unknown
        if show_traceback or not is_known(err):
            raise
        return report_error(err)
    return int(code or 0)
