"""Import the application named `module:attr` or `module:factory()`, and tell how
to call it."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from forkd.errors import AppLoadError


def enter_directory(path: str | None) -> str:
    """--chdir: change to `path` and import from it afresh; the directory reached.

    `path` is kept as a path, not resolved: after a deploy switched a `current`
    symlink, a new worker lands in the new release. The primary's own directory (the
    release it started in, resolved) leaves sys.path, so no module is found there."""
    if path:
        before = os.getcwd()
        try:
            os.chdir(path)
        except OSError as exc:
            raise AppLoadError(f"--chdir {path}: {exc.strerror}") from None
        sys.path[:] = [path] + [p for p in sys.path if p not in ("", ".", before, path)]
        importlib.invalidate_caches()
    return os.getcwd()


def import_app(spec: str) -> Any:
    """Import `module:attr` (dots in attr walk attributes) or call `module:factory()`.

    The current directory is made importable, as gunicorn and uvicorn do."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AppLoadError(f"APP {spec!r} is not module:attr (e.g. sample_app.asgi:app)")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    call = attr.endswith("()")
    if call:
        attr = attr[:-2]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # only when APP's own module (or a package on its path) is missing; a missing
        # dependency inside it keeps its own traceback
        if exc.name == module_name or (exc.name and module_name.startswith(exc.name + ".")):
            raise AppLoadError(f"no module named {module_name!r} (from APP {spec!r})") from exc
        raise
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise AppLoadError(f"module {module_name!r} has no attribute {attr!r}") from None
    if call:
        target = target()
    if not callable(target):
        raise AppLoadError(f"APP {spec!r} is {type(target).__name__}, not a callable")
    return target


def detect_interface(app: Any) -> str:
    """`asgi` for an `async def app(scope, receive, send)` (function or object),
    `wsgi` for `app(environ, start_response)`."""
    call = app if inspect.isroutine(app) else getattr(app, "__call__", app)  # noqa: B004
    if inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(app):
        return "asgi"
    try:
        params = [
            p
            for p in inspect.signature(app).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
    except (TypeError, ValueError):
        return "wsgi"
    return "asgi" if len(params) == 3 else "wsgi"
