"""Warm job starts: per code root, a process that has imported torch and the trainers forks each job's child.

Read it in two halves. The agent's half: `Launcher.start` hands the agent a started job child (forked from a
warm process when it can, spawned cold otherwise) with the same three things either way: a process handle
(`is_alive`, `join`, `kill`, `exitcode`), the pipe the child reports on, and a stop flag. The warm
process's half: `serve` imports once, then forks one job child per request and reports its exit status.
`Launcher.start_gang` is the same for a gang's one child (worker/gang_child.py), whose stop flag is a
GangStop: one line per member to stop or drop.

Why our own process and not multiprocessing's "forkserver": there is one forkserver per Python process and
it runs the agent's own code, while a pinned `code_rev` needs a process that imports that worktree's code.
docs/warm_starts.md says what stays true of a job child (and how) and what the numbers are.
"""
from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import select
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any

from worker import runner
from worker.code_cache import start_child

log = logging.getLogger("gridfleet.worker")
PROTOCOL = 1  # the agent and a warm process of another commit (a pinned worktree) must speak the same
READY_TIMEOUT = 120.0  # importing torch on a busy machine; a job waits this long at most, then starts cold
REPLY_TIMEOUT = 30.0
MAX_PINNED = 2  # warm processes kept for pinned worktrees besides the agent's own (each holds torch's memory)
MAX_FAILURES = 3  # a code root whose warm process failed this often in a row is served cold from then on
WARM_NAME = b"gridfleet-warm"  # /proc/<pid>/comm, so `ps` (and the tests) tell the two apart
JOB_NAME = b"gridfleet-job"
PR_SET_NAME = 15
# Imported after the trainers when they imported torch (a sleep/noop-only worker needs none of it). torch
# imports torch._dynamo lazily, on the first optimizer built (816 modules, sympy among them: 4.6 s of a first
# gated_rnn step when measured); importing it starts no thread.
WARM_IMPORTS = ("torch._dynamo",)

# What a job child needs besides its pipes: (job, workdir, store_root, keep, stores). A gang's child
# (worker/gang_child.py): (jobs, workdirs, gang_dir, store_root, keep, stores).
JobArgs = tuple
GangArgs = tuple


class WarmUnavailable(RuntimeError):
    """This job cannot be forked warm (the warm process died, never got ready, refused); it starts cold."""


@dataclass
class Started:
    """A running job child as the agent sees it, whichever way it was started."""

    child: Any  # multiprocessing.Process (cold) or WarmChild
    receiver: Connection  # the child's reports; EOF once it has exited
    stop: Any  # .set() asks the child to checkpoint and stop; .is_set()
    warm: bool

    def close(self) -> None:
        self.receiver.close()
        if isinstance(self.stop, (PipeStop, GangStop)):
            self.stop.close()


