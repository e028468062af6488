"""The driver loop: ask -> dispatch -> tell, within a budget, given its parts as objects.

A :class:`Driver` receives the study, an optimizer, an executor, an archive and the
stages, the way an Optuna study receives a sampler; it owns none of them and builds
nothing. For each candidate the optimizer asks, ``to_recipe`` turns its params into a
recipe, the executor merges and scores it on a worker (screen, then full, as the
stages say), and the result comes back here: the trial's record is written
(:mod:`evomerge.record`), the optimizer tells the study, and the archive brings the
Pareto folder in line. The driver alone talks to the storage.

Held-out scoring never holds a candidate back. When the run has held-out splits, the
members of the current front that have no held-out scores yet are re-scored in worker
slots the optimizer leaves idle (a CMA-ES generation waiting on its last candidates,
the budget's last trials in flight) and, at the end of the session, for every member
of the final front: a member is re-scored once, whatever later joins the front, and
only members still on the front when a slot frees up. Their scores are study user
attributes (:func:`evomerge.record.holdout_key`), so a resumed run re-scores exactly
the members still missing.

Example:
    >>> driver = Driver(study, optimizer=opt, executor=SerialExecutor(spec), archive=archive,
    ...                 stages=Stages(), to_recipe=space_to_recipe, objectives=objs)  # doctest: +SKIP
    >>> state = driver.run(trials=20)                                                 # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from evomerge import record
from evomerge.pareto import hypervolume, ranked_by_mean
from evomerge.progress import task
from evomerge.run.stages import Stages
from evomerge.worker import Job, JobResult, MemberRequest

#: A session stops asking when this many of its trials failed and none finished: a broken
#: evaluator or source fails every trial alike, and each failure may cost a full evaluation.
FAILURES_BEFORE_ANY_SUCCESS = 10


@dataclass
class _Pending:
    """A trial between ask and tell."""

    trial: Any  # optuna.trial.Trial
    recipe: dict
    stage: str  # "screen" or "full"
    full: Optional[JobResult] = None


@dataclass
class RunState:
    complete: int = 0
    failed: int = 0
    pruned: int = 0
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    best: dict[str, float] = field(default_factory=dict)
    front_size: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)  # (trial, error) failed in this session
    stopped: Optional[str] = None  # why the session stopped before its budget
    elapsed: float = 0.0
    write_seconds: float = 0.0  # workers' time writing front members' folders (snapshots and waits, when in the background)
    background_write_seconds: float = 0.0  # members written in workers' background threads
    members_written: int = 0
    holdout_jobs: int = 0  # front members re-scored on the held-out split in this session
    holdout_seconds: float = 0.0  # workers' time on them (merge and evaluation)
    holdout_deferred: int = 0  # front members left for `resume` (the session's held-out share was spent)


@dataclass
class MemberPolicy:
    """Which candidates' folders workers write, and where: ``dir/<trial>`` when the candidate
    may join the front (constraints met, not dominated); ``token`` is the run folder's node token."""

    dir: Any  # Path
    objectives: Sequence[Any]
    constraints: Sequence[Any] = ()
    token: Optional[str] = None

    def request(self, trial: int, front: Sequence[Sequence[float]], always: bool = False) -> MemberRequest:
        return MemberRequest(
            folder=str(self.dir / str(trial)),
            front=tuple(tuple(v) for v in front),
            objectives=tuple((o.metric, o.direction) for o in self.objectives),
            constraints=tuple((c.metric, c.min, c.max) for c in self.constraints),
            token=self.token,
            always=always,
        )


class WorkerWrites:
    """The archive's hook for member folders that are missing (a run resumed elsewhere, a
    failed write): it queues them, and the driver has workers merge and write them."""

    def __init__(self) -> None:
        self.queued: dict[str, dict] = {}  # folder -> recipe
        self.asked: set[str] = set()

    def __call__(self, recipe: dict, folder: Any) -> None:
        if str(folder) not in self.asked:
            self.queued[str(folder)] = recipe


