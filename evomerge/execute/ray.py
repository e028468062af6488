"""The Ray executor: a pool of long-lived worker actors on one machine or a Ray cluster.

Each actor is a :class:`~evomerge.worker.Worker` (the very code the serial executor
runs in process): it opens the sources once, loads the live model and builds its
evaluators once, then for every job merges the recipe into that model in place and
scores it. Source weights are safetensors files that every actor maps read-only, so
the actors of a node share one copy of them in the page cache, and the merge engine
keeps no task vectors: a worker added to a search costs about one merged model of
memory (its live model) and a small workspace, not a copy of every source. The driver stays
the only process that talks to the Optuna storage; only the recipe travels to actors.

Scheduling
    ``slots = workers + prefetch``. Jobs the driver submits wait in one queue in the
    driver, pinned to no actor; a dispatcher thread hands the head of the queue to the
    first idle actor the moment that actor's previous result arrives. With
    ``prefetch = workers`` (the default) a spare job is always ready, so a worker never
    waits for the driver to tell a result, update the Pareto folder and ask the next
    candidate: samplers that take asynchronous trials (TPE, GP, NSGA-II/III, random)
    keep every worker busy, at the price of up to ``prefetch`` more trials in flight
    than workers. ``prefetch=0`` gives exactly ``workers`` slots, as the serial executor.

    ``cma`` asks whole generations: the driver dispatches every candidate of a
    generation at once (the spare slots let all of them go out even when the population
    is larger than the pool), and the next generation is asked the moment the last
    result of the current one is told (pycma cannot propose it earlier). When workers
    outnumber the population, the workers left idle are put to use against stragglers:
    once the queue is empty and an actor is idle, a job that has run ``straggler_factor``
    times longer than the median job (default 1.5, at least ``straggler_min_seconds``)
    gets a *backup copy* on the idle actor, and the first copy to finish wins (a
    candidate's merge and score depend only on its recipe, so both copies compute the
    same values). A generation thus waits on a slow or overloaded worker only until a
    healthy one has redone its candidate. Backups are never launched while jobs wait in
    the queue, so they cost no throughput; the losing copy runs to its end (a running
    merge cannot be interrupted) and its result is dropped.

Faults
    An actor that dies (OOM kill, segfault, SIGKILL, its node lost) is replaced by a
    fresh actor, and its job goes back to the head of the queue for the first actor that
    is free (a replacement gets work only once its model is loaded), up to
    ``max_retries`` times; then the job comes back as a failed
    :class:`~evomerge.worker.JobResult` with ``error = "worker died N times: <reason>"``.
    Retries per ``(trial, kind)`` are kept in :attr:`RayExecutor.retries`, deaths in
    :attr:`RayExecutor.deaths`. An exception inside merge or evaluation, and a NaN or
    infinite score, are turned into the job's error by the Worker itself (the trial
    FAILs, the search goes on); an error Ray raises around the task is handled the same
    way. Replacements that die while starting, more than twice the pool size in a row,
    stop the search with an error instead of looping.

Memory
    Besides sharing the mapped sources, each actor hands freed heap pages back to the
    OS after every job (glibc ``malloc_trim``, a few ms): a merge's temporaries would
    otherwise stay resident, up to one more model per worker.

Resources
    ``cpus_per_worker`` defaults to the cluster's CPUs divided by ``workers`` (fractions
    allowed); torch uses ``max(1, floor(cpus_per_worker))`` threads in each actor.
    ``gpus_per_worker`` may be fractional (actors then share a GPU); with a GPU share
    and ``device: cpu`` the workers merge and score on ``cuda``. Without ``address`` a
    local Ray starts with ``num_cpus = os.cpu_count()`` and no dashboard unless
    ``dashboard=True``; ``address`` (``HOST:PORT``, ``auto``, ``ray://...``) joins an
    existing cluster, whose nodes must have evomerge installed and see the same model
    and run folders (a shared file system); a cluster with token authentication needs
    ``RAY_AUTH_MODE=token`` in the driver's environment (Ray sends no token to an
    explicit address otherwise). When Ray is already initialized in the process, the
    executor uses it and leaves it running; otherwise ``shutdown`` stops the local Ray,
    or disconnects from the cluster, which keeps running.

Example:
    >>> ex = RayExecutor(spec, workers=2)                      # doctest: +SKIP
    >>> ex.submit(Job(trial=0, recipe=recipe.to_dict()))        # doctest: +SKIP
    >>> [result] = ex.poll()                                    # doctest: +SKIP
    >>> ex.shutdown()                                           # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import queue
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import ray
import ray.exceptions as rex

from evomerge._background import WriteDone
from evomerge.errors import ConfigError, EvomergeError
from evomerge.merge.budget import return_freed_host_memory
from evomerge.worker import Job, JobResult, Worker, WorkerSpec

_logger = logging.getLogger(__name__)


class _QuietDefaultTokenAuth(logging.Filter):
    """Drops Ray's note that a new local cluster uses token authentication, its own default.

    Ray prints it at every start of a local cluster; evomerge starts one per search, and
    the note asks nothing of the user. Every other authentication message passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_QuietDefaultTokenAuth())