class Launcher:
    """Starts job children for an agent. One warm process per code root (None: the agent's own code)."""

    def __init__(self, preload: list[str], warm: bool = True):
        self._mp = multiprocessing.get_context("spawn")
        self.preload = list(preload)
        # pidfds make the agent's kill and liveness checks of a child it is not the parent of exact (Linux 5.3+)
        self.warm = warm and hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")
        self._zygotes: OrderedDict[str | None, Zygote] = OrderedDict()
        self._failures: dict[str | None, int] = {}

    def prewarm(self, code_root: Path | None = None) -> None:
        """Start the warm process now, so its imports overlap registering and claiming."""
        if self.warm and self._usable(code_root):
            try:
                self._zygote(code_root)
            except OSError as exc:  # could not even be started: the jobs start cold
                self._failed(_key(code_root), exc)

    def wait_warm(self, stopping=lambda: False) -> None:
        """Wait until the agent's own warm process is ready (or has failed), so a claimed job's lease is not
        spent on imports. Returns early once `stopping()` says so."""
        if self.warm and self._usable(None):
            try:
                self._zygote(None).wait_ready(stopping)
            except (WarmUnavailable, OSError) as exc:
                self._failed(None, exc)

    def start(self, args: JobArgs, code_root: Path | None) -> Started:
        if self.warm and self._usable(code_root):
            key = _key(code_root)
            try:
                started = self._zygote(code_root).start(args)
                self._failures[key] = 0
                return started
            except (WarmUnavailable, OSError) as exc:  # OSError: the warm process could not be started
                self._failed(key, exc)
        return self._start_cold(args, code_root)

    def start_gang(self, args: GangArgs, code_root: Path | None) -> Started:
        """A gang's one child (worker/gang_child.py), forked warm when it can be; its `stop` is a GangStop."""
        if self.warm and self._usable(code_root):
            key = _key(code_root)
            try:
                started = self._zygote(code_root).start(args, kind="gang")
                self._failures[key] = 0
                return started
            except (WarmUnavailable, OSError) as exc:
                self._failed(key, exc)
        return self._start_gang_cold(args, code_root)

    def warm_pid(self, code_root: Path | None = None) -> int | None:
        zygote = self._zygotes.get(_key(code_root))
        return zygote.process.pid if zygote is not None else None

    def close(self) -> None:
        for zygote in self._zygotes.values():
            zygote.close()
        self._zygotes.clear()

    # ---- inside --------------------------------------------------------------------------------
    def _start_cold(self, args: JobArgs, code_root: Path | None) -> Started:
        job, workdir, store_root, keep, stores = args
        receiver, sender = self._mp.Pipe(duplex=False)
        if code_root is not None:  # a pinned commit may be older than verdicts: its runner takes an Event
            stop = self._mp.Event()
            child = self._mp.Process(target=runner.run_job, daemon=True,
                                     args=(job, workdir, store_root, keep, sender, stop, os.getpid(), stores))
            start_child(child, code_root)  # a pinned job's child imports the worktree's code
            sender.close()
            return Started(child, receiver, stop, warm=False)
        stop_read, stop_write = self._mp.Pipe(duplex=False)  # a pipe as a warm child's: it carries verdicts too
        child = self._mp.Process(target=_job_cold_main, daemon=True,
                                 args=(job, workdir, store_root, keep, sender, stop_read, os.getpid(), stores))
        start_child(child, None)
        sender.close()
        stop_read.close()
        return Started(child, receiver, PipeStop(stop_write.fileno(), stop_write), warm=False)

    def _start_gang_cold(self, args: GangArgs, code_root: Path | None) -> Started:
        jobs, workdirs, gang_dir, store_root, keep, stores = args
        receiver, sender = self._mp.Pipe(duplex=False)
        stop_read, stop_write = self._mp.Pipe(duplex=False)  # a Connection travels to a spawned child
        child = self._mp.Process(target=_gang_cold_main, daemon=True,
                                 args=(jobs, workdirs, gang_dir, store_root, keep, sender, stop_read, os.getpid(),
                                       stores))
        start_child(child, code_root)
        sender.close()
        stop_read.close()
        return Started(child, receiver, GangStop(stop_write.fileno(), stop_write), warm=False)

    def _usable(self, code_root: Path | None) -> bool:
        if self._failures.get(_key(code_root), 0) >= MAX_FAILURES:
            return False
        # A pinned commit from before warm starts has no warm process to run: its jobs start cold.
        return code_root is None or (code_root / "worker" / "warm.py").is_file()

    def _zygote(self, code_root: Path | None) -> Zygote:
        key = _key(code_root)
        zygote = self._zygotes.get(key)
        if zygote is not None and (zygote.broken or not zygote.process.is_alive()):
            log.warning("the warm process for %s died or lost track (exit code %s); starting a new one",
                        zygote.label, zygote.process.exitcode)
            self._drop(key)
            zygote = None
        if zygote is None:
            zygote = self._zygotes[key] = Zygote(self._mp, code_root, self.preload)
            pinned = [k for k in self._zygotes if k is not None]
            for old in pinned[: max(0, len(pinned) - MAX_PINNED)]:
                self._drop(old)
        self._zygotes.move_to_end(key)
        return zygote

    def _failed(self, key: str | None, exc: Exception) -> None:
        self._failures[key] = self._failures.get(key, 0) + 1
        label = key or "this checkout"
        if self._failures[key] >= MAX_FAILURES:
            log.warning("warm start for %s failed %d times (%s); its jobs start cold from now on",
                        label, MAX_FAILURES, exc)
        else:
            log.warning("warm start for %s failed (%s); the next job tries a new warm process", label, exc)
        self._drop(key)

    def _drop(self, key: str | None) -> None:
        zygote = self._zygotes.pop(key, None)
        if zygote is not None:
            zygote.close()


def _key(code_root: Path | None) -> str | None:
    return None if code_root is None else str(code_root)