class Driver:
    """Runs a study's search with the parts it is given."""

    def __init__(
        self,
        study: Any,
        *,
        optimizer: Any,
        executor: Any,
        archive: Any,
        stages: Stages,
        to_recipe: Callable[[dict], dict],
        objectives: Sequence[Any],
        reference_point: Optional[Sequence[float]] = None,
        lease: Any = None,
        progress: bool = True,
        members: Optional[MemberPolicy] = None,
        writes: Optional[WorkerWrites] = None,
    ):
        self.study, self.optimizer, self.executor, self.archive = study, optimizer, executor, archive
        self.stages, self.to_recipe, self.objectives = stages, to_recipe, list(objectives)
        self.reference_point = list(reference_point) if reference_point is not None else None
        self.lease, self.progress = lease, progress
        self.members, self.writes = members, writes
        self._pending: dict[int, _Pending] = {}
        self._front: list[list[float]] = []  # objective values of the archive's front, kept in step
        self._front_trials: list[Any] = []
        self._held: dict[int, dict] = {}  # trial -> held-out scores (study user attributes)
        self._holdout_running: set[int] = set()
        self._holdout_failed: set[int] = set()  # not tried again in this session
        self._writing: set[str] = set()  # member folders workers are writing in the background

    # ------------------------------------------------------------------ loop
    def run(self, *, trials: Optional[int] = None, timeout: Optional[float] = None) -> RunState:
        """Run until ``trials`` COMPLETE + PRUNED trials exist, or ``timeout`` seconds pass."""
        state = self._count()
        self._held = record.holdouts(self.study.user_attrs) if self.stages.holdout else {}
        self._sync()  # missing member folders are queued
        start = time.monotonic()
        done_before = state.complete + state.pruned  # failures count per session: a resume starts afresh
        max_failures = max(FAILURES_BEFORE_ANY_SUCCESS, 2 * (trials or 10))
        ex, told = self.executor, set()
        try:
            with task("search", trials, enabled=self.progress) as bar:
                while True:
                    time_up = timeout is not None and time.monotonic() - start >= timeout
                    done = state.complete + state.pruned
                    remaining = None if trials is None else trials - done - len(self._pending)
                    failed = len(state.errors)
                    if failed >= max_failures or (failed >= FAILURES_BEFORE_ANY_SUCCESS and done == done_before):
                        state.stopped = f"{failed} trials failed in this session" + ("" if done > done_before else ", none finished")
                    if self.lease is not None and self.lease.lost:
                        state.stopped = "another driver took this study over (this one's heartbeat stalled)"
                    self._submit_writes()
                    free = ex.slots - ex.in_flight()
                    if not time_up and free > 0 and (remaining is None or remaining > 0) and state.stopped is None:
                        for trial in self.optimizer.ask(self.study, free if remaining is None else min(free, remaining)):
                            self._dispatch(trial)
                            free -= 1
                    if free > 0 and not (self.lease is not None and self.lease.lost):
                        self._submit_holdouts(free, state)  # slots the optimizer leaves idle, and the session's end
                    if ex.in_flight() == 0 and not self._flush(state):
                        break
                    for result in ex.poll():
                        if result.note and result.note.split(": ", 1)[-1] not in told:
                            told.add(result.note.split(": ", 1)[-1])
                            bar.say(result.note)
                        self._handle(result, state)
                        for number, error in state.errors:
                            if error not in told:
                                told.add(error)
                                bar.say(f"trial {number} failed: {error}")
                        bar.advance(state.complete + state.pruned, info=_info(state))
        except KeyboardInterrupt:
            self._interrupt()
            raise
        state.elapsed = time.monotonic() - start
        state.holdout_deferred = len(self.holdout_todo())
        return state

    def _dispatch(self, trial: Any) -> None:
        recipe = self.to_recipe(trial.params)
        record.write(trial, recipe=recipe)
        kind, limit = self.stages.first()
        self._pending[trial.number] = _Pending(trial, recipe, kind)
        self.executor.submit(self._job(trial.number, recipe, kind, limit))

    def holdout_todo(self) -> list[Any]:
        """Front members without held-out scores, none in flight, best validation mean first
        (the member a user takes is re-scored first)."""
        if not self.stages.holdout:
            return []
        skip = self._held.keys() | self._holdout_running | self._holdout_failed
        return ranked_by_mean([t for t in self._front_trials if t.number not in skip], self.objectives)

    def _submit_holdouts(self, free: int, state: RunState) -> None:
        """Beside candidates in flight, a slot that would idle takes a member; once none is
        in flight, members are re-scored within the session's held-out share of worker time."""
        for t in self.holdout_todo()[:free]:
            if not self._pending:
                done = state.holdout_jobs
                next_cost = state.holdout_seconds / done if done else (state.merge_seconds + state.eval_seconds) / max(1, state.complete + state.failed)
                spent = state.holdout_seconds + next_cost * len(self._holdout_running)
                if not self.stages.holdout_fits(spent=spent, next_cost=next_cost, search=state.merge_seconds + state.eval_seconds):
                    return
            self._holdout_running.add(t.number)
            self.executor.submit(Job(t.number, record.get(t, "recipe"), kind="holdout"))

    def _holdout_done(self, r: JobResult, state: RunState) -> None:
        self._holdout_running.discard(r.trial)
        state.holdout_jobs += 1
        state.holdout_seconds += r.merge_seconds + r.eval_seconds
        if r.error is not None or r.scores is None:
            self._holdout_failed.add(r.trial)
            state.errors.append((r.trial, f"held-out scoring: {r.error}"))
            return
        record.write_holdout(self.study, r.trial, r.scores)
        self._held[r.trial] = dict(r.scores)
        self._sync()

    def _sync(self) -> list[Any]:
        """Bring the Pareto folder and pareto.json in line with the study; returns the front."""
        front = self.archive.sync(self.study.get_trials(deepcopy=False), holdout=self._held)
        self._front_trials, self._front = front, self._values(front)
        return front

    def _job(self, trial: int, recipe: dict, kind: str, limit: Any = None) -> Job:
        """A job; a full one carries the request to write its folder if it may join the front."""
        member = self.members.request(trial, self._front) if kind == "full" and self.members is not None else None
        return Job(trial, recipe, kind=kind, limit=limit, member=member)

    def _submit_writes(self) -> None:
        if self.writes is None or self.members is None:
            return
        for folder, recipe in list(self.writes.queued.items()):
            trial = int(str(folder).rsplit("/", 1)[-1])
            self.writes.asked.add(folder)
            del self.writes.queued[folder]
            self.executor.submit(Job(trial, recipe, kind="write", member=self.members.request(trial, [], always=True)))

    def _flush(self, state: RunState) -> bool:
        """At the session's end: wait for the members workers write in the background; one
        that failed, or whose worker died, is written again by a worker. Whether jobs are in
        flight again."""
        if not self._writing:
            return False
        self._writes_done(self.executor.flush(), state)
        for folder in self._writing:  # no word of it: its worker died, or its word came with a dropped backup result
            if not Path(folder).is_dir():
                state.members_written -= 1
                self._rewrite(folder)
        self._writing.clear()
        self._sync()
        self._submit_writes()
        return self.executor.in_flight() > 0

    def _writes_done(self, done: Sequence[Any], state: RunState) -> None:
        for d in done:  # evomerge._background.WriteDone
            self._writing.discard(d.folder)
            state.background_write_seconds += d.seconds
            if d.error is not None:
                state.members_written -= 1
                state.errors.append((d.trial, f"writing its folder: {d.error}"))
                self._rewrite(d.folder)

    def _rewrite(self, folder: str) -> None:
        if self.writes is not None:
            self.writes.asked.discard(folder)  # the next sync queues it for a worker, if still on the front

    def _member_written(self, r: JobResult, state: RunState) -> None:
        """Count a member folder a worker wrote; write the files of one that runs elsewhere."""
        state.write_seconds += r.write_seconds
        if r.write_pending:  # before the writes done: this result may carry its own
            self._writing.add(r.written)
            if self.writes is not None:
                self.writes.asked.add(r.written)  # not missing: its worker is writing it
        self._writes_done(r.writes_done, state)
        if r.write_error is not None:
            state.errors.append((r.trial, f"writing its folder: {r.write_error}"))
        if r.written is None:
            return
        state.members_written += 1
        if r.files is not None:
            from evomerge.io import atomic_folder

            folder = Path(r.written)
            if not folder.is_dir():
                with atomic_folder(folder) as tmp:
                    for name, data in r.files.items():
                        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                        (tmp / name).write_bytes(data)

    def _handle(self, r: JobResult, state: RunState) -> None:
        from optuna.trial import TrialState

        self._member_written(r, state)
        if r.kind == "write":
            if r.error is not None:
                state.errors.append((r.trial, f"writing its folder: {r.error}"))
            return
        if r.kind == "holdout":
            self._holdout_done(r, state)
            return
        p = self._pending.get(r.trial)
        if p is None:
            return
        record.write(p.trial, **{"worker_id" if r.kind == "full" else f"worker_id_{r.kind}": r.worker_id})
        state.merge_seconds += r.merge_seconds
        state.eval_seconds += r.eval_seconds
        if r.error is not None:
            record.write(p.trial, error=r.error, failed_stage=r.kind)
            del self._pending[r.trial]
            self.optimizer.tell(self.study, p.trial, None, TrialState.FAIL, recorded=True)
            state.failed += 1
            state.errors.append((r.trial, r.error))
            return
        if r.kind == "screen":
            vec = self._vector(r.scores)
            record.write(p.trial, screen_scores=r.scores, screen_fidelity=r.fidelity)
            step = self.stages.after("screen", vec, front=self._front, objectives=self.objectives)
            if step == "prune":
                del self._pending[r.trial]
                self.optimizer.tell(self.study, p.trial, vec, TrialState.PRUNED, recorded=True)
                state.pruned += 1
                return
            p.stage = step
            self.executor.submit(self._job(r.trial, p.recipe, step))
            return
        p.full = r
        self._complete(p, state)

    def _complete(self, p: _Pending, state: RunState) -> None:
        from optuna.trial import TrialState

        full = p.full
        assert full is not None
        vec = self._vector(full.scores)
        hv = hypervolume(self._front + [vec], self.objectives, self._reference(vec))
        record.write(p.trial, scores=full.scores, merge_seconds=full.merge_seconds, eval_seconds=full.eval_seconds, fidelity="full", hypervolume=hv)
        if full.write_seconds:
            record.write(p.trial, write_seconds=full.write_seconds)
        del self._pending[p.trial.number]
        self.optimizer.tell(self.study, p.trial, vec, TrialState.COMPLETE, recorded=True)
        state.complete += 1
        for o, v in zip(self.objectives, vec):
            best = state.best.get(o.metric)
            if best is None or (v > best if o.direction == "maximize" else v < best):
                state.best[o.metric] = v
        state.front_size = len(self._sync())

    def _vector(self, scores: dict[str, float]) -> list[float]:
        return [float(scores[o.metric]) for o in self.objectives]

    def _values(self, trials: Sequence[Any]) -> list[list[float]]:
        return [record.objective_values(t, self.objectives) for t in trials]

    def _reference(self, vec: list[float]) -> list[float]:
        """Declared, else 10% worse than the first completed trial (the uniform baseline)
        in every objective, fixed for the rest of the run so hypervolumes compare."""
        if self.reference_point is not None:
            return self.reference_point
        ref = self.study.user_attrs.get("reference_point")
        if ref is None:
            ref = [
                v - (0.1 * abs(v) + 1e-9) if o.direction == "maximize" else v + (0.1 * abs(v) + 1e-9)
                for o, v in zip(self.objectives, vec)
            ]
            self.study.set_user_attr("reference_point", ref)
        self.reference_point = ref
        return ref

    def _interrupt(self) -> None:
        from optuna.trial import TrialState

        self.executor.cancel_all()
        for p in list(self._pending.values()):
            record.write(p.trial, error="interrupted")
            # Told to the study only, not the optimizer: a resumed cma run asks these candidates again.
            self.study.tell(p.trial, state=TrialState.FAIL)
        self._pending.clear()

    def _count(self) -> RunState:
        from optuna.trial import TrialState

        s = RunState()
        for t in self.study.get_trials(deepcopy=False):
            s.complete += t.state == TrialState.COMPLETE
            s.failed += t.state == TrialState.FAIL
            s.pruned += t.state == TrialState.PRUNED
        return s


def _info(s: RunState) -> str:
    best = " ".join(f"{k}={v:.4g}" for k, v in s.best.items())
    return f"failed {s.failed} pruned {s.pruned} | best {best} | front {s.front_size}"
