"""The primary's loop: a thin shell around policy.Supervisor. It waits on the
signal wakeup pipe, the workers' channels and the control socket, turns what it
sees into typed events (forkd.events) for the supervisor, and carries out the
actions it returns through policy.Driver, the action loop the unit tests run too."""

from __future__ import annotations

import gc
import logging
import os
import random
import resource
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from forkd import events, handoff, log, policy, process, protocol
from forkd.config import Config
from forkd.control import Poller
from forkd.http.balance import ConnectionTable
from forkd.http.health import HealthFlag
from forkd.logs.hub import LogHub
from forkd.logs.pipes import open_pipes
from forkd.logs.writer import LogWriter
from forkd.metrics.shell import PoolMetrics
from forkd.monitor import Monitor
from forkd.sockets import Listener, close_listeners
from forkd.state import WorkerState, exit_reason, exit_words
from forkd.systemd import Notifier, format_status, watchdog_interval
from forkd.worker import WorkerSpec

logger = logging.getLogger("forkd")
# an upgrade hands the old primary's private PROMETHEUS_MULTIPROC_DIR to the new one
HANDED_METRICS_DIR = "FORKD_PROMETHEUS_DIR_HANDED"

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2,
                   signal.SIGCHLD)
HOUSEKEEPING = 1.0  # seconds between the loop's periodic passes when nothing else is due
STATUS_EVERY = 5.0  # seconds between systemd STATUS= updates
LOAD_EVERY = 1.0  # seconds between the load samples autoscaling decides on
LOG_RETRY_MS = 50  # how soon to try again when the log output would block


@dataclass(frozen=True)
class Requester:
    """Who asked for an operation: the core hands it back in Progress and Reply."""

    peer: Any
    request_id: str


@dataclass
class PrimaryOptions:
    config: Config
    name: str
    listeners: list[Listener]
    workers: int
    control: Any  # a control.ControlServer, or None
    app: Any = None  # the preloaded app object, with --preload
    interface: str | None = None
    started_at: float = field(default_factory=time.time)
    metrics_dir: tuple[str, bool] | None = None  # the app's multiprocess dir, --metrics
    # what an upgrade starts the next primary with: the start arguments and the
    # directory `forkd start` ran in, as the shell named it
    argv: list[str] = field(default_factory=list)
    start_dir: str = ""
    # a primary started by an upgrade: the handshake with the old one, and how to open
    # the control endpoint once the old one has let go of it
    predecessor: handoff.Predecessor | None = None
    open_control: Callable[[], Any] | None = None
    logs: LogHub | None = None  # the log hub (output opened by the caller, to fail early)