class Zygote:
    """The agent's handle on one warm process: a spawned child (importing `code_root`'s code, or the agent's)
    and a Unix socket pair to it, on which requests, replies and file descriptors travel."""

    def __init__(self, mp, code_root: Path | None, preload: list[str]):
        self.label = str(code_root) if code_root else "this checkout"
        self.conn, theirs = mp.Pipe()  # duplex: a socket pair, so descriptors can be sent on it
        self.process = mp.Process(target=serve, args=(theirs, os.getpid(), preload), daemon=True,
                                  name="gridfleet-warm")
        self.began = time.monotonic()
        start_child(self.process, code_root)
        theirs.close()
        self.info: dict[str, Any] | None = None
        self.broken = False  # a reply went missing: the next one could be read as the wrong one

    def start(self, args: JobArgs, kind: str = "start") -> Started:
        """kind "start": a job child (runner.run_job); "gang": a gang's child (gang_child.run_gang)."""
        self.wait_ready()
        receiver, sender = multiprocessing.Pipe(duplex=False)
        stop_read, stop_write = os.pipe()
        try:
            self.conn.send((kind, args))
            send_handle(self.conn, sender.fileno(), self.process.pid)
            send_handle(self.conn, stop_read, self.process.pid)
            reply = self._recv(REPLY_TIMEOUT)
            if reply[0] != "started":
                raise WarmUnavailable(f"the warm process could not fork: {reply[1]}")
            pidfd = recv_handle(self.conn)
        except (OSError, EOFError, WarmUnavailable) as exc:
            receiver.close()
            os.close(stop_write)
            raise WarmUnavailable(str(exc) or type(exc).__name__) from None
        finally:
            sender.close()  # the child holds the only writer now: its exit is the receiver's EOF
            os.close(stop_read)
        stop = GangStop(stop_write) if kind == "gang" else PipeStop(stop_write)
        return Started(WarmChild(self, reply[1], pidfd), receiver, stop, warm=True)

    def exit_status(self, pid: int, timeout: float = REPLY_TIMEOUT) -> int | None:
        """The exit code the warm process reaped for `pid`; None when it died too (then so did the job)."""
        try:
            reply = self._recv(timeout)
        except WarmUnavailable:
            return None
        return reply[2] if reply[:2] == ("exited", pid) else None

    def close(self) -> None:
        self.conn.close()  # the warm process reads EOF and exits
        if self.broken:  # it may be hung: do not wait for it
            self.process.kill()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def wait_ready(self, stopping=lambda: False) -> None:
        if self.info is not None:
            return
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.conn.poll(0.2):
            if stopping():
                return
            if time.monotonic() > deadline:
                self.broken = True
                raise WarmUnavailable(f"the warm process took more than {READY_TIMEOUT:.0f} s to import")
        reply = self._recv(0)
        if reply[0] != "ready" or reply[1] != PROTOCOL:
            raise WarmUnavailable(f"the warm process speaks protocol {reply[1]!r}, not {PROTOCOL}")
        info = reply[2]
        if info["cuda_initialized"]:  # a CUDA context does not survive a fork
            raise WarmUnavailable("CUDA was initialised in the warm process while importing")
        for name, error in info["failed"].items():
            log.warning("warm process for %s: importing %s failed (%s); its jobs import it themselves",
                        self.label, name, error)
        log.info("warm process %s for %s ready after %.1f s (%d threads)", self.process.pid, self.label,
                 time.monotonic() - self.began, info["threads"])
        self.info = info

    def _recv(self, timeout: float):
        try:
            if not self.conn.poll(timeout):
                self.broken = True
                raise WarmUnavailable(f"the warm process took more than {timeout:.0f} s to answer")
            return self.conn.recv()
        except (EOFError, OSError):
            self.broken = True
            raise WarmUnavailable(f"the warm process exited (code {self._exitcode()})") from None

    def _exitcode(self) -> int | None:
        self.process.join(1)
        return self.process.exitcode


class WarmChild:
    """The agent's handle on a job child a warm process forked: the part of multiprocessing.Process that
    Agent.run_job uses. A pidfd names the process exactly (no pid reuse) though the agent is not its parent."""

    def __init__(self, zygote: Zygote, pid: int, pidfd: int):
        self.pid = pid
        self.exitcode: int | None = None
        self._zygote = zygote
        self._pidfd = pidfd

    def is_alive(self) -> bool:
        if self.exitcode is None and _readable(self._pidfd, 0):
            self._collect()
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        if self.exitcode is None and _readable(self._pidfd, timeout):
            self._collect()

    def kill(self) -> None:
        if self.exitcode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:  # exited meanwhile
                pass

    def _collect(self) -> None:
        code = self._zygote.exit_status(self.pid)
        if code is None:  # the warm process died, and the job with it (PR_SET_PDEATHSIG)
            log.warning("job child %s: its warm process died; the job was killed with it", self.pid)
            code = -signal.SIGKILL
        self.exitcode = code
        os.close(self._pidfd)