#: Errors meaning "the process running the job is gone", not "the job failed".
_DEATHS: tuple[type[BaseException], ...] = tuple(
    getattr(rex, n)
    for n in (
        "RayActorError",  # ActorDiedError, ActorUnavailableError
        "WorkerCrashedError",
        "NodeDiedError",
        "LocalRayletDiedError",
        "ObjectLostError",  # OwnerDiedError, ObjectReconstructionFailedError
        "OutOfMemoryError",
        "ActorUnschedulableError",
    )
    if hasattr(rex, n)
)


class _RayWorker(Worker):
    """A :class:`Worker` that knows its place in the pool; the actor class."""

    def __init__(self, spec: WorkerSpec, index: int):
        self.started = time.time()
        self.node = ray.util.get_node_ip_address()
        _preload(spec)
        self.bare_memory = _memory()  # libraries imported, no weights loaded yet
        super().__init__(spec, worker_id=f"ray-{index}@{self.node}")
        self.ready_at = time.time()

    def info(self) -> dict[str, Any]:
        import torch

        return {
            "worker_id": self.worker_id,
            "pid": os.getpid(),
            "node": self.node,
            "threads": torch.get_num_threads(),
            "device": self.spec.device,
            "start_seconds": self.ready_at - self.started,
            "bare_memory": self.bare_memory,
        }

    def memory(self) -> dict[str, int]:
        """Resident memory of this process now (see :func:`_memory`)."""
        return _memory()

    def run_job(self, job: Job) -> tuple[JobResult, float]:
        """Worker.run, then the heap handed back; and the seconds it all took inside the actor."""
        t0 = time.perf_counter()
        result = self.run(job)
        # a merge's and an evaluation's temporaries are freed, but glibc keeps the pages:
        # without this a worker holds up to one more model's worth of memory it no longer uses
        return_freed_host_memory()
        return result, time.perf_counter() - t0


def _preload(spec: WorkerSpec) -> None:
    """Import what building the Worker imports (the model's class too), with progress bars off.

    Actor output goes to the driver's terminal: no "Loading weights" bar per worker. Done
    before the Worker is built so that ``bare_memory`` is the process without any weights.
    """
    import torch  # noqa: F401
    import transformers
    from transformers import AutoConfig

    import evomerge.merge.engine  # noqa: F401

    transformers.utils.logging.disable_progress_bar()
    try:
        from evomerge.merge._kernels import COMPILE_MIN_NUMEL, Kernels
        from evomerge.sources import SourceModel

        ref = SourceModel.open(spec.models[0], allow_pickle=spec.allow_pickle, base_dir=None if spec.base_dir is None else Path(spec.base_dir))
        config = AutoConfig.from_pretrained(ref.path)
        transformers.AutoModelForCausalLM._model_mapping[type(config)]  # imports the architecture's module
        kernels = Kernels()
        if kernels.enabled and (kernels.force or max(math.prod(ref.shape(n)) for n in ref.tensor_names) >= COMPILE_MIN_NUMEL):
            import torch._inductor.compile_fx  # noqa: F401 - the first merge compiles its kernels
    except Exception:  # noqa: BLE001 - only a warm-up: the Worker reports real problems
        pass


def _memory() -> dict[str, int]:
    """This process's resident memory in bytes.

    ``rss``; ``uss`` (pages no other process maps); ``pss`` (shared pages divided among
    the processes mapping them); ``anon`` (private anonymous memory: heap, tensors; what
    the process costs beyond the page cache it shares: memory-mapped sources and task
    vectors are file pages and do not count, unless written to). Linux gives all four.
    """
    out: dict[str, int] = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.strip().endswith("kB")}
        out = {
            "rss": fields["Rss"],
            "pss": fields["Pss"],
            "uss": fields["Private_Clean"] + fields["Private_Dirty"],
            "anon": fields["Anonymous"],
        }
    except (OSError, KeyError, ValueError, IndexError):
        import psutil

        out = {"rss": psutil.Process().memory_info().rss}
    return out


