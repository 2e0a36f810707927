"""Placement planning in a separate process, so that it never holds the training process's GIL.

Each training process that plans at least one layer starts one planner process, lazily, at its
first re-plan (``planner_process()``). It is a fresh interpreter (``python -m`` this module,
started by fork+exec like multiprocessing's spawn: it shares no CUDA/NCCL state, does not re-run
the training script, and never imports torch), niced by ``NICENESS`` so that it takes idle cores
only, and fed by pipes. The training thread only submits ``fn(*args)`` (the history window and the
current placement, pickled once per re-plan by a helper thread) and later collects the result.

Jobs run one at a time, in submission order. A job is *late* when its result has not arrived by
its due time: the later of its submission, the previous job's due time and (for a process still
starting) the moment it became ready, plus its allowance ``limit * LATE_FACTOR + LATE_GRACE_S``
(``limit``: the job's own planning time limit). A late job fails with ``PlannerLate`` and its
process is killed (it is past every limit it was given); a process that dies fails its jobs with
``PlannerCrashed``. Either way the next ``submit`` starts a fresh process. ``shutdown`` (also run
at interpreter exit) closes the pipes, lets the process exit and kills it if it does not.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

logger = logging.getLogger(__name__)

NICENESS = 10  # the planner yields the CPU to training threads (CFS weight 110 against 1024)
STARTUP_TIMEOUT_S = 120.0  # interpreter start, imports and the numba cache; slow only on a loaded host
LATE_FACTOR = 1.5  # a job may overrun its time limit by half (final evaluations, CP-SAT shutdown)
LATE_GRACE_S = 1.0  # plus the pipe round trip and unpickling


class PlannerError(RuntimeError):
    """A planning job raised in the planner process (the message holds its traceback)."""


class PlannerCrashed(RuntimeError):
    """The planner process exited before it answered."""


class PlannerLate(RuntimeError):
    """A planning job did not answer by its due time; its process was killed."""


class PlanJob:
    """One submitted job: ``done()``, ``result()`` (raises what the job raised); ``seconds`` from
    submission to the answer. Wait for it with ``PlannerProcess.wait``."""

    def __init__(self, fn: Callable, args: tuple, limit_s: float, submitted: float):
        self.fn, self.args = fn, args
        self.allowance = limit_s * LATE_FACTOR + LATE_GRACE_S
        self.submitted = submitted
        self.due: float | None = None  # set once the process is ready (see the module doc)
        self.seconds: float | None = None  # from submission to the answer
        self._outcome: tuple[bool, Any] | None = None

    def _finish(self, ok: bool, value: Any) -> None:
        if self._outcome is None:
            self._outcome = (ok, value)
            self.seconds = time.monotonic() - self.submitted

    @classmethod
    def answered(cls, value: Any) -> PlanJob:
        """A job that has already answered ``value`` (an exception: it failed), e.g. one restored
        from a checkpoint."""
        job = cls(None, (), 0.0, time.monotonic())
        job._finish(not isinstance(value, BaseException), value)
        return job

    def done(self) -> bool:
        return self._outcome is not None

    def result(self):
        ok, value = self._outcome
        if not ok:
            raise value
        return value


class PlannerProcess:
    """One planner process and the helper thread that feeds it (see the module doc)."""

    def __init__(self):
        self._lock = threading.Condition()
        self._jobs: queue.Queue[PlanJob | None] = queue.Queue()
        self._pending: list[PlanJob] = []  # submitted, not answered, in order
        self._proc: subprocess.Popen | None = None
        self._ready_at: float | None = None
        self._started_at = 0.0
        self._closed = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def submit(self, fn: Callable, args: tuple, limit_s: float) -> PlanJob:
        """Run ``fn(*args)`` in the planner process (started now if none runs); ``fn`` and ``args``
        must pickle (``fn`` importable by name). ``limit_s``: the job's planning time limit."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the planner process was shut down")
            if self._proc is None:
                self._start()
            job = PlanJob(fn, args, limit_s, time.monotonic())
            self._pending.append(job)
            self._set_dues()
            self._jobs.put(job)
            return job

    def wait(self, job: PlanJob) -> None:
        """Block until ``job`` answers, or fail it (``PlannerLate``) and kill the process at its due time."""
        with self._lock:
            while not job.done():
                due = job.due if job.due is not None else self._started_at + STARTUP_TIMEOUT_S + job.allowance
                left = due - time.monotonic()
                if left <= 0:
                    self._kill_late(job)
                    break
                self._lock.wait(left)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the process: close its input (it exits when idle), wait ``timeout_s``, then kill it."""
        with self._lock:
            self._closed = True
            proc = self._proc
        if proc is None:
            return
        self._jobs.put(None)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # --- internals (the lock is held by the caller unless said otherwise) ------------------------
    def _start(self) -> None:
        parent_read, child_write = os.pipe()
        child_read, parent_write = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(child_read), str(child_write)],
            pass_fds=(child_read, child_write),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        os.close(child_read)
        os.close(child_write)
        self._started_at = time.monotonic()
        self._ready_at = None
        self._jobs = queue.Queue()
        reader, writer = Connection(parent_read, writable=False), Connection(parent_write, readable=False)
        threading.Thread(
            target=self._serve, args=(self._proc, self._jobs, reader, writer), name="microep-planner-feed", daemon=True
        ).start()
        logger.info("MicroEP: started planner process %d", self._proc.pid)

    def _set_dues(self) -> None:
        if self._ready_at is None:
            return
        previous = self._ready_at
        for job in self._pending:
            if job.due is None:
                job.due = max(job.submitted, previous) + job.allowance
            previous = job.due

    def _kill_late(self, job: PlanJob) -> None:
        proc = self._proc
        logger.warning(
            "MicroEP: planner process %s gave no answer %.1f s after the job was submitted (allowance %.1f s); "
            "killing it",
            proc.pid if proc else None,
            time.monotonic() - job.submitted,
            job.allowance,
        )
        self._fail_all(PlannerLate(f"no plan within its due time ({job.allowance:.1f} s allowance)"), proc)
        if proc is not None:
            proc.kill()

    def _fail_all(self, error: BaseException, proc) -> None:
        """Fail every unanswered job of ``proc`` and forget the process (a new one starts on submit)."""
        if proc is not self._proc:
            return
        for job in self._pending:
            job._finish(False, error)
        self._pending = []
        self._proc = None
        self._jobs.put(None)  # the feeding thread stops
        self._lock.notify_all()

    def _serve(self, proc, jobs: queue.Queue, reader: Connection, writer: Connection) -> None:
        """The feeding thread: send jobs, collect answers; runs without the lock except to publish."""
        try:
            reader.recv()  # "ready"
            with self._lock:
                if proc is self._proc:
                    self._ready_at = time.monotonic()
                    self._set_dues()
                    self._lock.notify_all()
            while True:
                job = jobs.get()
                if job is None:
                    break
                if job.done():  # failed while queued
                    continue
                try:
                    request = pickle.dumps((job.fn, job.args))
                except Exception:  # noqa: BLE001 - this job cannot be sent; the process is fine
                    answer = (False, f"cannot send the job to the planner process:\n{traceback.format_exc()}")
                else:
                    writer.send_bytes(request)
                    answer = reader.recv_bytes()
                    try:
                        answer = pickle.loads(answer)
                    except Exception:  # noqa: BLE001 - e.g. a result class this process cannot import
                        answer = (False, f"cannot read the planner process's answer:\n{traceback.format_exc()}")
                with self._lock:
                    if job in self._pending:
                        self._pending.remove(job)
                    ok, value = answer
                    job._finish(ok, value if ok else PlannerError(value))
                    self._lock.notify_all()
        except (EOFError, OSError):
            code = proc.wait()
            with self._lock:
                if proc is self._proc:
                    logger.warning("MicroEP: planner process %d exited with code %s", proc.pid, code)
                    self._fail_all(PlannerCrashed(f"planner process {proc.pid} exited with code {code}"), proc)
        finally:
            reader.close()
            writer.close()


_PROCESS: PlannerProcess | None = None
_PROCESS_LOCK = threading.Lock()


def planner_process() -> PlannerProcess:
    """This training process's planner process (created on first use; shut down at exit)."""
    global _PROCESS
    with _PROCESS_LOCK:
        if _PROCESS is None:
            _PROCESS = PlannerProcess()
            atexit.register(_PROCESS.shutdown)
        return _PROCESS


def _serve_requests(reader: Connection, writer: Connection) -> None:
    """The planner process: answer each pickled ``(fn, args)`` with ``(True, fn(*args))`` or
    ``(False, traceback text)``; exit when the training process closes the pipe or goes away."""
    try:
        os.nice(NICENESS)
    except OSError:
        pass
    from megatron_microep.planning.plan import warm_up

    warm_up()
    try:
        writer.send("ready")
        while True:
            request = reader.recv_bytes()
            try:
                fn, args = pickle.loads(request)
                answer = pickle.dumps((True, fn(*args)))
            except Exception:  # noqa: BLE001 - reported to the training process, which keeps its placement
                answer = pickle.dumps((False, traceback.format_exc()))
            writer.send_bytes(answer)
    except (EOFError, BrokenPipeError):
        return


if __name__ == "__main__":
    _serve_requests(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