class PipeStop:
    """The agent's end of a job's stop pipe (a multiprocessing.Event cannot be sent to a running process):
    b"s" asks the child to stop; b"c<step>\n" answers its wait at a rung step: go on (docs/early_stopping.md)."""

    def __init__(self, fd: int, owner: Any = None):
        self._fd = fd
        self._owner = owner  # a Connection whose descriptor this is (cold start): closing it closes fd
        self._set = False

    def set(self) -> None:
        if not self._set:
            self._set = True
            self._write(b"s")

    def is_set(self) -> bool:
        return self._set

    def answer(self, step: int, stop: bool) -> None:
        """The verdict the child waits for at `step` (from the heartbeat thread): stop now, or go on. A stop
        leaves `is_set` alone: the agent's loop still sets it, and starts the grace period then."""
        self._write(b"s" if stop else b"c%d\n" % step)

    def _write(self, data: bytes) -> None:
        try:
            os.write(self._fd, data)  # a few bytes: never blocks on a pipe the child reads
        except BrokenPipeError:  # the child is gone already
            pass

    def close(self) -> None:
        if self._owner is not None:
            self._owner.close()
        else:
            os.close(self._fd)


class GangStop:
    """The agent's end of a gang's stop pipe: one line per member to stop ("s3") or drop ("d3")."""

    def __init__(self, fd: int, owner: Any = None):
        self._fd = fd
        self._owner = owner  # a Connection whose descriptor this is (cold start): closing it closes fd
        self._said: set[bytes] = set()

    def stop_member(self, index: int) -> None:
        self._say(b"s%d\n" % index)

    def answer_member(self, index: int, step: int, stop: bool) -> None:
        """A member's verdict at a rung step (PipeStop.answer): "s<index>" stops it, "c<index>:<step>" goes on."""
        self._say(b"s%d\n" % index if stop else b"c%d:%d\n" % (index, step))

    def drop_member(self, index: int) -> None:
        self._say(b"d%d\n" % index)

    def _say(self, line: bytes) -> None:
        if line not in self._said:
            self._said.add(line)
            try:
                os.write(self._fd, line)  # a few bytes: never blocks on a pipe the child reads
            except BrokenPipeError:  # the child is gone already
                pass

    def close(self) -> None:
        if self._owner is not None:
            self._owner.close()
        else:
            os.close(self._fd)


class ChildStop:
    """The job child's end: set once the agent writes b"s", or once the agent is gone (end of file); the
    lines b"c<step>" are verdicts to go on (`wait_verdict`)."""

    def __init__(self, fd: int):
        self._fd = fd
        self._set = False
        self._go_on = 0  # the highest step the agent said to go on at

    def is_set(self) -> bool:
        if not self._set and _readable(self._fd, 0):
            self._read()
        return self._set

    def wait_verdict(self, step: int, timeout: float) -> bool:
        """Until the agent answers for `step` (go on, or stop: `is_set`), at most `timeout` seconds. False
        when no answer came."""
        deadline = time.monotonic() + timeout
        while not self._set and self._go_on < step:
            left = deadline - time.monotonic()
            if left <= 0 or not _readable(self._fd, left):
                return False
            self._read()
        return True

    def _read(self) -> None:
        data = os.read(self._fd, 4096)  # readable: returns at once
        if not data or b"s" in data:  # end of file (the agent is gone) or a stop
            self._set = True
            return
        for line in data.split(b"\n"):  # the agent writes whole lines, each at once (under PIPE_BUF)
            if line[:1] == b"c" and line[1:].isdigit():
                self._go_on = max(self._go_on, int(line[1:]))


def _readable(fd: int, timeout: float | None) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(None if timeout is None else int(timeout * 1000)))


