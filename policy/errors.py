"""The errors of the policy toolchain: a small hierarchy, each carrying the context a fix needs.

Every message names what it is about (the file, the registry key and value, the policy field)
and, where a fix is likely, says it.  Callers that must tell failures apart use the attributes
(``reason``, ``key_path``, ...), never the message text.
"""

from __future__ import annotations

__all__ = [
    "PolicyError", "DerivationError", "ModuleNotFound", "KeyFileError",
    "SignatureError", "PolicyInvalid", "StateError",
]


class PolicyError(Exception):
    """Base of every error this package raises on purpose."""


class DerivationError(PolicyError):
    """A driver key whose values cannot be turned into a policy without guessing.

    ``key_path`` and ``value`` say where; ``location`` is the ``file:line:col`` that wrote the
    value, when the registry knows it.
    """

    def __init__(self, key_path: str, value: str | None, problem: str, location: object = None,
                 fix: str | None = None) -> None:
        self.key_path, self.value, self.problem, self.location, self.fix = key_path, value, problem, location, fix
        where = f"{location}: " if location else ""
        what = f"[{key_path}]" + (f' "{value}"' if value is not None else "")
        super().__init__(f"{where}{what}: {problem}" + (f" (fix: {fix})" if fix else ""))


class ModuleNotFound(PolicyError):
    """A driver's ``Dll`` names no module on the driver search path; ``tried`` lists every path looked at."""

    def __init__(self, dll: str, tried: list[str], problem: str | None = None) -> None:
        self.dll, self.tried = dll, list(tried)
        if problem is None:
            problem = "no such module on the driver search path"
        listing = ", ".join(self.tried) if self.tried else "nothing (the search path is empty)"
        super().__init__(f"Dll {dll!r}: {problem}; tried {listing} "
                         "(fix: put the driver in one of those places, or pass --driver-path DIR)")


class KeyFileError(PolicyError):
    """A key file that is missing, unsafe, or not an Ed25519 key."""


class SignatureError(PolicyError):
    """An envelope that does not verify.

    ``reason`` is one of ``malformed``, ``unsigned``, ``unknown-key``, ``bad-signature``;
    ``detail`` says exactly what was wrong, for the audit log.  Toward an untrusted party every
    reason should look the same; the detail is for the operator.
    """

    REASONS = ("malformed", "unsigned", "unknown-key", "bad-signature")

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in self.REASONS, reason
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


class PolicyInvalid(PolicyError):
    """A policy document that breaks the schema or one of the rules a schema cannot say
    (windows that overlap or wrap, ranges upside down).  ``path`` is the JSON path of the field."""

    def __init__(self, path: str, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}")


class StateError(PolicyError):
    """The anti-rollback state in the state directory cannot be read or written."""
