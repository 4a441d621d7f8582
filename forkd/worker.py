"""The worker: what a forked child runs. It resets what it inherited, loads the
app, builds its own uvloop loop, serves the shared listeners, reports readiness
and heartbeats to the primary over its channel, drains on SIGTERM, and always
ends with os._exit in the try/finally it owns."""

from __future__ import annotations

import asyncio
import ctypes
import faulthandler
import gc
import logging
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, NoReturn

from forkd import events
from forkd import log as forkd_log
from forkd.config import Config
from forkd.errors import EXIT_APP_LOAD, EXIT_BOOT, EXIT_OK, AppLoadError
from forkd.http import balance
from forkd.logs.pipes import WorkerPipes
from forkd.metrics.snapshot import to_wire

logger = logging.getLogger("forkd.worker")

WS_CLOSE_GRACE = 1.0  # seconds before the drain deadline at which WebSockets get 1012
LIFESPAN_SHUTDOWN = 3.0  # seconds the app's lifespan shutdown may take after the drain
TASK_CANCEL_GRACE = 1.0  # seconds cancelled request tasks get for their cleanup
TICK = 0.5  # seconds between the loop's housekeeping passes (clock, Date, timeouts)
BEAT_EVERY = 2  # ticks per heartbeat to the primary: one a second is plenty for --timeout
PR_SET_PDEATHSIG = 1


@dataclass
class WorkerSpec:
    slot: int
    workers: int
    name: str
    config: Config
    listeners: list[socket.socket]
    channel: socket.socket  # the worker's end of its datagram pair with the primary
    primary_pid: int
    close_fds: list[int]  # the primary's descriptors this child must not keep
    app: Any = None  # the app object when --preload imported it in the primary
    interface: str | None = None
    request_limit: int = 0  # --max-requests (+ jitter) for this worker; 0: none
    # the primary's forkd.http.health.HealthFlag (made before forking): raised, it fails
    # --health-path on every worker at once, ahead of the drain (--drain-delay)
    health: Any = None
    log_pipes: WorkerPipes | None = None  # stdout, stderr and forkd records to the primary
    # the primary's forkd.http.balance.ConnectionTable (made before forking): where each
    # worker says how many connections it holds, so that none takes more than its share;
    # this worker's row in it (None: all taken, it does not take part)
    connections: Any = None
    connections_row: int | None = None


def run(spec: WorkerSpec) -> NoReturn:
    """The child's entry right after fork; never returns into the primary's code."""
    code = EXIT_BOOT
    try:
        code = _main(spec)
    except AppLoadError as exc:
        code = EXIT_APP_LOAD
        _report_error(spec.channel, f"{exc}\n")
    except BaseException as exc:  # anything at all: the child must still _exit
        code = EXIT_APP_LOAD if isinstance(exc, ImportError | SyntaxError) else EXIT_BOOT
        _report_error(spec.channel, "".join(traceback.format_exception(exc)))
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            if _records is not None:
                _records.detach_loop()
        finally:
            os._exit(code)


def _report_error(channel: socket.socket, text: str) -> None:
    sys.stderr.write(text)
    try:
        channel.send(events.encode(events.Failed(text[-events.MAX_ERROR:])))
    except OSError:
        pass


def _reset_inherited(spec: WorkerSpec) -> None:
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    # Meant for the primary: a hang-up or a SIGHUP to the whole process group must not
    # kill every worker at once, nor SIGTTIN/SIGTTOU stop them, nor a SIGUSR1 (log
    # reopen) or SIGUSR2 (upgrade) sent to the whole unit (`systemctl kill -s USR1`
    # signals every process of it).
    for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1,
                   signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    # Die with the primary, and close the race where it died before prctl ran.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != spec.primary_pid:
        os._exit(EXIT_BOOT)
    for fd in spec.close_fds:
        try:
            os.close(fd)
        except OSError:
            pass


_records: Any = None  # the RecordWriter, once logging is set up