# ---- the warm process ------------------------------------------------------------------------------
def serve(conn: Connection, agent_pid: int, preload: list[str]) -> None:
    """Import, say ready, then fork job children one at a time until the agent closes the socket."""
    _name(WARM_NAME)
    runner.die_with(agent_pid)  # kill -9 of the agent ends this process, and so (in turn) its job child
    busy = [False]

    def _on_term(_signum, _frame):
        # A SIGTERM to the whole process group must leave the job time to checkpoint: ending this process
        # would kill it. Idle, there is nothing to wait for.
        if not busy[0]:
            os._exit(0)

    signal.signal(signal.SIGTERM, _on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the agent, which stops its job
    multiprocessing.current_process().daemon = False  # a daemonic process may not start children
    try:
        conn.send(("ready", PROTOCOL, _preload(preload)))
    except OSError:  # the agent closed the socket while this process imported (its run ended): nothing to serve
        return
    fork = multiprocessing.get_context("fork")
    while True:
        try:
            kind, args = conn.recv()
            sender_fd, stop_fd = recv_handle(conn), recv_handle(conn)
        except (EOFError, OSError):
            return  # the agent closed the socket, or died
        busy[0] = True
        try:
            gang = kind == "gang"
            child = fork.Process(target=_gang_main if gang else _job_main,
                                 args=(conn, args, sender_fd, stop_fd, os.getpid()), daemon=True,  # as a cold child
                                 name=f"gang-{args[0][0]['id']}" if gang else f"job-{args[0]['id']}")
            child.start()
            pidfd = os.pidfd_open(child.pid)
        except OSError as exc:
            conn.send(("failed", str(exc)))
            busy[0] = False
            continue
        finally:
            os.close(sender_fd)
            os.close(stop_fd)
        try:
            conn.send(("started", child.pid))
            send_handle(conn, pidfd, agent_pid)
            os.close(pidfd)
            child.join()
            busy[0] = False
            conn.send(("exited", child.pid, child.exitcode))
        except OSError:  # the agent is gone: its job went with it
            return


def _preload(names: list[str]) -> dict[str, Any]:
    """Import the trainers (and so torch) and what torch imports on first use, and run their `prewarm()`
    hooks (work every job would repeat, e.g. listing a corpus's files); nothing else. No tensor operation
    runs here: torch's OpenMP pool would start threads, and a child forked after that hangs on
    its first parallel operation."""
    from worker import trainers

    failed: dict[str, str] = {}
    for name in names:
        try:
            prewarm = getattr(trainers.load(name), "prewarm", None)
            if prewarm is not None:  # a trainer's own set-up every job would repeat (no tensor operation)
                prewarm()
        except Exception as exc:  # noqa: BLE001 - a trainer that fails to import fails its own jobs, with its traceback
            failed[name] = f"{type(exc).__name__}: {exc}"
    for module in WARM_IMPORTS if "torch" in sys.modules else ():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            failed[module] = str(exc)
    torch_module = sys.modules.get("torch")
    cuda = bool(torch_module is not None and torch_module.cuda.is_initialized())
    return {"threads": len(os.listdir("/proc/self/task")) if Path("/proc/self/task").is_dir() else 1,
            "cuda_initialized": cuda, "failed": failed, "code": str(Path(runner.__file__).parents[1])}


def _job_main(control: Connection, args: JobArgs, sender_fd: int, stop_fd: int, parent_pid: int) -> None:
    """The forked job child: from here on it is what a cold child is, minus the imports."""
    control.close()  # the agent's channel to the warm process is not the job's
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # runner.run_job installs the job's own handler
    _name(JOB_NAME)
    numpy = sys.modules.get("numpy")
    if numpy is not None:  # a cold child seeds numpy's global generator afresh; forked, it would share one
        numpy.random.seed()
    job, workdir, store_root, keep, stores = args
    runner.run_job(job, workdir, store_root, keep, Connection(sender_fd, readable=False), ChildStop(stop_fd),
                   parent_pid, stores)


def _gang_main(control: Connection, args: GangArgs, sender_fd: int, stop_fd: int, parent_pid: int) -> None:
    """The forked gang child: as `_job_main`, then worker/gang_child.py."""
    from worker import gang_child

    control.close()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # gang_child.run_gang installs the gang's own handler
    _name(JOB_NAME)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    jobs, workdirs, gang_dir, store_root, keep, stores = args
    gang_child.run_gang(jobs, workdirs, gang_dir, store_root, keep, Connection(sender_fd, readable=False), stop_fd,
                        parent_pid, stores)


def _job_cold_main(job, workdir, store_root, keep, sender, stop_read, parent_pid, stores) -> None:
    """A job child spawned cold: the stop pipe arrived as a Connection; it is read as a warm child's is."""
    runner.run_job(job, workdir, store_root, keep, sender, ChildStop(stop_read.fileno()), parent_pid, stores)


def _gang_cold_main(jobs, workdirs, gang_dir, store_root, keep, sender, stop_read, parent_pid, stores) -> None:
    """A gang child spawned cold: the stop pipe arrived as a Connection; gang_child reads its descriptor."""
    from worker import gang_child

    gang_child.run_gang(jobs, workdirs, gang_dir, store_root, keep, sender, stop_read.fileno(), parent_pid, stores)


def _name(name: bytes) -> None:
    try:
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_NAME, name)
    except (OSError, AttributeError):  # not Linux: only `ps` shows less
        pass
