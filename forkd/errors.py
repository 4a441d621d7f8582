"""The exception tree of forkd.

    ForkdError                 base of everything forkd raises on purpose
    ├── ConfigError            a bad option, key or value (exit 2); names the key
    ├── BindError              a listener could not be bound (exit 1); names the address
    ├── AppLoadError           APP could not be imported or called (worker exit code 3)
    │   └── TLSConfigError     a --certfile/--keyfile/--ca-certs file does not load
    ├── ProtocolError          a malformed control message; carries an error code
    └── ControlError           a control request failed or nothing answered
        └── NoPrimary          no (or no unique) primary to talk to (exit 2)
"""

from __future__ import annotations

# A worker's exit codes: the one definition, read by the worker and the supervisor core.
EXIT_OK = 0
EXIT_APP_LOAD = 3  # the app failed to import, or its lifespan startup failed
EXIT_BOOT = 4  # the worker itself could not start


class ForkdError(Exception):
    """Base of the errors forkd raises on purpose."""


class ConfigError(ForkdError):
    """A bad option, configuration key or value."""


class BindError(ForkdError):
    """A listening socket could not be bound or inherited."""


class AppLoadError(ForkdError):
    """The application could not be imported, found or built."""


class TLSConfigError(AppLoadError):
    """A certificate, key or CA file that does not load (fails a worker like an import)."""


class ProtocolError(ForkdError):
    """A control message that does not follow the protocol."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ControlError(ForkdError):
    """A control request was refused, failed, or got no answer."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NoPrimary(ControlError):
    """There is no primary (or more than one) to send a request to."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="no-primary")
