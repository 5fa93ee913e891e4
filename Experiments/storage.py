"""Where a study lives, which every worker reaches: a database URL or Optuna's journal file, opened with a heartbeat.

    --storage sqlite:///runs/t4/optuna.db        # one machine (the default: SWEEP_DIR/optuna.db)
    --storage postgresql://USER@HOST/DB          # several machines (a password in ~/.pgpass, not in the URL)
    --storage journal:/shared/t4.log             # a journal file on a shared filesystem, no server
    DIFFMM_STORAGE=postgresql://USER@HOST/DB     # the same, off the command line

A command without --storage takes $DIFFMM_STORAGE (`storage_text`), and a parent hands the storage to its workers
the same way (`Experiments.study.worker_env`): a command line is readable by every user of the machine (ps), a
process's environment only by its owner. Every storage that is printed, logged or put into an exception message
goes through `mask_url`, which hides a database password. A worker's heartbeat marks its trial alive; a trial
silent for twice `--heartbeat` is stale, and Optuna's retry callback queues a copy (the journal file gets the
heartbeat RDBStorage has: `heartbeat_journal_storage`).
"""
from __future__ import annotations

import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

from Utils.errors import UsageError

if TYPE_CHECKING:  # optuna is imported where it is used, so that a sequential sweep does not need it
    import optuna

DB_SCHEMES = ("sqlite", "postgresql", "mysql")
DRIVERS = {"postgresql": "psycopg2-binary", "mysql": "PyMySQL (and use mysql+pymysql://)"}
# the storage of a command without --storage, and how a parent hands it to its workers: a command line is
# readable by every user of the machine (ps), a process's environment only by its owner
STORAGE_ENV = "DIFFMM_STORAGE"


def require_optuna() -> None:
    """One sentence instead of an ImportError when optuna (requirements.txt) is missing."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UsageError("many runs at once (--workers, --storage, --devices, --search, --prune) need optuna, which "
                         "is not installed: pip install -r requirements.txt.") from None


def quiet_optuna() -> None:
    """Optuna's own messages off (a failed trial would print a traceback): the workers log each event themselves."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)


def storage_text(given: Optional[str]) -> Optional[str]:
    """The storage a command names: its --storage (`given`), else $DIFFMM_STORAGE, else None (the default)."""
    return given if given is not None else (os.environ.get(STORAGE_ENV) or None)


_BEFORE_AT = re.compile(r"\S*@")                                   # a word up to its last @
_PASSWORD_PARAM = re.compile(r"(?i)([?&;]password=)[^&;\s'\"]*")   # libpq also takes ?password=...


def _hide_userinfo(match: "re.Match[str]") -> str:
    head = match.group(0)[:-1]
    # the user:password part starts after :// (or after // or / in a mistyped URL); with none, anywhere in the
    # word: masking too much is harmless, too little is not
    start = next((head.index(sep) + len(sep) for sep in ("://", "//", "/") if sep in head), 0)
    colon = head.find(":", start)
    return match.group(0) if colon < 0 else f"{head[:colon + 1]}***@"


def mask_url(text: str) -> str:
    """`text` with the password of any database URL in it replaced by ***: everything between `user:` and the
    last @ of a word (also in a URL that does not parse) and a ?password= parameter. Every storage that is
    printed, logged or put into an exception message goes through here."""
    return _PASSWORD_PARAM.sub(r"\1***", _BEFORE_AT.sub(_hide_userinfo, text))


@dataclass(frozen=True)
class StorageSpec:
    """A parsed --storage: a database URL (kind 'rdb') or a journal file (kind 'journal')."""

    kind: str
    target: str

    def shown(self) -> str:
        """The storage as it may be printed (a database password hidden)."""
        return mask_url(self.url())

    def url(self) -> str:
        """The storage as workers are told it ($DIFFMM_STORAGE), password included: never print it."""
        return f"journal:{self.target}" if self.kind == "journal" else self.target


