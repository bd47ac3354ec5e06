"""Exit codes and the one-line error a person sees instead of a traceback."""

from __future__ import annotations

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


class Unsupported(SystemProblem):
    """This host cannot serve a valid request (a transport that is not set up); refused before anything is
    recorded. The API answers 409: asking again will not help until the host changes."""