@dataclass
class _Task:
    """One submitted job and its copies running on actors."""

    job: Job
    seq: int
    deaths: int = 0
    reasons: list[str] = field(default_factory=list)
    copies: int = 0  # running copies (a backup makes 2)
    started: float = 0.0  # when the first running copy was dispatched
    done: bool = False


@dataclass
class _Actor:
    index: int
    handle: Any
    ready_ref: Any
    running: Optional[tuple[_Task, Any, float]] = None  # task, result ref, dispatched at
    worker_id: Optional[str] = None
    info: Optional[dict] = None  # the actor's info() once it has answered
    busy_seconds: float = 0.0  # time inside Worker.run, all copies counted
    jobs: int = 0


class RayExecutor:
    """An actor pool of :class:`Worker`; see the module docstring for the policy."""

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        workers: int = 1,
        cpus_per_worker: Optional[float] = None,
        gpus_per_worker: Optional[float] = None,
        address: Optional[str] = None,
        dashboard: bool = False,
        max_retries: int = 2,
        prefetch: Optional[int] = None,
        straggler_factor: Optional[float] = 1.5,
        straggler_min_seconds: float = 1.0,
        start_timeout: float = 600.0,
        runtime_env: Optional[dict] = None,
    ):
        if workers < 1:
            raise ConfigError(f"executor: workers must be >= 1, got {workers}")
        if max_retries < 0:
            raise ConfigError(f"executor: max_retries must be >= 0, got {max_retries}")
        self.workers = workers
        self.max_retries = max_retries
        self.prefetch = workers if prefetch is None else max(0, int(prefetch))
        self.slots = workers + self.prefetch
        self.straggler_factor = straggler_factor
        self.straggler_min_seconds = straggler_min_seconds
        #: (trial, kind) -> how many times its worker died under it (and it was retried)
        self.retries: dict[tuple[int, str], int] = {}
        #: one line per actor death: "<worker id>: <reason>"
        self.deaths: list[str] = []
        #: backup copies launched for stragglers
        self.backups = 0

        self._own_ray = False
        self._connect(address, dashboard, runtime_env)
        try:
            total = ray.cluster_resources()
            cpus, gpus = self._resources(total, cpus_per_worker, gpus_per_worker)
        except BaseException:
            self._disconnect()
            raise
        self.cpus_per_worker, self.gpus_per_worker = cpus, gpus
        threads = spec.threads or max(1, math.floor(cpus))
        device = spec.device
        if gpus and device == "cpu":
            device = "cuda"
        self.spec = dataclasses.replace(spec, threads=threads, device=device)
        self._actor_cls = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0)(_RayWorker)

        self._lock = threading.RLock()
        self._queue: deque[_Task] = deque()
        self._actors: dict[int, _Actor] = {}
        self._index = itertools.count()
        self._seq = itertools.count()
        self._results: queue.Queue[JobResult] = queue.Queue()
        self._outstanding = 0  # submitted, not yet returned by poll, not cancelled
        self._durations: list[float] = []
        self._start_failures = 0  # replacements in a row that died before they were up
        self._busy_total = 0.0
        self._stop = threading.Event()
        self._thread_error: Optional[BaseException] = None
        self.window: list[Optional[float]] = [None, None]  # first dispatch, last result (monotonic)

        try:
            for _ in range(workers):
                self._spawn()
            self._wait_ready(start_timeout)
        except BaseException:
            self._kill_all()
            self._disconnect()
            raise
        self._thread = threading.Thread(target=self._loop, name="evomerge-ray-dispatch", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ set-up
    def _connect(self, address: Optional[str], dashboard: bool, runtime_env: Optional[dict]) -> None:
        if ray.is_initialized():
            return  # someone (a notebook, a test) already runs Ray here: use it, leave it running
        kwargs: dict[str, Any] = {"runtime_env": runtime_env} if runtime_env else {}
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                level = logging.INFO if dashboard else logging.WARNING  # INFO prints the dashboard's address
                ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=bool(dashboard), logging_level=level, **kwargs)
        except (ConnectionError, ray.exceptions.RaySystemError, RuntimeError, ValueError) as exc:
            if not address:
                raise
            why = _one_line(exc, 160) + (f": {_one_line(exc.__cause__, 300)}" if exc.__cause__ else "")
            hint = " (the cluster uses token authentication: set RAY_AUTH_MODE=token)" if "auth" in why.lower() else ""
            raise ConfigError(f"executor.ray_address {address!r}: cannot join the Ray cluster ({why}){hint}") from None
        self._own_ray = True

    def _disconnect(self) -> None:
        if self._own_ray and ray.is_initialized():
            ray.shutdown()
        self._own_ray = False

    def _resources(self, total: dict, cpus: Optional[float], gpus: Optional[float]) -> tuple[float, float]:
        have_cpu, have_gpu = float(total.get("CPU", 0)), float(total.get("GPU", 0))
        w = self.workers
        if cpus is None:
            share = have_cpu / w if have_cpu else 1.0
            cpus = math.floor(share) if share >= 1 else share
        if gpus is None:
            gpus = 0.0
        if cpus <= 0 or gpus < 0:
            raise ConfigError(f"executor: cpus_per_worker must be > 0 and gpus_per_worker >= 0 (got {cpus}, {gpus})")
        if cpus * w > have_cpu + 1e-9:
            raise ConfigError(
                f"executor: {w} workers x {cpus:g} CPUs need {cpus * w:g} CPUs; the Ray cluster has {have_cpu:g} "
                "(lower --workers or --cpus-per-worker)"
            )
        if gpus * w > have_gpu + 1e-9:
            raise ConfigError(
                f"executor: {w} workers x {gpus:g} GPUs need {gpus * w:g} GPUs; the Ray cluster has {have_gpu:g} "
                "(lower --workers or --gpus-per-worker)"
            )
        return float(cpus), float(gpus)

    def _spawn(self) -> _Actor:
        i = next(self._index)
        handle = self._actor_cls.options(name=None).remote(self.spec, i)
        actor = _Actor(i, handle, handle.info.remote())
        self._actors[i] = actor
        return actor

    def _wait_ready(self, timeout: float) -> None:
        refs = {a.ready_ref: a for a in self._actors.values()}
        try:
            infos = ray.get(list(refs), timeout=timeout)
        except rex.GetTimeoutError:
            raise EvomergeError(
                f"executor: {self.workers} Ray workers did not start within {timeout:g} s "
                f"(resources asked per worker: {self.cpus_per_worker:g} CPU, {self.gpus_per_worker:g} GPU)"
            ) from None
        except _DEATHS + (rex.RayTaskError,) as exc:
            raise EvomergeError(f"executor: a Ray worker failed to start: {_reason(exc)}") from None
        for actor, info in zip(refs.values(), infos):
            actor.info, actor.worker_id = info, info["worker_id"]

    # ------------------------------------------------------------------ protocol
    def submit(self, job: Job) -> None:
        with self._lock:
            self._raise_if_broken()
            self._queue.append(_Task(job, next(self._seq)))
            self._outstanding += 1
            self._dispatch()

    def poll(self, timeout: float | None = None) -> list[JobResult]:
        """Finished results; waits (up to ``timeout``) until at least one is there."""
        out: list[JobResult] = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._raise_if_broken()
            with self._lock:
                if self._outstanding == 0 and self._results.empty():
                    return out
            wait = 0.5 if deadline is None else min(0.5, max(0.0, deadline - time.monotonic()))
            try:
                out.append(self._results.get(timeout=wait))
                break
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    return out
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                break
        with self._lock:
            self._outstanding -= len(out)
        return out

    def in_flight(self) -> int:
        with self._lock:
            return self._outstanding

    def cancel_all(self) -> list[Job]:
        """Drop every job not yet returned. Running copies finish on their actors; their results are ignored."""
        with self._lock:
            dropped = [t.job for t in self._queue]
            self._queue.clear()
            seen = set()
            for a in self._actors.values():
                if a.running is not None and not a.running[0].done and id(a.running[0]) not in seen:
                    seen.add(id(a.running[0]))
                    a.running[0].done = True
                    dropped.append(a.running[0].job)
            while True:  # finished but never polled: the caller abandons them too
                try:
                    self._results.get_nowait()
                except queue.Empty:
                    break
            self._outstanding = 0
            return dropped

    def flush(self, timeout: float = 3600) -> list[WriteDone]:
        """Wait for the members the actors write in the background. An actor that died
        meanwhile lost its write, and one still running a copy nobody waits for (a
        straggler whose backup won) is not waited for: a folder they leave missing is
        written again at the driver's request."""
        with self._lock:
            actors = [a for a in self._actors.values() if a.running is None]
        refs = [a.handle.flush_writes.remote() for a in actors]
        done: list[WriteDone] = []
        for ref in refs:
            try:
                done.extend(ray.get(ref, timeout=timeout))
            except Exception:  # noqa: BLE001 - a dead or stuck actor; see the docstring
                continue
        return done

    def shutdown(self) -> None:
        self._stop.set()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread.is_alive():
            thread.join(timeout=5)
        with self._lock:
            self._queue.clear()
            self._kill_all()
        self._disconnect()

    # ------------------------------------------------------------------ introspection
    def worker_info(self, timeout: float = 60) -> list[dict[str, Any]]:
        """``info()`` of every live actor: worker id, pid, node, threads, start-up seconds."""
        with self._lock:
            actors = list(self._actors.values())
        return list(ray.get([a.ready_ref for a in actors], timeout=timeout))

    def running_jobs(self) -> list[dict[str, Any]]:
        """What each busy actor runs now: trial, kind, worker id, pid (once known), seconds so far."""
        now = time.monotonic()
        out = []
        with self._lock:
            for a in self._actors.values():
                if a.running is None:
                    continue
                task, _, since = a.running
                info = self._info(a)
                out.append(
                    {
                        "trial": task.job.trial,
                        "kind": task.job.kind,
                        "worker_id": a.worker_id,
                        "pid": info["pid"] if info else None,
                        "seconds": now - since,
                        "backup": task.copies > 1,
                    }
                )
        return out

    def _info(self, actor: _Actor) -> Optional[dict]:
        if actor.info is None:
            ready, _ = ray.wait([actor.ready_ref], timeout=0)
            if ready:
                try:
                    actor.info = ray.get(actor.ready_ref)
                    actor.worker_id = actor.info["worker_id"]
                except Exception:  # noqa: BLE001 - it died starting; the job's error says so
                    return None
        return actor.info

    def worker_memory(self, timeout: float = 60) -> list[dict[str, Any]]:
        """Resident memory of every live actor, measured inside it (rss, uss, pss bytes)."""
        with self._lock:
            actors = list(self._actors.values())
        mems = ray.get([a.handle.memory.remote() for a in actors], timeout=timeout)
        return [dict(m, worker_id=a.worker_id) for a, m in zip(actors, mems)]

    def busy_seconds(self) -> float:
        """Seconds actors spent inside Worker.run (every copy, dead actors included)."""
        with self._lock:
            return self._busy_total

    # ------------------------------------------------------------------ internals
    def _raise_if_broken(self) -> None:
        if self._thread_error is not None:
            raise EvomergeError(f"executor: the Ray dispatcher stopped: {_one_line(self._thread_error, 300)}")

    def _idle(self) -> list[_Actor]:
        """Actors that have started and run nothing. Lock held.

        A replacement is not given work before it is up, so a retried job goes to whichever
        actor frees up first instead of waiting for the newcomer to load its model.
        """
        starting = [a for a in self._actors.values() if a.info is None]
        if starting:
            ready, _ = ray.wait([a.ready_ref for a in starting], num_returns=len(starting), timeout=0)
            for a in starting:
                if a.ready_ref not in ready:
                    continue
                try:
                    a.info = ray.get(a.ready_ref)
                    a.worker_id = a.info["worker_id"]
                    self._start_failures = 0
                except _DEATHS + (rex.RayTaskError,) as exc:  # died while starting: try another
                    self._start_failures += 1
                    if self._start_failures > 2 * self.workers:
                        raise EvomergeError(f"executor: Ray workers keep dying while they start: {_reason(exc)}") from None
                    self._replace(a, exc)
        return [a for a in self._actors.values() if a.running is None and a.info is not None]

    def _dispatch(self) -> None:
        """Queue head -> idle actors; then backups for stragglers when actors are still idle. Lock held."""
        idle = self._idle()
        while idle and self._queue:
            task = self._queue.popleft()
            if task.done:
                continue
            self._start(idle.pop(0), task)
        if idle and not self._queue and self.straggler_factor:
            self._backup(idle)

    def _start(self, actor: _Actor, task: _Task) -> None:
        now = time.monotonic()
        if self.window[0] is None:
            self.window[0] = now
        ref = actor.handle.run_job.remote(task.job)
        actor.running = (task, ref, now)
        if task.copies == 0:
            task.started = now
        task.copies += 1

    def _backup(self, idle: list[_Actor]) -> None:
        if not self._durations:
            return  # no idea yet how long a job takes
        limit = max(self.straggler_min_seconds, self.straggler_factor * statistics.median(self._durations[-50:]))
        now = time.monotonic()
        lonely = sorted(
            {id(a.running[0]): a.running[0] for a in self._actors.values() if a.running and not a.running[0].done and a.running[0].copies == 1}.values(),
            key=lambda t: t.started,
        )
        for task in lonely:
            if not idle or now - task.started < limit:
                break
            self._start(idle.pop(0), task)
            self.backups += 1
            _logger.info("trial %d: backup copy after %.1f s (median job %.1f s)", task.job.trial, now - task.started, limit / self.straggler_factor)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    refs = {a.running[1]: a for a in self._actors.values() if a.running is not None}
                    if not refs:
                        self._dispatch()
                if not refs:
                    time.sleep(0.02)
                    continue
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.05)
                with self._lock:
                    for ref in ready:
                        self._finish(refs[ref], ref)
                    self._dispatch()  # also re-checks stragglers every 50 ms
        except BaseException as exc:  # noqa: BLE001 - surfaced by the next poll/submit
            if not self._stop.is_set():
                _logger.exception("ray dispatcher failed")
                self._thread_error = exc

    def _finish(self, actor: _Actor, ref: Any) -> None:
        """One copy of a task came back (or its actor died). Lock held."""
        task, _, dispatched = actor.running
        actor.running = None
        task.copies -= 1
        try:
            result, inside = ray.get(ref)
        except _DEATHS as exc:
            self._replace(actor, exc)
            if task.done or task.copies > 0:
                return  # cancelled, or a backup copy is still running
            task.deaths += 1
            task.reasons.append(_reason(exc))
            key = (task.job.trial, task.job.kind)
            if task.deaths <= self.max_retries:
                self.retries[key] = self.retries.get(key, 0) + 1
                self._queue.appendleft(task)  # first in line for the next idle actor
                return
            self._deliver(task, self._error(task, f"worker died {task.deaths} times: {task.reasons[-1]}", actor))
            return
        except rex.RayTaskError as exc:  # Worker.run catches Exception; this is whatever escaped it
            actor.jobs += 1
            if task.done:
                return
            self._deliver(task, self._error(task, _reason(exc), actor))
            return
        actor.jobs += 1
        actor.busy_seconds += inside
        self._busy_total += inside
        if task.done:
            return  # the other copy won, or the job was cancelled
        self._durations.append(time.monotonic() - dispatched)
        self._deliver(task, result)

    def _deliver(self, task: _Task, result: JobResult) -> None:
        task.done = True
        result.retries = task.deaths  # type: ignore[attr-defined] - times its worker died under it
        self.window[1] = time.monotonic()
        self._results.put(result)

    def _error(self, task: _Task, message: str, actor: _Actor) -> JobResult:
        j = task.job
        return JobResult(j.trial, j.kind, None, message[:500], 0.0, 0.0, actor.worker_id or f"ray-{actor.index}", j.limit)

    def _replace(self, actor: _Actor, exc: BaseException) -> None:
        self.deaths.append(f"{actor.worker_id or f'ray-{actor.index}'}: {_reason(exc)}")
        _logger.warning("Ray worker %s died (%s); starting a replacement", actor.worker_id, _reason(exc))
        self._actors.pop(actor.index, None)
        try:
            ray.kill(actor.handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        if not self._stop.is_set():
            new = self._spawn()
            new.worker_id = f"ray-{new.index}"  # completed by its info() once it is up

    def _kill_all(self) -> None:
        for a in list(self._actors.values()):
            try:
                ray.kill(a.handle, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self._actors.clear()


def _one_line(exc: BaseException, n: int) -> str:
    return " ".join(str(exc).split())[:n]


def _reason(exc: BaseException) -> str:
    """A short, one-line reason for an actor death or a task error."""
    if isinstance(exc, rex.RayTaskError) and exc.cause is not None:
        cause = exc.cause
        return f"{type(cause).__name__}: {_one_line(cause, 300)}"
    text = str(exc)
    detail = ""
    for marker in ("Worker exit detail:", "error raised in its creation task", "The actor is dead because"):
        at = text.find(marker)
        if at >= 0:
            detail = " ".join(text[at:].split(" Some common causes")[0].split())[:240]
            break
    head = " ".join(text.split("\n")[0].split())[:160]
    return f"{type(exc).__name__}: {head}" + (f" ({detail})" if detail and detail not in head else "")
