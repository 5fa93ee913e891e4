"""Many runs at once (Experiments/study.py, Experiments/storage.py): worker processes sharing one Optuna study in SQLite, a journal
file or PostgreSQL; a worker killed with SIGKILL and its run resumed by another; the duplicate guard; bad
input; --keep_last; --search tpe and --prune. One CPU thread everywhere, so that the workers' numbers are
the sequential sweep's bit for bit."""
from __future__ import annotations

import csv
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import Main
import Models
from Experiments import reproduce, sweep
from Experiments.plan import GridPlan, Range, Sweep, parse_search, run_argv
from Experiments.storage import StorageSpec, open_storage, parse_storage, with_driver
from Experiments.study import Worker, add_worker_args, make_study, run_flags_of, study_name, worker_argv
from Params import parse_args
from Utils.errors import UsageError

from conftest import ROOT, tiny_args

optuna = pytest.importorskip("optuna")

ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")   # one thread: bit-for-bit repeatable runs
GRID = ["--grid", "temp=0.1,0.5", "--seeds", "1,2"]
KEYS = [f"temp={t}/seed{s}" for t in ("0.1", "0.5") for s in (1, 2)]


def base(gen_dir, epochs: int = 2) -> list:
    return ["--data", "gen", "--data_dir", str(gen_dir), "--epoch", str(epochs), "--dims", "[16]", "--latdim", "8",
            "--batch", "256", "--quiet", "--threads", "1"]


def sweep_command(*args) -> list:
    return [sys.executable, "-m", "Experiments.sweep", *map(str, args)]


