"""Where researchers run it: threads that fit the machine, the OpenMP wait policy, Ctrl-C that stops the caller,
`--reverse auto` chosen by cost, and the one-sentence refusals of --threads, --precision tf32 and --device cuda."""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import inference
import Main
from conftest import ROOT, tiny_args
from Utils.device import available_cpus, torch_default_threads

ENTRY_POINTS = ["Main.py", "evaluate.py", "recommend.py", "Experiments/sweep.py", "Experiments/reproduce.py",
                "Experiments/benchmark.py", "tests/conftest.py"]


# ------------------------------------------------------------------------------------------------
# threads
# ------------------------------------------------------------------------------------------------

def test_threads_auto_is_the_allowed_cpus_capped_by_torchs_default(tiny_dir, tmp_path):
    before = torch.get_num_threads()
    try:
        assert Main.main(tiny_args(tiny_dir, tmp_path / "auto", "--threads", "auto", "--device", "cpu")) == 0
        summary = json.loads((tmp_path / "auto" / "summary.json").read_text())
        assert summary["threads"] == max(1, min(len(os.sched_getaffinity(0)), torch_default_threads()))
        assert summary["config"]["threads"] == "auto"
        assert f"{summary['threads']} CPU threads (--threads auto" in (tmp_path / "auto" / "log.txt").read_text()
    finally:
        torch.set_num_threads(before)


def test_threads_n_runs_with_n_threads_and_says_so(tiny_dir, tmp_path):
    before = torch.get_num_threads()
    try:
        assert Main.main(tiny_args(tiny_dir, tmp_path / "one", "--threads", "1", "--device", "cpu")) == 0
        summary = json.loads((tmp_path / "one" / "summary.json").read_text())
        assert summary["threads"] == 1 and "1 threads" in summary["device"]
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_the_affinity_mask_limits_auto(tiny_dir, tmp_path):
    """A process allowed one CPU (taskset, a cgroup, a cluster job) runs one thread, whatever the machine has."""
    script = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}}); "
              f"import Main; sys.exit(Main.main({tiny_args(tiny_dir, tmp_path / 'pinned', '--device', 'cpu')!r}))")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    assert json.loads((tmp_path / "pinned" / "summary.json").read_text())["threads"] == 1


@pytest.mark.parametrize("value,expected", [("0", "--threads must be at least 1"),
                                            ("4096", "is more than the"),
                                            ("many", "expected auto or a whole number")])
def test_bad_threads_is_one_sentence_and_exit_2(tiny_dir, tmp_path, capsys, value, expected):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) if value == "many" else _no_raise() as caught:
        code = Main.main(tiny_args(tiny_dir, out, "--threads", value))
    code = caught.value.code if value == "many" else code
    text = capsys.readouterr()
    assert code == 2 and expected in text.out + text.err and "Traceback" not in text.out + text.err
    assert not out.exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_available_cpus_is_the_affinity_mask():
    assert available_cpus() == len(os.sched_getaffinity(0))


# ------------------------------------------------------------------------------------------------
# the OpenMP wait policy, set before torch loads
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ENTRY_POINTS)
def test_every_entry_point_sets_the_wait_policy_before_anything_imports_torch(path):
    """libgomp reads OMP_WAIT_POLICY once, when torch loads it: the first import of every entry point must be
    Utils.openmp (after `from __future__`)."""
    tree = ast.parse((ROOT / path).read_text())
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               and not (isinstance(node, ast.ImportFrom) and node.module == "__future__")]
    first = imports[0]
    assert isinstance(first, ast.Import) and first.names[0].name == "Utils.openmp", path


