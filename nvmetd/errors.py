"""Exit codes and the one-line error a person sees instead of a traceback."""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_NOT_CONVERGED = 1  # the command worked, but the kernel does not (yet) match the desired state
EXIT_USAGE = 2  # bad input: the message says which field or argument
EXIT_SYSTEM = 3  # the system cannot do it: missing kernel feature, no permission, unreadable state file


class UserError(Exception):
    """A mistake in what was asked; shown as one line, exit code 2."""

    exit_code = EXIT_USAGE


class SystemProblem(Exception):
    """The host cannot do what was asked; shown as one line, exit code 3."""

    exit_code = EXIT_SYSTEM


def _is(exc: BaseException, module: str, name: str) -> bool:
    """isinstance against a class of a module that may never have been imported: if it was not, nothing can have
    raised one of its exceptions. So a command pays no import for error classes it never meets (the CLI's start-up
    is part of every call a hypervisor agent makes)."""
    import sys

    mod = sys.modules.get(module)
    return mod is not None and isinstance(exc, getattr(mod, name))


def run_cli(command: Any, argv: list[str] | None, prog_name: str, label: str) -> int:
    """Run a click command and turn whatever it lets through into one line on stderr and the exit code above.

    Shared by nvmetctl and `python -m bench.matrix` (also mounted as `nvmetctl bench`), so a failure means the same
    exit code whichever way the command was started."""
    import click

    def fail(message: str, code: int) -> int:
        click.echo(f"{label}: error: {message}", err=True)
        return code

    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE
    except click.exceptions.Abort:
        return fail("aborted", EXIT_USAGE)
    except (UserError, SystemProblem) as exc:
        return fail(str(exc), exc.exit_code)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:
        if _is(exc, "target.model", "StateError"):
            return fail(f"invalid state:\n{exc}", EXIT_USAGE)
        if any(_is(exc, m, n) for m, n in (("target.features", "FeatureError"), ("target.store", "StoreError"),
                                           ("target.configfs", "ConfigfsError"))):
            return fail(str(exc), EXIT_SYSTEM)
        if isinstance(exc, PermissionError):
            return fail(f"permission denied: {exc.filename} ({label} needs root)", EXIT_SYSTEM)
        if _is(exc, "backends.errors", "BackendError"):  # the local commands open pools to find the VMs' devices
            return fail(str(exc), EXIT_SYSTEM if _is(exc, "backends.errors", "ToolError") else EXIT_USAGE)
        if isinstance(exc, OSError):  # e.g. an output directory that cannot be written
            return fail(f"{exc.filename or ''}: {exc.strerror}", EXIT_SYSTEM)
        raise
    return EXIT_OK


class Unsupported(SystemProblem):
    """This host cannot serve a valid request (a transport that is not set up); refused before anything is
    recorded. The API answers 409: asking again will not help until the host changes."""