def run_sweep(*args, timeout=240) -> subprocess.CompletedProcess:
    done = subprocess.run(sweep_command(*args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def trials_of(storage: str):
    """The trials of the one study in `storage` (a --storage text)."""
    opened = open_storage(parse_storage(storage, Path(".")), 60)
    return optuna.load_study(study_name=None, storage=opened).get_trials(deepcopy=False)


def assert_each_run_trained_once(sweep_dir: Path, keys=KEYS, epochs: int = 2) -> None:
    """Exactly these run folders, one summary each with every epoch, one configuration line each (one start)."""
    assert sorted(p.relative_to(sweep_dir).as_posix() for p in sweep_dir.glob("*/seed*")) == sorted(keys)
    for key in keys:
        run_dir = sweep_dir / key
        summary = json.loads((run_dir / "summary.json").read_text())
        assert "stopped" not in summary and summary["epochs_run"] == epochs
        assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == epochs
        assert (run_dir / "log.txt").read_text().count("configuration:") == 1
        assert (run_dir / "best_model.pt").is_file() and not (run_dir / "last.pt").exists()   # --keep_last false


@pytest.fixture(scope="module")
def reference(gen_dir, tmp_path_factory):
    """table.csv of the sequential sweep of the same cells (one thread), in this process."""
    threads = torch.get_num_threads()
    sweep_dir = tmp_path_factory.mktemp("sequential") / "sweep"
    try:
        assert sweep.main([*GRID, "--sweep_dir", str(sweep_dir), *base(gen_dir)]) == 0
    finally:
        torch.set_num_threads(threads)
    return (sweep_dir / "table.csv").read_text()


# ------------------------------------------------------------------------------------------------
# PostgreSQL: a throw-away server
# ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of this machine's distribution package, started in a temporary folder on a free port
    (as the user postgres when the tests run as root: the server refuses root); skipped where it cannot be."""
    try:
        import psycopg2
    except ImportError:
        pytest.skip("the PostgreSQL driver psycopg2 is not installed (pip install psycopg2-binary)")
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("no PostgreSQL server here (/usr/lib/postgresql/*/bin/initdb; apt-get install postgresql)")
    bindir = Path(found[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="diffmm-pg-"))
    prefix = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no user postgres to run the PostgreSQL server as")
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser to start the PostgreSQL server as the user postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port, data = free_port(), root / "data"
    pg_ctl = [*prefix, str(bindir / "pg_ctl"), "-D", str(data)]
    steps = [[*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
             [*pg_ctl, "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "-l", str(root / "server.log"),
              "-w", "-t", "30", "start"]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode:
            log = (root / "server.log").read_text()[-500:] if (root / "server.log").is_file() else ""
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip(f"the PostgreSQL server did not start ({Path(step[len(prefix)]).name}: "
                        f"{(done.stderr or done.stdout).strip()[-300:]} {log})")
    try:
        connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        connection.autocommit = True
        connection.cursor().execute("CREATE DATABASE sweeps")
        connection.close()
        yield f"postgresql://postgres@127.0.0.1:{port}/sweeps"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Two workers, one study
# ------------------------------------------------------------------------------------------------

# the PostgreSQL variant starts a server and three processes: over 20 s on 2 cores, hence slow
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.slow)])
def test_two_workers_train_each_run_once_and_write_the_sequential_table(kind, gen_dir, tmp_path, reference, request):
    sweep_dir = tmp_path / "sweep"
    storage = request.getfixturevalue("postgres_url") if kind == "postgresql" else None   # default: SQLite
    done = run_sweep(*GRID, "--sweep_dir", sweep_dir, "--workers", 2, *(["--storage", storage] if storage else []),
                     *base(gen_dir))
    assert_each_run_trained_once(sweep_dir)
    assert (sweep_dir / "table.csv").read_text() == reference
    assert (sweep_dir / "sweep.png").is_file()
    # two worker processes joined the study (the console has each one's lines), each run with --threads 1
    assert "[worker 0] worker 0: study" in done.stdout and "[worker 1] worker 1: study" in done.stdout
    url = storage or f"sqlite:///{sweep_dir / 'optuna.db'}"
    trained = [t.user_attrs["run"] for t in trials_of(url) if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(trained) == sorted(KEYS)          # one complete trial per run
    threads = {json.loads((sweep_dir / k / "summary.json").read_text())["threads"] for k in KEYS}
    assert threads == {1}


# the journal file has our heartbeat (optuna's has none); SQLite has optuna's own, as PostgreSQL: over 20 s, slow
@pytest.mark.slow
@pytest.mark.parametrize("kind", [pytest.param("sqlite", marks=pytest.mark.slow), "journal"])
def test_a_worker_killed_mid_run_is_taken_over_and_its_run_resumed(kind, gen_dir, tmp_path, reference):
    """One cell x two seeds (the reference's first row): a worker frozen and killed after its first run's
    first epoch, then a new worker of the same command (the journal file has Optuna's heartbeat through ours)."""
    sweep_dir = tmp_path / "sweep"
    storage = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else f"journal:{tmp_path / 'study.log'}"
    command = ["--grid", "temp=0.1", "--seeds", "1,2", "--sweep_dir", sweep_dir, "--storage", storage,
               "--heartbeat", 1, *base(gen_dir)]
    first = subprocess.Popen(sweep_command(*command), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    start = time.time()
    while not list(sweep_dir.glob("*/seed*/last.pt")):
        assert first.poll() is None and time.time() - start < 120, "the worker ended before its first epoch"
        time.sleep(0.005)
    first.send_signal(signal.SIGSTOP)       # frozen after its first epoch's last.pt, then killed
    killed = next(sweep_dir.glob("*/seed*/last.pt")).parent
    epochs_done = len(torch.load(killed / "last.pt", weights_only=True)["harness"]["history"])
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert epochs_done == 1 and not (killed / "summary.json").exists()

    run_sweep(*command)                      # a new worker: every run, the killed one resumed
    assert_each_run_trained_once(sweep_dir, KEYS[:2])
    assert f"resuming {killed} after epoch 0" in (killed / "log.txt").read_text()
    assert (sweep_dir / "table.csv").read_text().splitlines() == reference.splitlines()[:2]   # header, temp=0.1
    trials = trials_of(storage)
    stale = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") is not None]
    assert [t.user_attrs["run"] for t in stale] == [killed.relative_to(sweep_dir).as_posix()]
    assert [t.params for t in retried] == [stale[0].params] and retried[0].state == optuna.trial.TrialState.COMPLETE


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")   # trials asked by hand, not by Study.optimize
def test_the_later_of_two_trials_of_one_run_yields_without_training(tmp_path):
    plan = GridPlan(tmp_path / "s", [Sweep.of(tmp_path / "s", {"temp": ["0.1"]}, [1], ["--epoch", "1"])])
    storage = open_storage(parse_storage(None, tmp_path), 60)
    study = make_study(storage, "dup", plan, False, parse_opts([]), 0)
    for _ in range(2):
        study.enqueue_trial({"temp": "0.1", "seed": 1})
    first, second = study.ask(), study.ask()
    first.set_user_attr("run", "temp=0.1/seed1")     # the earlier trial holds the run
    with pytest.raises(optuna.TrialPruned):
        Worker(study, plan, [], 0.1).objective(second)
    assert second.user_attrs["duplicate_of"] == first.number and second.user_attrs["run"] == "temp=0.1/seed1"
    assert not (tmp_path / "s" / "temp=0.1").exists()       # nothing trained
    # the earlier one, asked again, does not yield to the later (it would train; here its holder check only)
    assert Worker(study, plan, [], 0.1).earlier_holder(first.number, "temp=0.1/seed1") is None


def parse_opts(extra):
    p = __import__("argparse").ArgumentParser()
    add_worker_args(p, search=True)
    return p.parse_args(extra)


def test_storage_urls_ranges_and_each_workers_flags(tmp_path):
    parse = parse_storage
    assert parse(None, tmp_path) == StorageSpec("rdb", f"sqlite:///{tmp_path.resolve() / 'optuna.db'}")
    for text in (f"journal:{tmp_path}/a.log", f"{tmp_path}/a.log"):
        assert parse(text, tmp_path) == StorageSpec("journal", str(tmp_path.resolve() / "a.log"))
    assert parse("postgresql://u:secret@db.example:5432/sweeps", tmp_path).shown() == \
        "postgresql://u:***@db.example:5432/sweeps"
    for bad in ("sqlite://", "sqlite:///:memory:", "postgresql://u@/x", "postgres://u@h/x", "redis://h", "a.db"):
        with pytest.raises(UsageError):
            parse(bad, tmp_path)
    assert with_driver("sqlite:///x.db") == "sqlite:///x.db"
    search = parse_search({"temp": ["0.05:1.0:log"], "latdim": ["32:128:int"], "trans": ["0", "1"]})
    assert search == {"temp": Range(0.05, 1.0, True, False), "latdim": Range(32, 128, False, True),
                      "trans": ["0", "1"]}
    for bad in ({"temp": ["1.0:0.05"]}, {"temp": ["0:1:log"]}, {"temp": ["a:b"]}, {"temp": ["0.1:1:cube"]},
                {"temp": ["0.1:1", "0.5"]}):
        with pytest.raises(UsageError):
            parse_search(bad)
    # each worker: its GPU, and its share of the CPUs unless --threads is given
    from Utils.device import available_cpus
    share = str(max(1, available_cpus() // 3))
    assert run_flags_of(2, 3, [], []) == ["--threads", share]
    assert run_flags_of(1, 2, [4, 6], ["--threads", "2"]) == ["--device", "cuda", "--gpu", "6"]
    argv = ["--grid", "temp=0.1", "--workers", "2", "--storage=x.log", "--quiet"]
    assert worker_argv(argv, "st", 1, ["--threads", "1"]) == \
        ["--grid", "temp=0.1", "--quiet", "--study", "st", "--worker_index", "1", "--threads", "1"]  # storage: env
    # the study's name: the folder's and the runs' (not how they run: threads, device, quiet)
    plan = GridPlan(tmp_path / "s", [Sweep.of(tmp_path / "s", {"temp": ["0.1", "0.5"]}, [1, 2], ["--epoch", "1"])])
    assert plan.space == {"temp": ["0.1", "0.5"], "seed": [1, 2]} and [j.key for j in plan.jobs] == KEYS
    assert plan.job_of({"seed": 2, "temp": "0.5"}).run_dir == tmp_path / "s" / "temp=0.5" / "seed2"
    plan_threads = GridPlan(tmp_path / "s", [Sweep.of(tmp_path / "s", {"temp": ["0.1", "0.5"]}, [1, 2],
                                                      ["--epoch", "1", "--threads", "3", "--quiet"])])
    plan_other = GridPlan(tmp_path / "s", [Sweep.of(tmp_path / "s", {"temp": ["0.1", "0.5"]}, [1, 2], ["--epoch", "2"])])
    name = study_name(tmp_path / "s", plan.identity())
    assert name.startswith("s-") and name == study_name(tmp_path / "s", plan_threads.identity())
    assert name != study_name(tmp_path / "s", plan_other.identity())


def test_runs_that_stop_with_a_reason_are_named_and_retried_once_per_command(tiny_dir, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setitem(Models.REGISTRY, "nan", "conftest:NaNModel")
    sweep_dir = tmp_path / "nan"
    command = ["--grid", "lr=0.1,0.2", "--sweep_dir", str(sweep_dir), "--storage", f"journal:{tmp_path / 'nan.log'}",
               "--model", "nan", "--data", "tiny", "--data_dir", str(tiny_dir), "--epoch", "4", "--quiet"]
    for attempt in (1, 2):
        assert sweep.main(command) == 1                     # not an endless retry: the worker ends, saying why
        last = capsys.readouterr().out.strip().splitlines()[-1]
        assert last.startswith("error: 2 runs did not finish: lr=0.1/seed421 (epoch 2, phase recommender") and \
            "run the same command again to retry them." in last
        failed = [t for t in trials_of(f"journal:{tmp_path / 'nan.log'}") if t.state == optuna.trial.TrialState.FAIL]
        assert len(failed) == 2 * attempt and all("not finite" in t.user_attrs["error"] for t in failed)
    log = (sweep_dir / "lr=0.1" / "seed421" / "log.txt").read_text()
    assert log.count("configuration:") == 1 and "resuming" in log     # the second command resumed it, once


# ------------------------------------------------------------------------------------------------
# Bad input: one sentence, exit code 2, nothing written
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, says", [
    (["--storage", "nonsense"], "is neither a database URL"),
    (["--storage", "postgresql//nobody@127.0.0.1/x"], "is neither a database URL"),
    (["--storage", "postgresql://nobody@127.0.0.1:1/x"], "postgresql://nobody@127.0.0.1:1/x"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--devices", "7"], "--devices lists GPU 7"),
    (["--search", "tpe"], "--search tpe needs --trials"),
    (["--search", "grid", "--storage", "journal:/no/such/folder/x.log"], "does not exist"),
])
def test_bad_input_is_one_sentence_and_writes_nothing(flags, says, gen_dir, tmp_path, capsys):
    if flags[:1] == ["--devices"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a GPU 7")
    sweep_dir = tmp_path / "sweep"
    assert sweep.main([*GRID, "--sweep_dir", str(sweep_dir), *flags, *base(gen_dir)]) == 2
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert lines[0].count(". ") == 0 or "pip install" in lines[0]      # one sentence
    assert not sweep_dir.exists() and not list(tmp_path.rglob("optuna.db"))


@pytest.mark.slow
def test_reproduce_takes_the_same_flags(gen_dir, tmp_path, capsys):
    out = tmp_path / "t2"
    assert reproduce.main(["--table", "2", "--data", "gen", "--data_dir", str(gen_dir), "--models", "mf,pop",
                           "--sweep_dir", str(out), "--workers", "0", "--epoch", "1", "--quiet"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().out and not out.exists()
    # one worker, a journal file: Table 2's runs (one per model) as one study, then comparison.md as always
    assert reproduce.main(["--table", "2", "--data", "gen", "--data_dir", str(gen_dir), "--models", "mf,pop",
                           "--sweep_dir", str(out), "--storage", f"journal:{tmp_path / 't2.log'}", "--epoch", "1",
                           "--quiet", "--threads", "1"]) == 0
    assert (out / "comparison.md").is_file() and (out / "groups.png").is_file()
    runs = {t.user_attrs["run"] for t in trials_of(f"journal:{tmp_path / 't2.log'}")}
    assert runs == {"mf/base/seed421", "pop/base/seed421"}
    mf = json.loads((out / "mf" / "base" / "seed421" / "summary.json").read_text())
    with open(out / "comparison.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["model"] == "mf")
    assert float(row["validation_protocol_Recall@20_mean"]) == pytest.approx(
        mf["protocols"]["validation"]["test"]["Recall@20"])


# ------------------------------------------------------------------------------------------------
# --keep_last, the per-epoch hook and RunPruned
# ------------------------------------------------------------------------------------------------

def test_keep_last_false_drops_last_pt_when_the_run_finishes(tiny_dir, tmp_path):
    kept, dropped = tmp_path / "kept", tmp_path / "dropped"
    assert Main.main(tiny_args(tiny_dir, kept, "--epoch", "2")) == 0
    assert Main.main(tiny_args(tiny_dir, dropped, "--epoch", "2", "--keep_last", "false")) == 0
    assert (kept / "last.pt").is_file() and not (dropped / "last.pt").exists()
    assert (dropped / "best_model.pt").is_file()
    assert sorted(p.name for p in kept.iterdir()) == sorted([p.name for p in dropped.iterdir()] + ["last.pt"])
    # a sweep drops it unless told otherwise
    assert run_argv([], {}, 1, tmp_path)[:2] == ["--keep_last", "false"]
    assert "--keep_last" not in run_argv(["--keep_last", "true"], {}, 1, tmp_path)[2:]


def test_on_epoch_sees_every_epoch_and_run_pruned_ends_the_run_cleanly(tiny_dir, tmp_path):
    seen = []

    def on_epoch(record):
        seen.append(record["epoch"])
        if record["epoch"] == 1:
            raise Main.RunPruned("a test's reason")

    out = tmp_path / "run"
    summary = Main.run(parse_args(tiny_args(tiny_dir, out, "--epoch", "4", "--keep_last", "false")), on_epoch=on_epoch)
    assert seen == [0, 1] and summary["pruned"] == {"epoch": 1, "reason": "a test's reason"}
    assert summary["epochs_run"] == 2 and len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "summary.json").read_text())["pruned"]["epoch"] == 1 and not (out / "last.pt").exists()


# ------------------------------------------------------------------------------------------------
# Beyond the grid: --search tpe, --prune
# ------------------------------------------------------------------------------------------------

def read_table(sweep_dir):
    with open(sweep_dir / "table.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tpe_search_runs_its_trials_over_a_range(gen_dir, tmp_path):
    sweep_dir = tmp_path / "tpe"
    command = ["--grid", "temp=0.05:1.0:log", "--search", "tpe", "--trials", "3", "--seeds", "1",
               "--sweep_dir", str(sweep_dir), *base(gen_dir, 1)]
    threads = torch.get_num_threads()
    try:
        assert sweep.main(command) == 0
        trials = trials_of(f"sqlite:///{sweep_dir / 'optuna.db'}")
        assert sweep.main(command) == 0                   # again: the 3 trials are done, nothing new
    finally:
        torch.set_num_threads(threads)
    assert len(trials_of(f"sqlite:///{sweep_dir / 'optuna.db'}")) == len(trials) == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    rows = read_table(sweep_dir)
    cells = {t.user_attrs["cell"]["temp"] for t in trials}
    assert sorted(r["temp"] for r in rows) == sorted(cells, key=float) == [r["temp"] for r in rows]
    for row in rows:
        assert 0.05 <= float(row["temp"]) <= 1.0
        summary = json.loads((sweep_dir / f"temp={row['temp']}" / "seed1" / "summary.json").read_text())
        assert summary["config"]["temp"] == float(row["temp"])
        assert float(row["val_Recall@20_mean"]) == pytest.approx(summary["protocols"]["validation"]["val"]["Recall@20"])
    best = max(rows, key=lambda r: float(r["val_Recall@20_mean"]))
    assert f"temp={best['temp']}" in (sweep_dir / "table.md").read_text().splitlines()[-1]


def median_pruned(trials, runs):
    """Which trials Optuna's MedianPruner (startup 1, no warm-up) prunes, recomputed from the runs' metrics:
    at an epoch, a trial whose best validation Recall so far is below the median of the completed earlier
    trials' values at that epoch is pruned there (trials run one after the other, in number order)."""
    completed, pruned = [], {}
    for t in sorted(trials, key=lambda t: t.number):
        values = [r["val"]["Recall@20"] for r in runs[t.user_attrs["run"]]]
        for epoch in range(len(values)):
            others = [c[epoch] for c in completed if len(c) > epoch]
            if others and max(values[:epoch + 1]) < np.median(others):
                pruned[t.user_attrs["run"]] = epoch
                break
        else:
            completed.append(values)
    return pruned


@pytest.mark.slow
def test_prune_stops_runs_below_the_median_and_never_selects_them(gen_dir, tmp_path):
    sweep_dir = tmp_path / "pruned"
    threads = torch.get_num_threads()
    try:
        assert sweep.main(["--grid", "lr=0,0.01,0.05", "--seeds", "1", "--sweep_dir", str(sweep_dir), "--prune",
                           "--prune_startup", "1", *base(gen_dir, 3)]) == 0
    finally:
        torch.set_num_threads(threads)
    trials = trials_of(f"sqlite:///{sweep_dir / 'optuna.db'}")
    runs = {t.user_attrs["run"]: [json.loads(line) for line in
                                  (sweep_dir / t.user_attrs["run"] / "metrics.jsonl").read_text().splitlines()]
            for t in trials}
    want = median_pruned(trials, runs)
    assert want, "this grid should prune at least one run"
    for t in trials:
        key = t.user_attrs["run"]
        summary = json.loads((sweep_dir / key / "summary.json").read_text())
        if key in want:
            assert t.state == optuna.trial.TrialState.PRUNED
            assert summary["pruned"]["epoch"] == want[key] and summary["epochs_run"] == want[key] + 1
            assert "below the median" in summary["pruned"]["reason"]
        else:
            assert t.state == optuna.trial.TrialState.COMPLETE and "pruned" not in summary
    rows = {r["lr"]: r for r in read_table(sweep_dir)}
    assert {lr for lr, r in rows.items() if r["pruned"] == "True"} == {k.split("/")[0][3:] for k in want}
    md = (sweep_dir / "table.md").read_text()
    selected = md.splitlines()[-1]
    assert selected.startswith("Selected") and selected.rsplit("lr=", 1)[1] not in {k.split("/")[0][3:] for k in want}
    assert "Pruned (--prune" in md
