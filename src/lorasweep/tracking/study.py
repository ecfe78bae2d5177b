"""The Optuna study behind a sweep: where it lives, which of its trials count, and the sweep loop
that asks, launches and tells (hydra_plugins.lorasweep_optuna runs it).

hydra-optuna-sweeper's own loop counts `n_trials` per invocation, leaves a trial RUNNING forever
when its sweeper dies, and records any exception as FAIL. This loop, over the plugin's own
parts (its sampler, search-space parsing and trial configuration):

- keeps the study in a file by default (`hydra.sweeper.storage`: a path, an RDB URL, or null
  for memory), so the same command run again continues the same study;
- counts `n_trials` over the whole study: a trial stopped because its sweeper was interrupted
  does not count, so rerunning after a Ctrl-C, a SIGTERM or a SIGKILL finishes the sweep;
- fails the trials a dead sweeper left RUNNING: at once when that sweeper ran on this host (its
  process is gone), after three missed heartbeats (HEARTBEAT_S) when it ran on another;
- lets several sweepers share one study (one file, or one PostgreSQL database): each asks for
  its trials from the same storage, so numbers never repeat and each samples from all results;
- hands each trial the way back to its Optuna trial (`TrialLink`, in an environment variable the
  job sees), so the trial reports its objective after each evaluation and can be pruned.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psutil

from lorasweep.errors import ConfigError, one_line

log = logging.getLogger(__name__)

STUDY_ENV = "LORASWEEP_OPTUNA_STUDY"  # the sweep's TrialLink, without a trial number
TRIAL_ENV = "LORASWEEP_OPTUNA_TRIAL"  # a job's trial number, set by Hydra for the job
SWEEPER_ATTR = "lorasweep.sweeper"  # trial user attr: "host:pid:start time" of its sweeper
INTERRUPTED_ATTR = "lorasweep.interrupted"  # trial user attr: failed because its sweeper stopped
COMMAND_ATTR = "lorasweep.command"  # study user attr: the overrides of the command that made it
RUN_DIR_ATTR = "lorasweep.run_dir"  # trial user attr: where the trial's run wrote its outputs
HEARTBEAT_ATTR = "lorasweep.heartbeat"  # trial user attr: when its sweeper last said it runs
RDB_ATTEMPTS = 4  # opening a database storage: tries, 1, 2, 3 s apart
HEARTBEAT_S = 60  # a running trial's heartbeat: dead after 3 missed beats (another host's)
DASHBOARD = "optuna-dashboard"

# In-memory studies by name: a trial run in the sweeper's own process (the basic launcher, one
# rank) reaches its study here; trials in other processes cannot.
_IN_MEMORY: dict[str, Any] = {}
_FINISHED: list[Any] = []  # the study of the sweep that ended last in this process


def finished_study():
    """The study the last sweep in this process ran (the sweep callback plots it); None after
    a grid sweep, which has no study."""
    return _FINISHED[-1] if _FINISHED else None


def storage_url(storage: str | None) -> str | None:
    """`hydra.sweeper.storage` as a URL Optuna's tools take: an RDB URL as given, a path to a
    `.journal` file as its absolute path (JournalStorage), any other path as sqlite."""
    if storage is None or str(storage).strip() == "":
        return None
    storage = str(storage)
    if "://" in storage:
        return storage
    path = os.path.abspath(storage)
    return path if path.endswith(".journal") else f"sqlite:///{path}"


def open_storage(storage: str | None):
    """The Optuna storage object for `hydra.sweeper.storage` (None: in memory); a file's parent
    dir is created."""
    import optuna

    url = storage_url(storage)
    if url is None:
        return None
    if "://" not in url:
        os.makedirs(os.path.dirname(url), exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        with quiet_optuna():
            return optuna.storages.JournalStorage(JournalFileBackend(url))
    if url.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(url[len("sqlite:///"):]) or ".", exist_ok=True)
    for attempt in range(RDB_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as exc:  # noqa: BLE001  (a bad URL, a server that does not answer...)
            # ...or another sweeper creating the same new database's tables at this moment
            if attempt + 1 == RDB_ATTEMPTS:
                raise ConfigError(f"hydra.sweeper.storage={mask_url(url)}: cannot open the "
                                  f"study storage: {one_line(exc)}") from None
            time.sleep(1 + attempt)


@contextmanager
def quiet_optuna() -> Iterator[None]:
    """Without the warnings Optuna gives for what lorasweep does on purpose: the journal file
    storage, add_trial and the matplotlib plots are "experimental"."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def mask_url(url: str) -> str:
    """A storage URL with its password (`user:password@host`) replaced by ****."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    credentials, _, host = rest.partition("@")
    user = credentials.split(":", 1)[0]
    return f"{head}://{user}:****@{host}" if ":" in credentials else url


def study_name(given: str | None, task_overrides: Sequence[str]) -> str:
    """`hydra.sweeper.study_name`, or one derived from the command's overrides: the same
    command finds its study again, another command (other data, another model) starts its own."""
    if given:
        return str(given)
    digest = hashlib.sha256("\n".join(sorted(task_overrides)).encode()).hexdigest()[:8]
    return f"lorasweep-{digest}"


def this_sweeper() -> str:
    me = psutil.Process()
    return f"{socket.gethostname()}:{me.pid}:{me.create_time():.0f}"


def sweeper_is_gone(owner: str, last_beat: float | None) -> bool:
    """True when the sweeper `owner` ("host:pid:start") has ended: its process is gone (this
    host), or it missed three heartbeats (another host; `last_beat` in seconds since the epoch)."""
    host, _, rest = owner.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return last_beat is not None and time.time() - last_beat > 3 * HEARTBEAT_S
    try:
        return f"{psutil.Process(int(pid)).create_time():.0f}" != started
    except psutil.NoSuchProcess:
        return True


def fail_dead_trials(study) -> list[int]:
    """Mark FAIL (interrupted) every RUNNING trial whose sweeper is gone; the trial numbers."""
    from optuna.trial import TrialState

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(SWEEPER_ATTR)
        beat = trial.user_attrs.get(HEARTBEAT_ATTR)
        if owner and sweeper_is_gone(owner, beat) and fail_interrupted(study, trial._trial_id):
            failed.append(trial.number)
    return failed


def report_dead_trials(study) -> None:
    dead = fail_dead_trials(study)
    if dead:
        log.info("trials %s were RUNNING under a sweeper that is gone: marked FAIL", dead)


def fail_interrupted(study, trial_id: int) -> bool:
    """FAIL a trial that did not end by itself (its sweeper stopped); False if it had ended."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    try:
        storage.set_trial_user_attr(trial_id, INTERRUPTED_ATTR, True)
        return storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def counted_trials(study) -> int:
    """The trials that count toward `n_trials`: finished ones (complete, pruned, failed by
    themselves) and those running now; not the ones failed because their sweeper stopped."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state != TrialState.WAITING
               and not (t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED_ATTR)))


@contextmanager
def heartbeat(study, trials: Sequence[Any]) -> Iterator[None]:
    """While `trials` run, stamp them every HEARTBEAT_S seconds (a user attr, in any storage),
    so a sweeper on another host can tell them from the trials of a dead sweeper."""
    storage = study._storage
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial in trials:
                try:
                    storage.set_trial_user_attr(trial._trial_id, HEARTBEAT_ATTR, time.time())
                except Exception as exc:  # noqa: BLE001  (a lost connection: retried next beat)
                    log.warning("heartbeat of trial %d not recorded: %s", trial.number,
                                one_line(exc))
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, name="lorasweep-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@dataclasses.dataclass
class TrialLink:
    """The way from a trial's job back to its Optuna trial: the storage, the study, the pruner
    to ask and the trial's number. The sweeper puts the first three in its own environment
    (STUDY_ENV, inherited by joblib workers, launched ranks and scheduler jobs) and each job's
    trial number in the job's (TRIAL_ENV, through `hydra.job.env_set`)."""

    storage: str | None
    study: str
    pruner: dict[str, Any] | None = None
    number: int | None = None

    def encode(self) -> str:
        raw = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> TrialLink:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return cls(**json.loads(raw))

    @classmethod
    def from_env(cls) -> TrialLink | None:
        """This job's link: None outside a trial of a lorasweep_optuna sweep."""
        study, number = os.environ.get(STUDY_ENV), os.environ.get(TRIAL_ENV)
        if not study or not number:
            return None
        return dataclasses.replace(cls.decode(study), number=int(number))

    def open_trial(self):
        """The Optuna trial, with the study's pruner; None when the study is out of reach (in
        memory, in another process)."""
        import optuna
        from hydra.utils import instantiate

        from lorasweep.config import EXECUTION_WHITELIST

        storage = (open_storage(self.storage) if self.storage is not None
                   else _IN_MEMORY.get(self.study))
        if storage is None:
            return None
        pruner = (instantiate(self.pruner, _execution_whitelist_=EXECUTION_WHITELIST)
                  if self.pruner else None)
        with quiet_optuna():
            study = optuna.load_study(study_name=self.study, storage=storage, pruner=pruner)
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id,
                                                                           self.number)
        return optuna.trial.Trial(study, trial_id)


