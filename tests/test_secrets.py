"""No database password in logs, command lines or error messages (Experiments/storage.py, study.py, workers.py):
every storage that is printed goes through `mask_url`, and workers get the storage URL in $DIFFMM_STORAGE, never in
their argv (readable by every user with `ps`). Fast: nothing here trains or reaches a database server."""
from __future__ import annotations

import argparse
import logging
import subprocess
from pathlib import Path

import pytest

from Experiments import study, sweep, workers
from Experiments.plan import GridPlan, Sweep
from Experiments.storage import STORAGE_ENV, StorageSpec, mask_url, open_storage, parse_storage
from Experiments.study import add_worker_args, launch, worker_argv, worker_env
from Utils.errors import UsageError

optuna = pytest.importorskip("optuna")

SECRET = "s3cret-Pw"
URL = f"postgresql://alice:{SECRET}@127.0.0.1:1/sweeps"   # port 1: nothing listens, refused at once
GRID = ["--grid", "temp=0.1,0.5", "--seeds", "1"]


@pytest.fixture(autouse=True)
def no_inherited_storage(monkeypatch):
    """A DIFFMM_STORAGE of the shell that runs the tests would change what these commands do."""
    monkeypatch.delenv(STORAGE_ENV, raising=False)


@pytest.fixture
def logged():
    """The lines the package logs ("diffmm", which does not propagate to the root logger) while a test runs."""
    lines: list = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger, handler = logging.getLogger("diffmm"), Keep()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def assert_masked(text: str) -> None:
    assert SECRET not in text and "***" in text, text


def parse_opts(extra) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_worker_args(p, search=True)
    return p.parse_args(extra)


# ------------------------------------------------------------------------------------------------
# mask_url, also on what does not parse
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, shown", [
    (URL, "postgresql://alice:***@127.0.0.1:1/sweeps"),
    (f"postgresql+psycopg2://alice:{SECRET}@db@h:5432/x", "postgresql+psycopg2://alice:***@h:5432/x"),  # raw @
    (f"postgresql//alice:{SECRET}@h/x", "postgresql//alice:***@h/x"),           # a colon short
    (f"postgresql:/alice:a/{SECRET}@h/x", "postgresql:/alice:***@h/x"),          # a slash short, / in it
    (f"postgresql:alice:{SECRET}@h/x", "postgresql:***@h/x"),                   # too much hidden rather than too little
    (f"--storage '{URL}' is bad", "--storage 'postgresql://alice:***@127.0.0.1:1/sweeps' is bad"),
    (f"postgresql://alice@h/x?sslmode=require&password={SECRET}", "postgresql://alice@h/x?sslmode=require&password=***"),
])
def test_mask_url_hides_the_password_of_any_url(text, shown):
    assert mask_url(text) == shown


@pytest.mark.parametrize("text", ["postgresql://alice@h:5432/x", "postgresql://h:5432/x", "sqlite:////tmp/a.db",
                                  "journal:/shared/t4.log", "mail alice@example.org"])
def test_mask_url_leaves_what_holds_no_password(text):
    assert mask_url(text) == text


# ------------------------------------------------------------------------------------------------
# parse_storage and open_storage: their sentences
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    f"postgres://alice:{SECRET}@h/x",            # not a scheme we know
    f"postgresql//alice:{SECRET}@h/x",           # no ://
    f"postgresql://alice:{SECRET}@/x",           # no host
    f"postgresql://alice:{SECRET}@h",            # no database
    f"postgresql://alice:{SECRET}@h:port/x",     # a port that is no number
    f"sqlite://alice:{SECRET}@/no/such/folder/optuna.db",
    f"journal:/no/such/alice:{SECRET}@folder/x.log",
])
def test_parse_storage_errors_mask_the_password(bad, tmp_path):
    with pytest.raises(UsageError) as raised:
        parse_storage(bad, tmp_path)
    assert_masked(str(raised.value))


def test_storage_shown_masks_and_url_keeps_the_password(tmp_path):
    spec = parse_storage(URL, tmp_path)
    assert spec.url() == URL and spec.shown() == "postgresql://alice:***@127.0.0.1:1/sweeps"


