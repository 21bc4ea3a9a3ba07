"""Error types shared across subsystems.

Every error carries the CLI exit code it maps to (DESIGN.md §7), so the CLI
never guesses: 1 operation failed, 2 usage, 3 not found, 4 conflict,
5 unavailable.
"""

from __future__ import annotations


class CloudlessError(Exception):
    """Base of every error Cloudless raises on purpose."""

    exit_code = 1
    code = "failed"

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"error": self.code, "message": self.message}
        if self.context:
            out["context"] = {k: str(v) for k, v in self.context.items()}
        return out


class InvalidInput(CloudlessError):
    """Input from outside (network, manifest, CLI) failed validation."""

    exit_code = 2
    code = "invalid"


class NotFound(CloudlessError):
    exit_code = 3
    code = "not_found"


class Conflict(CloudlessError):
    """A precondition such as a compare-and-set index did not hold."""

    exit_code = 4
    code = "conflict"


class Unavailable(CloudlessError):
    """No node could serve the request (no leader, no quorum, unreachable)."""

    exit_code = 5
    code = "unavailable"
