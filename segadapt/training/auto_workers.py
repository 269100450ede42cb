"""Several workers on one ``segadapt auto`` search: the storage they share, who runs which trial, the budget,
and who trains a fold's final run (:mod:`segadapt.training.auto`).

Every ``segadapt auto`` process is a worker: ``--workers N`` starts N of them, and the same command started in
another shell or Slurm job joins the search. Workers share nothing but files:

* the studies: Optuna's ``JournalStorage`` on ``auto/study.journal`` (``JournalFileBackend``: an append-only
  log under a lock file, the storage Optuna documents for several processes on one machine or on NFS, where
  SQLite's ``fcntl`` locks and its single writer make an RDB file lock up or break);
* ``auto/fold<k>/.fold.lock`` (a blocking ``filelock``): held for the short steps that must not interleave:
  the trials of dead workers failed and enqueued again, the budget counted from the storage, a trial asked and
  claimed;
* ``auto/fold<k>/claims/<trial folder>/.lock``: a trial's run folder claimed for as long as a worker runs it
  (:func:`~segadapt.runs.run_folder_lock`: the kernel releases it when the process dies, SIGKILL included), so a
  RUNNING trial whose claim nobody holds belongs to a dead worker;
* ``auto/fold<k>/claims/final/.lock``: the one worker that chooses and trains the fold's final run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Optional

import optuna
from filelock import FileLock
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from segadapt.errors import one_line
from segadapt.runs import METRICS_FILE, check_not_in_use, run_folder_lock

from .auto_study import COUNTED, retry_interrupted

STUDY_FILE = "study.journal"
FOLD_LOCK = ".fold.lock"
CLAIMS = "claims"
FINAL = "final"


def open_storage(auto_dir: Path) -> JournalStorage:
    """The studies of the search in `auto_dir` (``study.journal``)."""
    return JournalStorage(JournalFileBackend(str(auto_dir / STUDY_FILE)))


def study_names(storage: JournalStorage) -> set[str]:
    return set(optuna.get_all_study_names(storage))


@contextmanager
def fold_lock(fold_dir: Path) -> Iterator[None]:
    """Hold the fold's short-step lock (blocking: the other workers wait seconds at most)."""
    fold_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(fold_dir / FOLD_LOCK):
        yield


def claim_dir(fold_dir: Path, run_dir: str | Path) -> Path:
    return fold_dir / CLAIMS / Path(run_dir).name


def claimed(fold_dir: Path, run_dir: Optional[str]) -> bool:
    """Whether a live process holds the claim of trial folder `run_dir`."""
    if run_dir is None:
        return False
    try:
        check_not_in_use(claim_dir(fold_dir, run_dir))
    except BlockingIOError:
        return True
    return False


def fail_dead_trials(study: optuna.Study, fold_dir: Path) -> None:
    """Trials left RUNNING by a worker that died (nobody holds their claim) are told FAIL, to be retried
    (:func:`~segadapt.training.auto_study.retry_interrupted`). Under :func:`fold_lock`: a trial is claimed
    in the same locked step that asks for it."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not claimed(fold_dir, trial.user_attrs.get("run_dir")):
            study.tell(trial.number, state=TrialState.FAIL)


def budget_left(study: optuna.Study, trials: Optional[int]) -> bool:
    """Whether another trial may start: the finished trials (and those that failed with an error), those
    running in any worker and those waiting to be retried count against ``--trials``, read from the storage."""
    if trials is None:
        return True
    taken = (*COUNTED, TrialState.RUNNING, TrialState.WAITING)
    return sum(t.state in taken or "error" in t.user_attrs for t in study.get_trials(deepcopy=False)) < trials


def deadline(study: optuna.Study, timeout: Optional[float]) -> Optional[float]:
    """The epoch second after which no trial of the fold starts: shared through the study (the first worker
    on the fold sets it to now + `timeout`); one that has passed opens a new window when no worker is on the
    fold any more (a resumed search), as one process's ``study.optimize(timeout=...)`` would."""
    if timeout is None:
        return None
    stored = study.user_attrs.get("deadline")
    busy = any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
    if stored is None or (stored <= time.time() and not busy and "dice" not in (study.user_attrs.get("final") or {})):
        stored = time.time() + timeout
        study.set_user_attr("deadline", stored)
    return stored