def parse_storage(text: Optional[str], sweep_dir: Path) -> StorageSpec:
    """--storage as a StorageSpec (default sqlite:///SWEEP_DIR/optuna.db), or a UsageError sentence (its
    password masked)."""
    if text is None:
        return StorageSpec("rdb", f"sqlite:///{Path(sweep_dir).resolve() / 'optuna.db'}")
    shown = mask_url(text)
    usage = ("is neither a database URL (sqlite:///FILE, postgresql://USER@HOST[:PORT]/DATABASE, "
             "mysql://...) nor a journal file (journal:PATH, or a path ending in .log)")
    if text.startswith("journal:") or ("://" not in text and text.endswith(".log")):
        path = Path(text[len("journal:"):] if text.startswith("journal:") else text)
        if not path.name or path.is_dir():
            raise UsageError(f"--storage {shown} names no journal file; give journal:PATH, e.g. "
                             f"journal:/shared/sweep.log.")
        if not path.parent.is_dir():
            raise UsageError(f"--storage {shown}: the folder {mask_url(str(path.parent))} does not exist; create it "
                             f"(on a filesystem every worker sees) or give another path.")
        return StorageSpec("journal", str(path.resolve()))
    scheme = text.split("://", 1)[0] if "://" in text else ""
    if scheme.split("+")[0] not in DB_SCHEMES:
        raise UsageError(f"--storage {shown!r} {usage}.")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(text)
    except (ArgumentError, ValueError):
        raise UsageError(f"--storage {shown!r} is not a well-formed database URL; write it as "
                         f"postgresql://USER@HOST[:PORT]/DATABASE (its password in ~/.pgpass) or sqlite:///FILE."
                         ) from None
    if scheme.startswith("sqlite"):
        if not url.database or url.database == ":memory:":
            raise UsageError(f"--storage {shown} names no database file; give sqlite:///PATH/optuna.db (an in-memory "
                             f"database is not shared between workers).")
        if not Path(url.database).resolve().parent.is_dir():
            raise UsageError(f"--storage {shown}: the folder {mask_url(str(Path(url.database).parent))} does not "
                             f"exist; create it or give another path.")
    elif not url.host or not url.database:
        raise UsageError(f"--storage {shown} needs a host and a database, "
                         f"e.g. postgresql://USER@HOST:5432/DATABASE.")
    return StorageSpec("rdb", text)


def _retry_callback() -> object:
    """Optuna's retry of a stale trial (same parameters, intermediate values kept)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    return RetryHeartbeatStaleTrialCallback(max_retry=None, inherit_intermediate_values=True)


def heartbeat_journal_storage(backend: object, interval: int, grace: int, callback: object) -> object:
    """Optuna's JournalStorage with the heartbeat RDBStorage has (its own has none, as of optuna 5.0).

    The heartbeat is a trial system attribute written every `interval` seconds; a RUNNING trial silent for
    `grace` seconds (by the clock of the worker that checks) is stale and goes to `callback` like RDBStorage's.
    Through optuna's heartbeat interface, `study.optimize` beats and fails stale trials as it does for RDBStorage.
    """
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.trial import TrialState

    class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):

        def record_heartbeat(self, trial_id: int) -> None:
            try:
                self.set_trial_system_attr(trial_id, "heartbeat", time.time())
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker declared it stale: nothing to record
                pass

        def _get_stale_trial_ids(self, study_id: int) -> List[int]:
            now = time.time()
            stale = []
            for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
                last = trial.system_attrs.get("heartbeat")
                if last is None:
                    last = trial.datetime_start.timestamp() if trial.datetime_start else now
                if now - last > grace:
                    stale.append(trial._trial_id)
            return stale

        def get_heartbeat_interval(self) -> Optional[int]:
            return interval

        def get_heartbeat_stale_trial_callback(self) -> object:
            return callback

    return HeartbeatJournalStorage(backend)


def open_storage(spec: StorageSpec, heartbeat: int) -> "optuna.storages.BaseStorage":
    """The storage with heartbeat `heartbeat` s and grace 2 x heartbeat; a missing driver or an unreachable
    database is a UsageError sentence."""
    import optuna
    from optuna.storages import RDBStorage

    grace = 2 * heartbeat
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback = _retry_callback()
        if spec.kind == "journal":
            from optuna.storages.journal import JournalFileBackend
            try:
                return heartbeat_journal_storage(JournalFileBackend(spec.target), heartbeat, grace, callback)
            except OSError as e:
                raise UsageError(f"cannot open the journal file {spec.target} ({e.strerror or e}).") from None
        from sqlalchemy.exc import SQLAlchemyError

        scheme = spec.target.split("://", 1)[0].split("+")[0]
        # a lock held by another worker is waited for (SQLite); an unreachable server fails in seconds, not minutes
        connect = {"timeout": 60} if scheme == "sqlite" else {"connect_timeout": 10}
        try:
            return RDBStorage(with_driver(spec.target), engine_kwargs={"connect_args": connect},
                              heartbeat_interval=heartbeat, grace_period=grace,
                              heartbeat_stale_trial_callback=callback)
        except ImportError:
            raise UsageError(f"--storage {spec.shown()} needs a Python driver for {scheme}, which is not installed: "
                             f"pip install {DRIVERS.get(scheme, scheme)}.") from None
        except (SQLAlchemyError, OSError) as e:
            reason = mask_url(str(getattr(e, "orig", None) or e).strip().splitlines()[0])  # may quote the URL
            raise UsageError(f"cannot reach the database {spec.shown()} ({reason}); check that it runs and that the "
                             f"URL, user and database are right.") from None


def with_driver(url: str) -> str:
    """postgresql://... with the driver that is installed: SQLAlchemy 2.1 takes psycopg (3) for a plain
    postgresql://, 2.0 psycopg2; either serves, so a plain URL gets psycopg2 when only that one is there."""
    if not url.startswith("postgresql://"):
        return url
    import importlib.util

    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url
