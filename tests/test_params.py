"""Every flag of the authors' command line with its name, type and default; parsing fixes."""
from __future__ import annotations

import builtins

import pytest

from Params import build_parser, parse_args

# name -> (type of the parsed default, default) as in the DiffMM authors' parser.py.
# NOTE: the authors' `data` default names a dataset they never shipped; here it is 'synthetic' by design
# (the generated dataset, written on first use) so that `python Main.py` runs out of the box.
AUTHORS_FLAGS = {
    "lr": (float, 1e-3), "batch": (int, 1024), "tstBat": (int, 256), "reg": (float, 1e-5), "epoch": (int, 50),
    "latdim": (int, 64), "gnn_layer": (int, 1), "topk": (int, 20), "data": (str, "synthetic"),
    "ssl_reg": (float, 1e-2), "temp": (float, 0.5), "tstEpoch": (int, 1), "gpu": (str, "0"), "seed": (int, 421),
    "keepRate": (float, 0.5), "dims": (list, [1000]), "d_emb_size": (int, 10), "norm": (bool, False),
    "steps": (int, 5), "noise_scale": (float, 0.1), "noise_min": (float, 0.0001), "noise_max": (float, 0.02),
    "sampling_noise": (bool, False), "sampling_steps": (int, 0), "rebuild_k": (int, 1), "e_loss": (float, 0.1),
    "ris_lambda": (float, 0.5), "ris_adj_lambda": (float, 0.2), "trans": (int, 0), "cl_method": (int, 0),
}
EXAMPLES = {float: ("0.25", 0.25), int: ("3", 3), str: ("abc", "abc")}


@pytest.mark.parametrize("name", sorted(AUTHORS_FLAGS))
def test_flag_default_and_type(name):
    kind, default = AUTHORS_FLAGS[name]
    args = parse_args([])
    value = getattr(args, name)
    assert type(value) is kind, (name, type(value))
    assert value == default
    options = {opt for action in build_parser()._actions for opt in action.option_strings}
    assert f"--{name}" in options


@pytest.mark.parametrize("name", sorted(n for n, (k, _) in AUTHORS_FLAGS.items() if k in EXAMPLES))
def test_flag_parses_its_type(name):
    kind, _ = AUTHORS_FLAGS[name]
    text, value = EXAMPLES[kind]
    if name in ("trans", "cl_method"):
        text, value = "1", 1
    got = getattr(parse_args([f"--{name}", text]), name)
    assert type(got) is kind and got == value
    if kind is int:
        with pytest.raises(SystemExit):
            parse_args([f"--{name}", "1.5"])


@pytest.mark.parametrize("flag", ["--norm", "--sampling_noise"])
@pytest.mark.parametrize("text,value", [("False", False), ("True", True), ("false", False), ("true", True),
                                        ("0", False), ("1", True)])
def test_booleans_parsed_properly(flag, text, value):
    assert getattr(parse_args([flag, text]), flag[2:]) is value


def test_bad_boolean_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--norm", "maybe"])
    assert e.value.code != 0


@pytest.mark.parametrize("text,value", [("[1000]", [1000]), ("[200,100]", [200, 100]), ("[200, 100]", [200, 100]),
                                        ("64", [64])])
def test_dims(text, value):
    assert parse_args(["--dims", text]).dims == value


@pytest.mark.parametrize("payload", ["__import__('os')", "__import__('pathlib').Path({marker!r}).touch()",
                                     "[1000] + [__import__('os').getpid()]", "[-5]", "[1.5]", "['a']", "[]x"])
def test_dims_malicious_or_bad_rejected_without_eval(payload, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "pwned"
    payload = payload.format(marker=str(marker))

    def no_eval(*a, **k):
        raise AssertionError("eval called on a command-line string")

    monkeypatch.setattr(builtins, "eval", no_eval)
    with pytest.raises(SystemExit) as e:
        parse_args(["--dims", payload])
    assert e.value.code != 0
    assert not marker.exists()


@pytest.mark.parametrize("argv,expected", [(["--topks", "10,50"], [10, 20, 50]),
                                           (["--topks", "10,20,50"], [10, 20, 50]),
                                           (["--topk", "10", "--topks", "10,50"], [10, 50]),
                                           ([], [20]), (["--topk", "5"], [5])])
def test_topks(argv, expected):
    assert parse_args(argv).topks == expected


def test_choices_enforced():
    for argv in (["--trans", "3"], ["--cl_method", "2"], ["--device", "tpu"]):
        with pytest.raises(SystemExit):
            parse_args(argv)


# --- presets: the published commands ---------------------------------------------------------

def test_preset_sets_model_data_and_the_published_flags():
    args = parse_args(["--preset", "diffmm-tiktok"])
    # DiffMM's README TikTok command, written out here independently of Params.PRESETS
    assert (args.model, args.data, args.reg, args.ssl_reg, args.epoch, args.trans, args.e_loss, args.cl_method) == \
        ("diffmm", "tiktok", 1e-4, 1e-2, 50, 1, 0.1, 1)
    assert args.preset == "diffmm-tiktok"
    sports = parse_args(["--preset", "diffmm-sports"])
    assert (sports.reg, sports.temp, sports.ris_lambda, sports.e_loss, sports.keepRate, sports.trans) == \
        (1e-6, 0.1, 0.1, 0.5, 1.0, 1)


def test_explicit_flags_win_over_the_preset_wherever_they_are():
    args = parse_args(["--epoch", "3", "--preset", "diffmm-tiktok", "--reg", "0.5", "--data", "mydata"])
    assert (args.epoch, args.reg, args.data, args.ssl_reg) == (3, 0.5, "mydata", 1e-2)


def test_unknown_preset_or_a_preset_of_another_model_is_one_sentence(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--preset", "diffmm-movielens"])
    assert exit_.value.code == 2 and "unknown preset 'diffmm-movielens'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--preset", "diffmm-baby", "--model", "mf"])
    assert exit_.value.code == 2 and "--preset diffmm-baby is diffmm's published command" in capsys.readouterr().err


# one flag of a command line, without parsing the rest (Utils/cli.py): the one place every module scans an argv
@pytest.mark.parametrize("argv, value", [([], None), (["--model", "mf"], "mf"), (["--model=mf"], "mf"),
                                         (["--lr", "0.1", "--model", "mf", "--model", "vbpr"], "vbpr"),
                                         (["--models", "mf"], None), (["--data", "x", "--modelx=mf"], None)])
def test_flag_value_reads_one_flag_as_argparse_does(argv, value):
    from Utils.cli import flag_value, has_flag

    assert flag_value(argv, "--model") == value
    assert flag_value(argv, "--model", "diffmm") == (value or "diffmm")
    assert has_flag(argv, "--model") == (value is not None)


def test_given_flags_and_without_flags():
    from Utils.cli import given_flags, without_flags

    argv = ["--lr=0.1", "--quiet", "--seed", "3", "--device", "cpu", "--quiet", "--data", "x", "--threads=2"]
    assert given_flags(argv) == ["--lr", "--quiet", "--seed", "--device", "--quiet", "--data", "--threads"]
    assert without_flags(argv, ("--device", "--threads")) == ["--lr=0.1", "--quiet", "--seed", "3", "--quiet",
                                                              "--data", "x"]
    # a flag whose value is optional takes the next token only when it is not a flag
    assert without_flags(["--quiet", "--seed", "3", "--quiet", "true", "--data", "x", "--quiet"], ("--quiet",),
                         standalone=("--quiet",)) == ["--seed", "3", "--data", "x"]