def final_done(study: optuna.Study) -> bool:
    """Whether the fold's final run was trained after the last trial finished (another worker finished it)."""
    final = study.user_attrs.get("final") or {}
    metrics = Path(final.get("run_dir", "")) / METRICS_FILE
    if "dice" not in final or not metrics.is_file():
        return False
    ends = [t.datetime_complete.timestamp() for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    return metrics.stat().st_mtime >= max(ends, default=0.0)


@contextmanager
def final_claim(fold_dir: Path) -> Iterator[bool]:
    """Yields True to the one worker that holds the fold's final-run claim, False to the others (at once)."""
    with ExitStack() as stack:
        try:
            stack.enter_context(run_folder_lock(claim_dir(fold_dir, FINAL)))
        except BlockingIOError:
            yield False
            return
        yield True


def next_trial(study: optuna.Study, fold_dir: Path, trials: Optional[int], until: Optional[float],
               claim: ExitStack) -> Optional[optuna.Trial]:
    """The fold's next trial (a retry of an interrupted one first), its run folder claimed in `claim`; None when
    the budget allows no further trial. In one locked step: dead workers' trials failed and enqueued again
    (:func:`~segadapt.training.auto_study.retry_interrupted`), the budget counted, the trial asked and claimed."""
    with fold_lock(fold_dir):
        fail_dead_trials(study, fold_dir)
        retry_interrupted(study)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not (waiting or budget_left(study, trials)) or (until is not None and time.time() >= until):
            return None
        trial = study.ask()
        run_dir = trial.user_attrs.get("run_dir") or str(fold_dir / f"trial{trial.number:03d}")
        trial.set_user_attr("run_dir", run_dir)
        claim.enter_context(run_folder_lock(claim_dir(fold_dir, run_dir)))
    return trial


def run_and_tell(study: optuna.Study, trial: optuna.Trial, objective: Callable[[optuna.Trial], float],
                 trial_errors: tuple[type[Exception], ...]) -> None:
    """`objective`, told to the study (Optuna's ask-and-tell): a pruned trial PRUNED, a configuration that cannot
    run (`trial_errors`) FAIL with its ``error``, an interruption FAIL without one (retried later), re-raised."""
    try:
        value = objective(trial)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
    except trial_errors as error:
        if "error" not in trial.user_attrs:  # raised before training (a configuration that cannot be built)
            trial.set_user_attr("error", one_line(error))
        study.tell(trial, state=TrialState.FAIL)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    else:
        study.tell(trial, value)


def finishes_fold(study: optuna.Study, fold: int, fold_dir: Path, held: ExitStack) -> bool:
    """Whether this worker chooses and trains the final run of `fold`: no trial of the fold runs in any worker
    (the last one to finish does it), no other worker holds the final claim (kept in `held` until this
    process goes on to its next fold or ends), and the final run is not already there for every finished trial."""
    with fold_lock(fold_dir):
        fail_dead_trials(study, fold_dir)
        busy = bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    if busy:
        print(f"auto fold {fold}: trials still run in another worker, which trains the final run", flush=True)
        return False
    if not held.enter_context(final_claim(fold_dir)):
        print(f"auto fold {fold}: another worker trains the final run", flush=True)
        return False
    return not final_done(study)


@contextmanager
def base_lock(auto_dir: Path) -> Iterator[None]:
    """One worker at a time makes sure the base exists (the first pretrains it, the others then find it)."""
    auto_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(auto_dir / ".base.lock"):
        yield


def worker_argv(argv: Sequence[str]) -> list[str]:
    """`argv` of ``segadapt auto`` without ``--workers N``: what each worker process runs."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def run_workers(argv: Sequence[str], workers: int) -> None:
    """Run `workers` worker processes of ``segadapt auto argv`` and wait for them; ChildProcessError naming
    the ones that failed (each printed its own error; the same command finishes the search)."""
    command = [sys.executable, "-m", "segadapt.cli", "auto", *worker_argv(argv)]
    processes = [subprocess.Popen(command) for _ in range(workers)]
    try:
        codes = [p.wait() for p in processes]
    except BaseException:  # Ctrl-C reaches the workers too (one process group); wait for them to stop
        for p in processes:
            p.wait()
        raise
    failed = [f"worker {i} (pid {p.pid}) exited with {c}" for i, (p, c) in enumerate(zip(processes, codes)) if c]
    if failed:
        raise ChildProcessError(f"{'; '.join(failed)}; the same command finishes the search")