@pytest.mark.slow
@pytest.mark.parametrize("given,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_wait_policy_is_passive_unless_the_user_set_one(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    script = "import os, sys; sys.path.insert(0, '.'); import Main; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


# ------------------------------------------------------------------------------------------------
# Ctrl-C stops the caller, not only the run
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ctrl_c_in_a_run_stops_the_whole_test_session(tmp_path, tiny_dir):
    """A test that runs Main.main and gets Ctrl-C must end pytest, not let it move on to the next long test."""
    marker = tmp_path / "second_test_ran"
    (tmp_path / "test_interrupted.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import Main
        import inference

        def test_a_run_interrupted(monkeypatch):
            def interrupted(*args, **kwargs):
                raise KeyboardInterrupt  # what SIGINT raises in the main thread
            monkeypatch.setattr(Main, "train_one_epoch", interrupted)
            Main.main({tiny_args(tiny_dir, tmp_path / 'run')!r})

        def test_the_next_one():
            open({str(marker)!r}, "w").close()
    """))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_interrupted.py"],
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2, result.stdout  # pytest's exit code for an interrupted session
    assert not marker.exists(), "pytest went on to the next test after Ctrl-C"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "interrupted (Ctrl-C)" in summary["stopped"]["reason"]  # the run folder was still written


# ------------------------------------------------------------------------------------------------
# --reverse auto chooses the cheaper exact path from the shapes
# ------------------------------------------------------------------------------------------------

def matmul_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("n_items,hidden,steps,batch", [
    (600, 100, 50, 32),    # many items per hidden unit: hidden space
    (60, 100, 2, 32),      # a narrow catalogue, few steps: direct
    (300, 100, 1, 32),     # one step: direct (M costs more than it saves)
    (300, 100, 20, 8),     # small batches pay M often, but 20 steps still favour the hidden space
    (150, 200, 3, 64),     # hidden wider than the catalogue: direct
])
def test_auto_picks_the_path_with_fewer_counted_flops(n_items, hidden, steps, batch):
    """The choice against torch's own FLOP count of both paths (dense start, as the rule counts it)."""
    from Models.diffusion import Denoiser, GaussianDiffusion, hidden_reverse_is_cheaper

    torch.manual_seed(0)
    denoiser = Denoiser(n_items, [hidden], 10, False).eval()
    diffusion = GaussianDiffusion(0.1, 1e-4, 0.02, steps, torch.device("cpu"))
    x0 = (torch.rand(batch, n_items) < 0.05).float()
    with torch.no_grad():
        direct = matmul_flops(lambda: diffusion.p_sample(denoiser, x0, 0, False))
        in_hidden = matmul_flops(lambda: diffusion.p_sample_hidden(denoiser, x0, 0))
    assert abs(direct - in_hidden) > 0.1 * min(direct, in_hidden), "a case too close to call"
    assert hidden_reverse_is_cheaper(n_items, hidden, steps, batch) == (in_hidden < direct)


def test_the_model_uses_the_chosen_path_and_hidden_is_refused_where_not_exact(tiny_dir, tmp_path, capsys):
    from DataHandler import load_data
    from Params import parse_args

    data = load_data("tiny", tiny_dir)  # 16 items
    built = {}
    for name, extra in {"one_step": ["--steps", "1"], "many_steps": ["--steps", "40"],
                        "forced": ["--steps", "1", "--reverse", "hidden"],
                        "direct": ["--steps", "40", "--reverse", "direct"]}.items():
        args = parse_args(tiny_args(tiny_dir, tmp_path / name, *extra))
        built[name] = inference.build_model(args, data, torch.device("cpu")).hidden_reverse
    assert built == {"one_step": False, "many_steps": True, "forced": True, "direct": False}
    with pytest.raises(SystemExit) as stopped:   # refused when the command line is parsed (DiffMM.check_flags)
        Main.main(tiny_args(tiny_dir, tmp_path / "bad", "--reverse", "hidden", "--norm", "true"))
    assert stopped.value.code == 2 and "--reverse hidden is exact only with" in capsys.readouterr().err


def test_diffrec_auto_follows_its_evaluation_batch(tiny_dir, tmp_path):
    from DataHandler import load_data
    from Params import parse_args

    data = load_data("tiny", tiny_dir)
    chosen = {}
    for steps in ("1", "40"):
        args = parse_args(tiny_args(tiny_dir, tmp_path / steps, "--model", "diffrec", "--dims", "[16]", "--steps",
                                    steps))
        chosen[steps] = inference.build_model(args, data, torch.device("cpu")).hidden_reverse
    assert chosen == {"1": False, "40": True}


# ------------------------------------------------------------------------------------------------
# precision and device refusals
# ------------------------------------------------------------------------------------------------

def test_tf32_on_a_cpu_is_one_sentence_and_nothing_written(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = Main.main(tiny_args(tiny_dir, out, "--precision", "tf32", "--device", "cpu"))
    text = capsys.readouterr().out.strip().splitlines()
    assert code == 2 and text[-1].startswith("error: --precision tf32 is a CUDA setting") and len(text) == 1
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_a_gpu_is_one_sentence(tiny_dir, tmp_path, capsys):
    code = Main.main(tiny_args(tiny_dir, tmp_path / "run", "--device", "cuda"))
    text = capsys.readouterr().out.strip().splitlines()
    assert code == 2 and text == ["error: --device cuda was asked for but torch sees no CUDA device; use --device "
                                  "cpu or auto."]
    assert not (tmp_path / "run").exists()


def test_tf32_leaves_torchs_settings_as_it_found_them():
    from Utils.device import matmul_precision

    if not torch.cuda.is_available():  # the CPU side: refused, and nothing changed
        before = torch.backends.cuda.matmul.allow_tf32
        with pytest.raises(Exception, match="CUDA setting"):
            with matmul_precision("tf32", torch.device("cpu")):
                pass
        assert torch.backends.cuda.matmul.allow_tf32 == before
        return
    before = torch.backends.cuda.matmul.allow_tf32
    with matmul_precision("tf32", torch.device("cuda")):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before


def test_every_model_has_the_threads_flag():
    from Models import model_names
    from Params import parse_args

    for name in model_names():
        assert parse_args(["--model", name, "--threads", "1"]).threads == "1"
    assert Path(ROOT / "Utils" / "openmp.py").is_file()