@contextmanager
def study_env(link: TrialLink) -> Iterator[None]:
    """STUDY_ENV set for the sweep's jobs while the sweep runs."""
    os.environ[STUDY_ENV] = link.encode()
    try:
        yield
    finally:
        os.environ.pop(STUDY_ENV, None)


def is_pruned(exc: BaseException) -> bool:
    """True for optuna.TrialPruned: a trial its pruner stopped (by design, not a failure)."""
    import optuna

    return isinstance(exc, optuna.TrialPruned)


def job_value(ret) -> tuple[str, float | None, str]:
    """(state name, objective, reason) of a finished Hydra job: COMPLETE with a finite float,
    PRUNED when the job stopped on its pruner's word, FAIL otherwise."""
    from hydra.core.utils import JobStatus

    if ret.status != JobStatus.COMPLETED:
        exc = ret._return_value
        state = "PRUNED" if is_pruned(exc) else "FAIL"
        return state, None, one_line(exc) if isinstance(exc, BaseException) else str(exc)
    try:
        value = float(ret._return_value)
    except (TypeError, ValueError):
        return "FAIL", None, f"the objective {ret._return_value!r} is not a number"
    if not math.isfinite(value):
        return "FAIL", None, f"the objective is {value}"
    return "COMPLETE", value, ""