def test_open_storage_errors_mask_the_password(tmp_path, monkeypatch):
    spec = parse_storage(URL, tmp_path)
    with pytest.raises(UsageError) as raised:      # no driver here, or a server that refuses
        open_storage(spec, 60)
    assert_masked(str(raised.value))
    from sqlalchemy.exc import OperationalError

    def refuses(url, **kwargs):  # a driver whose message quotes the URL it was given
        raise OperationalError("connect", {}, Exception(f"could not connect to {url}: refused"))

    monkeypatch.setattr(optuna.storages, "RDBStorage", refuses)
    with pytest.raises(UsageError, match="cannot reach the database") as raised:
        open_storage(spec, 60)
    assert_masked(str(raised.value))


@pytest.mark.parametrize("storage", [URL, f"postgresql://alice:{SECRET}@/x", f"postgres://alice:{SECRET}@h/x"])
def test_a_sweep_that_cannot_open_its_storage_logs_no_password(storage, tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    assert sweep.main([*GRID, "--sweep_dir", str(sweep_dir), "--storage", storage, "--epoch", "1", "--quiet"]) == 2
    captured = capsys.readouterr()
    assert_masked(captured.out + captured.err)
    assert not sweep_dir.exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_progress_logs_no_password(how, monkeypatch, capsys):
    if how == "env":
        monkeypatch.setenv(STORAGE_ENV, URL)
    assert workers.main(["--storage", URL] if how == "flag" else []) == 2
    captured = capsys.readouterr()
    assert_masked(captured.out + captured.err)


def test_progress_without_a_storage_says_how_to_give_one(capsys):
    assert workers.main([]) == 2
    assert STORAGE_ENV in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Workers: the URL in their environment, never on their command line
# ------------------------------------------------------------------------------------------------

def test_worker_argv_holds_no_storage_and_worker_env_holds_it():
    argv = ["--grid", "temp=0.1", "--storage", URL, "--workers", "2", f"--storage={URL}", "--quiet"]
    out = worker_argv(argv, "st", 1, ["--threads", "1"])
    assert out == ["--grid", "temp=0.1", "--quiet", "--study", "st", "--worker_index", "1", "--threads", "1"]
    env = worker_env(URL, ["--threads", "3"], base={"PATH": "/bin", "MKL_NUM_THREADS": "2"})
    assert env == {"PATH": "/bin", STORAGE_ENV: URL, "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "2",
                   "OPENBLAS_NUM_THREADS": "3"}


def test_launch_puts_the_url_in_each_workers_env_not_its_argv(monkeypatch, logged):
    started = []

    class Process:
        pid = 4242

        def __init__(self, command, env):
            started.append((command, env))

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", Process)
    argv = [*GRID, "--sweep_dir", "/tmp/s", "--storage", URL, "--workers", "2", "--epoch", "1"]
    assert launch("Experiments.sweep", argv, URL, "st", 2, [], ["--epoch", "1"]) == [0, 0]
    assert len(started) == 2
    for command, env in started:
        assert not any(SECRET in a or "postgresql" in a for a in command), command
        assert "--storage" not in command and env[STORAGE_ENV] == URL
    assert not any(SECRET in line for line in logged)


@pytest.mark.parametrize("how", ["parent", "worker"])
def test_a_study_names_its_storage_masked_and_a_worker_reads_it_from_env(how, tmp_path, monkeypatch, logged):
    opened = []

    def open_storage(spec, heartbeat):  # no server: an in-memory study stands for the database
        opened.append(spec)
        return optuna.storages.InMemoryStorage()

    monkeypatch.setattr(study, "open_storage", open_storage)
    monkeypatch.setattr(study.Worker, "work", lambda self: None)
    monkeypatch.setattr(study.Worker, "requeue", lambda self, include_errors=False: None)
    monkeypatch.setattr(study, "unfinished_keys", lambda found, plan: [])
    if how == "worker":  # as a parent starts it: no --storage, the URL in its environment
        monkeypatch.setenv(STORAGE_ENV, URL)
        opts = parse_opts(["--worker_index", "0", "--study", "st"])
    else:
        opts = parse_opts(["--storage", URL])
    assert study.wanted(opts)
    plan = GridPlan(tmp_path, [Sweep.of(tmp_path, {"temp": ["0.1"]}, [1], ["--epoch", "1"])])
    found = study.execute(plan, opts, [], ["--epoch", "1"], "Experiments.sweep")
    assert (found is None) == (how == "worker")
    assert opened == [StorageSpec("rdb", URL)]
    text = "\n".join(logged)
    assert_masked(text)
    if how == "parent":
        assert STORAGE_ENV in text and "pgpass" in text
    assert not Path(tmp_path / "optuna.db").exists()     # the storage given, not the default