def _setup_logging(spec: WorkerSpec) -> None:
    """stdout and stderr become pipes to the primary, forkd's own lines JSON records on
    a third one; without pipes (a worker run on its own), everything stays on stderr."""
    if spec.log_pipes is None:
        forkd_log.setup(slot=spec.slot, app_name=spec.name)
        return
    from forkd.http import accesslog
    from forkd.logs.pipes import RecordWriter, attach_worker
    from forkd.logs.record import to_json

    global _records
    send = _records = RecordWriter(attach_worker(spec.log_pipes), render=accesslog.render)
    send.on_dropped = lambda count: forkd_log.event(
        "log-dropped", logging.WARNING, lines=count, why="the primary was too slow to read")
    forkd_log.setup(slot=spec.slot, app_name=spec.name,
                    sink=lambda entry: send(to_json(entry), entry.level != "info"),
                    json_sink=send, access_sink=send.defer,
                    access_text=spec.config.log_format == "text")


def _set_title(spec: WorkerSpec) -> None:
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(f"forkd: worker {spec.slot} [{spec.name}] {spec.config.app}")


def _main(spec: WorkerSpec) -> int:
    _reset_inherited(spec)
    os.environ["FORKD_WORKER_ID"] = str(spec.slot)
    os.environ["FORKD_WORKERS"] = str(spec.workers)
    os.environ.pop("NOTIFY_SOCKET", None)  # only the primary speaks to systemd
    _setup_logging(spec)
    _set_title(spec)
    faulthandler.enable(file=sys.stderr, all_threads=True)  # SIGABRT on a hang shows where

    from forkd import tls
    from forkd.http.loader import detect_interface, enter_directory, import_app

    # read at every worker's start (before --chdir: paths are as typed where forkd start
    # ran): a reload serves renewed certificates, a file that does not load fails it
    ssl_context = tls.server_context(spec.config)
    cwd = enter_directory(spec.config.chdir)
    app = spec.app if spec.app is not None else import_app(spec.config.app)
    forkd_log.guard()  # the app may have reconfigured logging on import (Django does)
    interface = spec.interface or spec.config.interface
    if interface == "auto":
        interface = detect_interface(app)

    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    if _records is not None:
        _records.attach_loop(loop)
    try:
        return loop.run_until_complete(_serve(spec, app, interface, loop, cwd, ssl_context))
    finally:
        if _records is not None:
            _records.detach_loop()
        loop.close()