def tell(study, trial, ret) -> str:
    """Record a job's outcome on its trial (unless it already ended: a trial pruned by itself in
    another process, or failed by another sweeper); the state name."""
    import optuna
    from optuna.trial import TrialState

    state, value, reason = job_value(ret)
    if reason:
        study._storage.set_trial_user_attr(trial._trial_id, "lorasweep.reason", reason[:2000])
    try:
        if state == "COMPLETE":
            study.tell(trial, value)
        else:
            study.tell(trial, state=TrialState[state])
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
    except RuntimeError as exc:  # optuna 4/5: "... has already finished"
        if "finished" not in str(exc):
            raise
    if state == "PRUNED":
        log.info("trial %d pruned: %s", trial.number, reason)
    elif state == "FAIL":
        log.warning("trial %d failed: %s", trial.number, reason)
    return state


def run_sweep(impl, pruner: Mapping[str, Any] | None, arguments: list[str]) -> None:
    """The sweep: `impl` is hydra-optuna-sweeper's OptunaSweeperImpl after `setup` (its sampler,
    directions, launcher, n_trials, n_jobs, max_failure_rate, config); `pruner` the
    `hydra.sweeper.pruner` config (None or a `_target_` dict)."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
    from omegaconf import OmegaConf

    impl._process_searchspace_config()
    space, fixed_params, fixed_overrides = create_params_from_overrides(
        impl._parse_sweeper_params_config() + list(arguments))
    for name in fixed_params:
        space.pop(name, None)
    task = [str(o) for o in impl.config.hydra.overrides.task]
    pruner = OmegaConf.to_container(pruner, resolve=True) if pruner is not None else None
    study = open_study(impl, task, pruner)
    prunes = bool(pruner) and not str(pruner.get("_target_", "")).endswith("NopPruner")
    location = describe_storage(impl.storage, prunes, impl.launcher)
    with quiet_optuna():
        report_dead_trials(study)
        done = counted_trials(study)
    print(f"lorasweep: study {study.study_name} ({location}): {done} of {impl.n_trials} "
          f"trials counted so far", flush=True)
    link = TrialLink(storage_url(impl.storage), study.study_name, pruner)
    with quiet_optuna(), study_env(link):
        sweep_trials(impl, study, space, fixed_params, fixed_overrides)
    write_results(impl, study)
    print(study_summary(study, location), flush=True)
    _IN_MEMORY.pop(study.study_name, None)
    _FINISHED[:] = [study]


def sweep_trials(impl, study, space, fixed_params, fixed_overrides) -> None:
    """Ask, launch and tell batches of `n_jobs` trials until the study counts `n_trials`."""
    owner = this_sweeper()
    while True:
        report_dead_trials(study)
        to_go = impl.n_trials - counted_trials(study)
        if to_go <= 0:
            break
        trials = [study.ask() for _ in range(min(impl.n_jobs, to_go))]
        for trial in trials:
            trial.set_user_attr(SWEEPER_ATTR, owner)
        overrides = [
            (*job, f"++hydra.job.env_set.{TRIAL_ENV}='{trial.number}'")
            for trial, job in zip(trials, impl._configure_trials(
                trials, space, fixed_params, fixed_overrides), strict=True)]
        try:
            with heartbeat(study, trials):
                returns = impl.launcher.launch(overrides, initial_job_idx=impl.job_idx)
        except BaseException:  # Ctrl-C, SIGTERM, a launcher error: these trials did not end
            for trial in trials:
                fail_interrupted(study, trial._trial_id)
            print(f"lorasweep: the sweep stopped during trial(s) "
                  f"{', '.join(str(t.number) for t in trials)} (marked FAIL, not counted); the "
                  f"same command continues study {study.study_name}", file=sys.stderr, flush=True)
            raise
        impl.job_idx += len(returns)
        states = [tell(study, trial, ret) for trial, ret in zip(trials, returns, strict=True)]
        failures = states.count("FAIL")
        if failures / len(returns) > impl.max_failure_rate:
            log.error("%d of %d trials failed, above hydra.sweeper.max_failure_rate=%s", failures,
                      len(returns), impl.max_failure_rate)
            for ret in returns:
                ret.return_value  # noqa: B018  (raises the job's own exception)


def open_study(impl, task: Sequence[str], pruner: Mapping[str, Any] | None):
    """Create the study, or load it when its storage has it already (the same command run again,
    or another sweeper on the same study)."""
    import optuna

    name = study_name(impl.study_name, task)
    storage = open_storage(impl.storage)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own start line says it
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=impl.sampler,
                                    directions=impl._get_directions(), load_if_exists=True,
                                    pruner=optuna.pruners.NopPruner())
    except ValueError as exc:  # e.g. another direction than the stored study's
        raise ConfigError(f"hydra.sweeper: study {name}: {one_line(exc)}") from None
    finally:
        optuna.logging.set_verbosity(verbosity)
    if COMMAND_ATTR not in study.user_attrs:
        study.set_user_attr(COMMAND_ATTR, " ".join(task))
    if storage is None:
        _IN_MEMORY[name] = study._storage
    return study


def describe_storage(storage: str | None, pruning: bool, launcher) -> str:
    """Where the study is, for the start line; why trials will not be pruned, if they will not."""
    url = storage_url(storage)
    if url is not None:
        return f"storage {mask_url(url)}"
    where = "in memory: it ends with this command; hydra.sweeper.storage=PATH keeps it"
    in_process = "BasicLauncher" in type(launcher).__name__
    if pruning and not in_process:
        where += ("; trials run in other processes, which cannot reach an in-memory study, so "
                  "none is pruned")
    return where


def write_results(impl, study) -> None:
    """optimization_results.yaml in this sweep's dir: the study's best trial (over every
    sweeper's trials), with each parameter in its distribution's type."""
    from omegaconf import OmegaConf
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        log.warning("no trial completed: no best trial to write")
        return
    if len(impl._get_directions()) < 2:
        best = study.best_trial
        results = {"name": "optuna", "study_name": study.study_name,
                   "best_params": best.params, "best_value": best.value,
                   "best_trial": best.number}
    else:
        results = {"name": "optuna", "study_name": study.study_name,
                   "solutions": [{"params": t.params, "values": t.values}
                                 for t in study.best_trials]}
    OmegaConf.save(OmegaConf.create(results),
                   os.path.join(impl.config.hydra.sweep.dir, "optimization_results.yaml"))


def study_summary(study, location: str) -> str:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(1 for t in trials if t.state == state)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    lines = [f"lorasweep: study {study.study_name} ({location}): {len(trials)} trials, "
             + ", ".join(f"{n} {state}" for state, n in counts.items())]
    if counts["complete"] and len(study.directions) == 1:
        best = study.best_trial
        lines.append(f"  best: trial {best.number}, objective {best.value:.4f}")
    return "\n".join(lines)