class Primary:
    def __init__(self, options: PrimaryOptions) -> None:
        self.options = options
        self.config = options.config
        self.supervisor = policy.Supervisor(options.config, options.workers, random.Random())
        self.driver = policy.Driver(self.supervisor, self)
        self.channels: dict[int, socket.socket] = {}  # pid -> our end of its channel
        self.monitor = Monitor(options.config.memory_metric)
        self.notifier = Notifier.from_env()
        self.watchdog = watchdog_interval(os.environ, os.getpid())
        self.exit_code: int | None = None
        self.poller = Poller()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.next_memory = 0.0
        self.next_load = 0.0
        self.due = 0.0  # when housekeeping must next run
        self.changed = True  # the table changed since the last housekeeping
        self.channel_owner: dict[int, int] = {}  # our channel end's fd -> worker pid
        self.next_status = 0.0
        self.next_watchdog = 0.0
        # --health-path's shared flag, made before the first fork so that every worker maps
        # the same page: raising it (--drain-delay) fails the health path everywhere at once
        self.health = HealthFlag() if self.config.health_path else None
        # likewise the table where workers count their connections (forkd.http.balance)
        self.connections = ConnectionTable()
        self.connection_rows: dict[int, int] = {}  # worker pid -> its row in that table
        self.metrics = PoolMetrics()
        self.successor: handoff.Successor | None = None  # the new primary of an upgrade
        self.handed_over = False  # the successor serves: this primary only drains
        self.pending: deque[events.Event] = deque()  # outcomes of actions, fed after them
        self.logs = options.logs or LogHub(LogWriter(), fmt=self.config.log_format,
                                           app_name=options.name)
        self.logs.poller = self.poller
        log.setup(sink=self.logs.submit, app_name=options.name, reopen=self.logs.reopen)

    # -- set-up -----------------------------------------------------------------------------
    def _install_signals(self) -> None:
        # The handlers do nothing: the wakeup fd carries each signal's number to the loop.
        for signum in HANDLED_SIGNALS:
            signal.signal(signum, _record)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        self.poller.register(self.wake_r)
        if self.options.control is not None:
            for sock in self.options.control.sockets():
                self.poller.register(sock)
        if self.options.predecessor is not None:
            self.poller.register(self.options.predecessor.fileno())

    def run(self) -> int:
        _import_worker_stack(self.options.interface or self.config.interface)
        raise_fd_limit()
        self._install_signals()
        listeners = ", ".join(listener.address for listener in self.options.listeners)
        log.event("primary-started", name=self.options.name, pid=os.getpid(),
                  app=self.config.app, workers=self.options.workers, listen=listeners,
                  interface=self.options.interface or self.config.interface)
        # (an upgrade's new primary serves metrics once the old one has let go of them)
        if (self.config.metrics and self.options.predecessor is None
                and not self._serve_metrics(self.config.metrics)):
            self._shutdown()
            return 1
        # systemd keeps the listeners for the next start (restart, or a crash); a copy
        # it already has is not stored twice
        self.notifier.store_fds([(listener.sock.fileno(), listener.name)
                                 for listener in self.options.listeners])
        self._feed(events.Start())
        try:
            while self.exit_code is None:
                try:
                    self._wait_once()
                except Exception:  # a bug or a passing OS error must not end the primary:
                    # its death would take every worker (and request) with it
                    logger.exception("error in the primary's loop; going on")
                    time.sleep(0.1)  # no hot loop if it repeats
        finally:
            self._shutdown()
        return self.exit_code

    def _serve_metrics(self, address: str) -> bool:
        listeners = [(listener.address, listener.sock) for listener in self.options.listeners]
        app_dir = self.options.metrics_dir
        try:
            served = self.metrics.serve(address, listeners, self.config.memory_metric,
                                        app_dir, HANDLED_SIGNALS)
        except (OSError, ValueError) as exc:
            log.event("metrics-failed", level=logging.ERROR, address=address, why=str(exc))
            return False
        log.event("metrics", address=served, path="/metrics",
                  app_dir=app_dir[0] if app_dir else None)
        if app_dir is not None and not app_dir[1] and self.metrics.app.file_count():
            # the operator's own directory: files of an earlier run would be served as
            # if they were this one's (prometheus_client's advice: empty it between runs)
            log.event("metrics-dir-not-empty", level=logging.WARNING, app_dir=app_dir[0],
                      files=self.metrics.app.file_count())
        return True

    def _shutdown(self) -> None:
        self.metrics.close()
        signal.set_wakeup_fd(-1)
        self.logs.close()  # the workers' last lines, then the output
        log.setup(app_name=self.options.name)
        for channel in self.channels.values():
            channel.close()
        self.channels.clear()
        if self.options.control is not None:
            self.options.control.close()
        if self.options.predecessor is not None:
            self.options.predecessor.close()
        if self.successor is not None:
            self.successor.close()
        # after an upgrade the unix listeners' files are the new primary's; a new primary
        # that never took over leaves them to the old one, which serves on
        close_listeners(self.options.listeners,
                        unlink=not self.handed_over and self.options.predecessor is None)
        self.notifier.close()
        os.close(self.wake_r)
        os.close(self.wake_w)

    # -- the loop -------------------------------------------------------------------------------
    def _wait_once(self) -> None:
        timeout_ms = 0 if self.changed else max(0, int((self.due - time.monotonic()) * 1000) + 1)
        if self.logs.pending:
            timeout_ms = min(timeout_ms, LOG_RETRY_MS)
        ready = self.poller.poll(timeout_ms)
        if self.wake_r in ready:
            self._on_signals()
        for key in ready:
            pid = self.channel_owner.get(key)  # (the poller reports sockets by fd)
            if pid is not None:
                self._drain_channel(pid, self.channels[pid])
            elif key in self.logs.readers:
                self.logs.on_readable(key)
        if self.options.control is not None and any(
                sock in ready for sock in self.options.control.sockets()):
            self._on_control()
        if (self.successor is not None and not self.successor.closed
                and self.successor.sock.fileno() in ready):
            self._on_successor()
        predecessor = self.options.predecessor
        if predecessor is not None and predecessor.fileno() in ready:
            if predecessor.told_to_take():
                self._take_over()
        # Housekeeping (an O(workers) pass) runs when something is due or the table
        # changed, not after every heartbeat: 64 workers beat 64 times a second.
        if self.changed or time.monotonic() >= self.due:
            self._housekeeping()
        self.logs.flush()  # a pass's lines in one write

    def _next_due(self, now: float) -> float:
        due = now + HOUSEKEEPING
        deadline = self.supervisor.next_deadline(now)
        if deadline is not None:
            due = min(due, deadline)
        if self.config.max_memory is not None:
            due = min(due, self.next_memory)
        if self.watchdog is not None:
            due = min(due, self.next_watchdog)
        if self.supervisor.autoscaler is not None:
            due = min(due, self.next_load)
        return due

    def _housekeeping(self) -> None:
        self._reap()  # cheap, and no exit waits for a SIGCHLD that was folded into another
        now = time.monotonic()
        self._feed(events.Tick(), now)
        if self.config.max_memory is not None and now >= self.next_memory:
            self.next_memory = now + self.config.memory_interval
            samples = self.monitor.sample(list(self.supervisor.table.workers), cpu=False)
            self._feed(events.MemorySample(
                {pid: sample.memory for pid, sample in samples.items()}), now)
        if self.watchdog is not None and now >= self.next_watchdog:
            self.next_watchdog = now + self.watchdog
            self.notifier.watchdog()
        if self.supervisor.autoscaler is not None and now >= self.next_load:
            self.next_load = now + LOAD_EVERY
            ready = [w.pid for w in self.supervisor.table.workers.values()
                     if w.state is WorkerState.READY]
            load = self.metrics.load(ready, (lsn.sock for lsn in self.options.listeners))
            self._feed(events.LoadSample(load.utilization, load.listen_queue), now)
        if self.metrics.server is not None:
            self.metrics.publish(((w.pid, w.slot, w.state.value)
                                  for w in self.supervisor.table.workers.values()),
                                 self.supervisor.target, now)
            for error in self.metrics.errors():
                log.event("metrics-error", level=logging.WARNING, why=error)
        # (a new primary of an upgrade speaks for the service only once it took over)
        if (now >= self.next_status and self.notifier.enabled
                and self.options.predecessor is None):
            self.next_status = now + STATUS_EVERY
            self.notifier.status(self._status_line(now))
            if self.supervisor.operation is not None or not self.supervisor.announced_ready:
                # a long start-up, reload or drain is progressing: ask systemd for more time
                self.notifier.extend_timeout(STATUS_EVERY * 3)
        self.changed = False
        self.due = self._next_due(time.monotonic())

    def _status_line(self, now: float) -> str:
        # req/s from the same numbers as /metrics and `forkd status`
        return format_status(self.supervisor.table.ready_count(), self.supervisor.target,
                             self.metrics.aggregator.pool_rps())

    def _on_signals(self) -> None:
        try:
            data = os.read(self.wake_r, 4096)
        except BlockingIOError:
            return
        for signum in data:
            if signum != signal.SIGCHLD:  # (a SIGCHLD only says: reap, as below)
                self._feed(events.OperatorSignal(signum))
        self._reap()  # a SIGCHLD coalesced with another signal loses nothing

    def _reap(self) -> None:
        for pid, code, signum in process.reap():
            if self.successor is not None and pid == self.successor.pid:
                self._successor_exited(code, signum)
                continue
            channel = self.channels.pop(pid, None)
            if channel is not None:
                self.channel_owner.pop(channel.fileno(), None)
                self._drain_channel(pid, channel)
                self.poller.unregister(channel)
                channel.close()
            self.monitor.forget(pid)
            row = self.connection_rows.pop(pid, None)
            if row is not None:  # (a worker that was killed left its count there)
                self.connections.release(row)
            self._metrics_exit(pid, code, signum)
            self._feed(events.Exited(pid, code, signum))

    def _drain_channel(self, pid: int, channel: socket.socket) -> None:
        while True:
            try:
                data = channel.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            message = events.decode(data)
            if message is None:
                log.event("bad-worker-message", level=logging.WARNING, pid=pid,
                          data=repr(data[:40]))
                continue
            if isinstance(message, events.Beat) and message.metrics is not None:
                self.metrics.snapshot(pid, message.metrics, time.monotonic())
            self._feed(events.FromWorker(pid, message))

    def _metrics_exit(self, pid: int, code: int | None, signum: int | None) -> None:
        """The worker's counts join the retired totals; a replacement or removal is
        counted by its cause (a stop's exits are not restarts)."""
        worker = self.supervisor.table.workers.get(pid)
        if worker is None:
            return
        reason = worker.leave_reason or exit_reason(code, signum)
        self.metrics.exited(pid, None if self.supervisor.stopping else reason.cause.value)

    def _feed(self, event: events.Event, now: float | None = None) -> None:
        self.pending.append(event)
        while self.pending:  # (an action's outcome, such as SuccessorStarted, goes next)
            actions = self.driver.feed(self.pending.popleft(),
                                       time.monotonic() if now is None else now)
            if actions:
                self.changed = True

    # -- upgrade: the old primary's side --------------------------------------------------------
    def _start_successor(self) -> None:
        if self.successor is not None:
            # (the core waits for the last one to be reaped; should it not, a second
            # successor must not replace the first here: the first's handshake would stay
            # registered with nobody to read its end of file, and the loop would spin)
            self.pending.append(events.SuccessorFailed(
                f"the new primary of the last upgrade (pid {self.successor.pid}) still runs"))
            return
        try:
            env = dict(os.environ)
            if self.options.metrics_dir is not None and self.options.metrics_dir[1]:
                # our private multiprocess directory goes to the new primary on hand-over
                env[HANDED_METRICS_DIR] = self.options.metrics_dir[0]
            self.successor = handoff.start_successor(
                self.options.listeners, self.options.argv, self.options.start_dir, env)
        except OSError as exc:
            self.pending.append(events.SuccessorFailed(f"cannot start a new primary: {exc}"))
            return
        self.poller.register(self.successor.sock)
        self.pending.append(events.SuccessorStarted(self.successor.pid))

    def _on_successor(self) -> None:
        successor = self.successor
        if successor is None or successor.closed:
            return
        for state, why in successor.read():
            if state == "ready":
                if successor.lines.eof or process.has_exited(successor.pid):
                    # it said so and died (or is dying: its end closed unannounced):
                    # nobody would take over. Its exit, reaped soon, fails the upgrade.
                    log.event("successor-ready-but-gone", level=logging.WARNING,
                              pid=successor.pid)
                    continue
                self._feed(events.SuccessorReady(successor.pid))
            elif state == "failed":
                self._feed(events.SuccessorFailed(why))
            # ("gone", an end without a word: its exit status, reaped soon, says more)
        if successor.lines.eof and not successor.closed:
            self.poller.unregister(successor.sock)
            successor.close()

    def _successor_exited(self, code: int | None, signum: int | None) -> None:
        """The new primary was reaped. Its last words still in the handshake go with
        the news: a failure's reason; a "ready" is no longer true (nobody takes over)."""
        successor = self.successor
        assert successor is not None
        self.successor = None
        successor.proc.returncode = code if code is not None else -(signum or 0)
        why = ""
        if not successor.closed:
            for state, text in successor.read():
                if state == "failed":
                    why = text
            self.poller.unregister(successor.sock)
            successor.close()
        log.event("successor-exited", level=logging.WARNING, pid=successor.pid,
                  status=exit_words(code, signum))
        self._feed(events.SuccessorExited(successor.pid, code, signum, successor.said, why))

    def _hand_over(self, pid: int) -> None:
        """Let go of the control endpoint (and its lock), tell the new primary to take
        it, and fall silent towards systemd: the new primary is the service now."""
        control = self.options.control
        if control is not None:
            for sock in control.sockets():
                self.poller.unregister(sock)
            control.close()  # (lingers for the upgrade's answer to get out)
            self.options.control = None
        self.metrics.hand_over()  # (first: the new primary binds its address on "take")
        self.logs.writer.max_size = None  # the new primary rotates --log-file from now on
        if self.successor is not None and not self.successor.closed:
            self.poller.unregister(self.successor.sock)
            self.successor.take()
        self.successor = None  # (its exit, should it come before ours, is no news)
        self.handed_over = True
        self.notifier.close()
        self.notifier = Notifier(None)
        self.watchdog = None
        log.event("handed-over", pid=pid)

    # -- upgrade: the new primary's side ----------------------------------------------------
    def _take_over(self) -> None:
        """The old primary let go of the control endpoint (or died): take it, and tell
        systemd this process is the service's main process now."""
        predecessor = self.options.predecessor
        assert predecessor is not None
        self.poller.unregister(predecessor.fileno())
        predecessor.close()
        self.options.predecessor = None
        if self.options.open_control is not None:
            try:
                self.options.control = self.options.open_control()
            except Exception as exc:  # serve on without a control endpoint rather than die
                log.event("control-unavailable", level=logging.ERROR, why=str(exc))
            else:
                for sock in self.options.control.sockets():
                    self.poller.register(sock)
        if self.config.metrics:
            metrics_dir = self.options.metrics_dir
            handed = os.environ.pop(HANDED_METRICS_DIR, None)
            if metrics_dir is not None and handed == metrics_dir[0]:
                self.options.metrics_dir = (metrics_dir[0], True)  # ours to remove now
            self._serve_metrics(self.config.metrics)  # (a failure is logged; serve on)
        log.event("took-over", pid=os.getpid())
        self.notifier.mainpid(os.getpid(), self._status_line(time.monotonic()))

    # -- control requests -------------------------------------------------------------------
    def _on_control(self) -> None:
        control = self.options.control
        for peer, request in control.handle_ready():
            try:
                self._dispatch(peer, request)
            except Exception as exc:  # a bug must not take the primary down
                logger.exception("control request %s failed", request.command)
                control.reply_error(peer, request.id, protocol.Code.FAILED, str(exc))

    def _dispatch(self, peer: Any, request: Any) -> None:
        control = self.options.control
        command = request.command
        if command == "status":
            control.reply_ok(peer, request.id, self.status_document(time.monotonic()))
            return
        if command == "logs":  # (read-only: answered here, the core is not involved)
            control.reply_ok(peer, request.id, self.logs.query(request.args))
            return
        who = Requester(peer, request.id)
        event: events.ControlRequest
        if command == "reload":
            event = events.ReloadRequest(who)
        elif command == "scale":
            try:
                count, relative = protocol.parse_scale_words(str(request.args["count"]))
            except protocol.ProtocolError as exc:
                control.reply_error(peer, request.id, exc.code, exc.message)
                return
            event = events.ScaleRequest(count, relative, who)
        elif command == "stop":
            event = events.StopRequest(bool(request.args.get("graceful", True)), who)
        elif command == "upgrade":
            event = events.UpgradeRequest(who)
        else:
            control.reply_error(peer, request.id, protocol.Code.UNKNOWN_COMMAND,
                                f"unknown command {command!r}")
            return
        self._feed(event)

    # -- actions (policy.Effects) -------------------------------------------------------------
    def perform(self, action: policy.Action) -> None:
        if isinstance(action, policy.Signal):
            process.send_signal(action.pid, action.signum)
        elif isinstance(action, policy.Log):
            if action.event in ("reload-done", "reload-aborted"):
                self.metrics.reloaded("done" if action.event == "reload-done" else "aborted")
            log.event(action.event, level=action.level, **action.fields)
        elif isinstance(action, policy.Progress):
            self._progress(action.requester, action.text)
        elif isinstance(action, policy.Reply):
            self._reply(action)
        elif isinstance(action, policy.Notify):
            self._notify(action.kind)
        elif isinstance(action, policy.Exit):
            self.exit_code = action.code
            if self.options.predecessor is not None:  # an upgrade that did not come true
                self.options.predecessor.failed(
                    action.why or f"the new primary stopped (exit {action.code}) "
                    "before its workers were ready")
        elif isinstance(action, policy.FailHealth):
            # (a new primary that never took over must not fail the health path of the
            # host its predecessor still serves: its workers answer on the same listeners)
            if self.health is not None and self.options.predecessor is None:
                self.health.fail()
        elif isinstance(action, policy.ReopenLogs):
            log.reopen()
        elif isinstance(action, policy.StartUpgrade):
            self._start_successor()
        elif isinstance(action, policy.HandOver):
            self._hand_over(action.pid)

    def spawn(self, action: policy.Spawn) -> int:
        """Fork a worker for the slot; its pid (OSError when it cannot)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            pipes = open_pipes()  # the worker's stdout, stderr and forkd records
        except OSError:
            ours.close()
            theirs.close()
            raise
        ours.setblocking(False)
        close_fds = [ours.fileno(), self.wake_r, self.wake_w]
        if self.options.control is not None:
            close_fds += self.options.control.child_close_fds()
        close_fds += self.notifier.child_close_fds()
        close_fds += [channel.fileno() for channel in self.channels.values()]
        close_fds += self.logs.fds()
        if self.metrics.server is not None:  # (or draining workers keep the address bound)
            close_fds.append(self.metrics.server.server.fileno())
        # an upgrade's handshake: its end of file must come when a primary dies
        if self.options.predecessor is not None:
            close_fds.append(self.options.predecessor.fileno())
        if self.successor is not None and not self.successor.closed:
            close_fds.append(self.successor.sock.fileno())
        spec = WorkerSpec(
            slot=action.slot, workers=self.supervisor.target, name=self.options.name,
            config=self.config, listeners=[listener.sock for listener in self.options.listeners],
            channel=theirs, primary_pid=os.getpid(), close_fds=close_fds,
            app=self.options.app, interface=self.options.interface,
            request_limit=action.request_limit or 0, health=self.health, log_pipes=pipes,
            connections=self.connections, connections_row=self.connections.take())
        # Signals wait until the child has put its own handlers in place.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        # What exists now (a preloaded app above all) goes to the permanent generation,
        # so the child's collector never writes to those pages and they stay shared;
        # the primary itself unfreezes after the fork, so its own garbage is collected.
        gc.freeze()
        try:
            pid = process.fork_worker(spec)
        except OSError:
            ours.close()
            theirs.close()
            pipes.close_all()
            if spec.connections_row is not None:
                self.connections.release(spec.connections_row)
            raise
        finally:
            gc.unfreeze()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        theirs.close()
        self.logs.attach(pipes, action.slot, pid)
        self.metrics.spawned(pid, action.slot, time.monotonic())
        self.channels[pid] = ours
        self.channel_owner[ours.fileno()] = pid
        if spec.connections_row is not None:
            self.connection_rows[pid] = spec.connections_row
        self.poller.register(ours)
        return pid

    def _progress(self, requester: Any, text: str) -> None:
        if isinstance(requester, Requester) and self.options.control is not None:
            self.options.control.progress(requester.peer, requester.request_id, text)

    def _reply(self, action: policy.Reply) -> None:
        requester = action.requester
        if not isinstance(requester, Requester) or self.options.control is None:
            return  # a signal asked (the core has logged a failure)
        if action.ok:
            self.options.control.reply_ok(requester.peer, requester.request_id,
                                          {"message": action.message, **action.result})
        else:
            self.options.control.reply_error(requester.peer, requester.request_id,
                                             action.code or protocol.Code.FAILED,
                                             action.message)

    def _notify(self, kind: str) -> None:
        if kind == "ready" and self.options.predecessor is not None:
            # started by an upgrade: the old primary is the service until it lets go;
            # it hears first, systemd once the endpoint is ours (_take_over)
            self.options.predecessor.ready()
        elif kind == "ready":
            self.notifier.ready(self._status_line(time.monotonic()))
        elif kind == "reloading":
            self.notifier.reloading()
        elif kind == "stopping":
            self.notifier.stopping()

    # -- status ---------------------------------------------------------------------
    def status_document(self, now: float) -> dict[str, Any]:
        wall_offset = time.time() - now
        rows = self.supervisor.status_rows(now)
        pids = [row["pid"] for row in rows if row["pid"] is not None]
        samples = self.monitor.sample(pids, "rss")
        for row in rows:
            sample = samples.get(row["pid"]) if row["pid"] is not None else None
            if row["started_at"] is not None:
                row["started_at"] = round(row["started_at"] + wall_offset, 3)
            row["rss"] = sample.rss if sample else None
            row["cpu_percent"] = round(sample.cpu_percent, 1) if sample else None
        operation = self.supervisor.operation
        document: dict[str, Any] = {
            "name": self.options.name,
            "pid": os.getpid(),
            "app": self.config.app,
            "bind": [listener.address for listener in self.options.listeners],
            "started_at": self.options.started_at,
            "workers": rows,
            "target": self.supervisor.target,
            "health": dict(self.supervisor.counters),
            "operation": operation.describe() if operation is not None else None,
        }
        if (auto := self.supervisor.autoscale_status()) is not None:
            document["autoscale"] = auto
        self.metrics.add_status_fields(document)
        return document


def _import_worker_stack(interface: str = "auto") -> None:
    """Import the worker's HTTP stack once, here: every worker (and each replacement
    of a recycle or reload) inherits it by fork instead of importing it anew, which
    shortens a replacement's start-up and so a recycled worker's overshoot. None of
    these modules starts a thread or a loop at import. Their pages stay shared
    copy-on-write: a hello-world worker's unique memory (USS) is about 5 MB, not 9.
    A WSGI app never upgrades to a WebSocket: with `--interface wsgi` the websockets
    package (25-40 ms of the start-up here) is left out (a worker of a reload that
    changed the interface imports it itself)."""
    import httptools  # noqa: F401
    import uvloop  # noqa: F401

    import forkd.http.asgi
    import forkd.http.lifespan
    import forkd.http.loader
    import forkd.http.protocol

    if interface != "wsgi":
        import forkd.http.websocket  # noqa: F401  # the websockets package, once, here
    import forkd.http.wsgi
    import forkd.http.wsgipool
    import forkd.tls  # noqa: F401


def _record(signum: int, frame: Any) -> None:
    """Signal handler: nothing to do, the wakeup fd has carried the number."""


def raise_fd_limit() -> None:
    """Raise the soft limit on open files to the hard one, as nginx does, before any
    worker is forked (they inherit it): each connection is a descriptor, and the
    distributions' soft default of 1024 is what an idle flood reaches first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:  # the kernel's ceiling for one process
            with open("/proc/sys/fs/nr_open") as file:
                target = int(file.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        logger.warning("could not raise the open files limit from %d to %d: %s",
                       soft, target, exc)
        return
    log.event("fd-limit-raised", soft=target, was=soft)