async def _serve(spec: WorkerSpec, app: Any, interface: str, loop: asyncio.AbstractEventLoop,
                 cwd: str, ssl_context: Any = None) -> int:
    from forkd.http.protocol import ServerState, make_protocol_factory

    config = spec.config
    state = ServerState(config, loop)
    channel = spec.channel
    channel.setblocking(False)
    state.request_limit = spec.request_limit

    def limit_reached() -> None:  # the primary starts this worker's replacement at once
        _send(channel, events.encode(events.LimitReached(state.requests)))

    state.on_limit = limit_reached
    state.health_flag = spec.health
    lifespan = None
    pool: Any = None  # the WSGI pool (forkd.http.wsgipool), for the shutdown
    if interface == "asgi":
        from forkd.http.asgi import ASGICycle
        from forkd.http.lifespan import Lifespan, LifespanFailed

        lifespan = Lifespan(app, loop)
        try:
            await lifespan.startup()
        except LifespanFailed as exc:
            _report_error(spec.channel, f"lifespan startup failed: {exc}\n")
            return EXIT_APP_LOAD
        state.cycle_factory = ASGICycle.bind(app, lifespan.state, config.root_path)
        from forkd.http.websocket import make_upgrade_factory  # imported by the primary

        state.upgrade_factory = make_upgrade_factory(app, lifespan.state, config.root_path)
    else:
        from forkd.http.wsgi import WSGICycle
        from forkd.http.wsgipool import WSGIPool

        pool = WSGIPool(loop, config.threads, config.wsgi_inline)
        state.cycle_factory = WSGICycle.bind(app, pool, config.root_path)

    # The app's import-time objects live as long as the worker: keep them out of the
    # collector's passes (shorter pauses on the request path).
    gc.freeze()
    factory = make_protocol_factory(state)
    listening = balance.Listening(loop, spec.listeners, lambda sock: _create_server(
        loop, factory, sock, config, ssl_context))
    await listening.start()
    if spec.connections is not None and spec.connections_row is not None:
        state.balance = balance.Balancer(spec.connections, spec.connections_row, loop,
                                         listening.pause, listening.resume)
        state.balance.refresh(len(state.connections))
    stop = loop.create_future()

    def on_signal(signum: int) -> None:
        if signum == signal.SIGQUIT:
            os._exit(EXIT_OK)  # immediate stop: no drain
        if not stop.done():
            stop.set_result(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        loop.add_signal_handler(signum, on_signal, signum)

    _send(channel, events.encode(events.Ready(interface, cwd)), surely=True)
    beat = _Heartbeat(state, channel, loop)
    beat.schedule()
    await stop

    # Drain: stop accepting at once; what is in the shared accept queue stays there
    # for the other workers. Then let the connections we hold finish.
    if state.balance is not None:
        state.balance.leave()
    listening.close()
    _send(channel, events.encode(events.Draining()), surely=True)
    state.start_drain()
    deadline = loop.time() + config.graceful_timeout
    # open WebSockets run on until just before the deadline, then get 1012 (reconnect)
    websockets_close_at = deadline - min(WS_CLOSE_GRACE, config.graceful_timeout / 4)
    while state.busy() and loop.time() < deadline:
        if state.websockets and loop.time() >= websockets_close_at:
            for websocket in list(state.websockets):
                websocket.restart()
        await asyncio.sleep(0.05)
    if state.connections:
        logger.warning("graceful timeout: closing %d connection(s)", len(state.connections))
        for connection in list(state.connections):
            connection.abort()
    await state.cancel_tasks(TASK_CANCEL_GRACE)
    if lifespan is not None:
        try:  # within the primary's margin past --graceful-timeout (policy.DRAIN_MARGIN)
            await asyncio.wait_for(lifespan.shutdown(), LIFESPAN_SHUTDOWN)
        except TimeoutError:
            logger.error("lifespan shutdown did not finish in time")
    beat.stop()  # (beating through the shutdown: a short --timeout must not kill it)
    # the last count: whatever this worker served after its last beat is not lost (a
    # worker that crashes loses at most what it served since its last beat, <= 1 s)
    _send(channel, beat_message(state), surely=True)
    if pool is not None:
        pool.shutdown()
    return EXIT_OK


async def _create_server(loop: asyncio.AbstractEventLoop, factory: Any, sock: socket.socket,
                         config: Config, ssl_context: Any) -> asyncio.AbstractServer:
    from forkd.tls import is_tcp

    if ssl_context is not None and is_tcp(sock):
        return await loop.create_server(factory, sock=sock, backlog=config.backlog,
                                        ssl=ssl_context,
                                        ssl_handshake_timeout=config.header_timeout)
    return await loop.create_server(factory, sock=sock, backlog=config.backlog)


def _send(channel: socket.socket, message: bytes, surely: bool = False) -> None:
    """A beat may be dropped when the primary is behind (the next one carries the same
    news); `surely` waits up to 5 s for room instead, for news sent only once."""
    try:
        if surely:
            channel.settimeout(5.0)
        channel.send(message)
    except (BlockingIOError, InterruptedError, TimeoutError):
        pass
    except OSError:
        pass  # the primary is gone; PDEATHSIG ends us
    finally:
        if surely:
            channel.setblocking(False)


def beat_message(state: Any) -> bytes:
    """The heartbeat with the worker's metrics snapshot riding on it."""
    snapshot = state.metrics.snapshot(state.loop.time(), len(state.connections),
                                      time.process_time())
    return events.encode(events.Beat(state.requests, to_wire(snapshot)))


class _Heartbeat:
    """Runs on the loop every TICK: refreshes the coarse clock and Date header,
    applies connection timeouts, and tells the primary we are alive. A blocked
    loop falls silent, which is the point."""

    def __init__(self, state: Any, channel: socket.socket, loop: asyncio.AbstractEventLoop
                 ) -> None:
        self.state = state
        self.channel = channel
        self.loop = loop
        self.handle: asyncio.TimerHandle | None = None
        self.ticks = 0

    def schedule(self) -> None:
        self.handle = self.loop.call_later(TICK, self.beat)

    def beat(self) -> None:
        self.state.tick()
        if self.state.balance is not None:
            self.state.balance.refresh(len(self.state.connections))
        self.ticks += 1
        if self.ticks % BEAT_EVERY == 0:
            _send(self.channel, beat_message(self.state))
        self.schedule()

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
