"""Flags that would silently do nothing say so (a refusal or a warning naming the flag), the model contract checks
every flag-only value when the command line is parsed, and the case-study figure reads every dataset layout."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import List

import numpy as np
import pytest
import scipy.sparse as sp

import Main
from DataHandler import Data, load_data
from Experiments import reproduce, study, sweep
from Models import get_model, model_names
from Models.mdmns import MDMNS
from Params import build_parser, parse_args
from Utils import figures
from Utils.errors import UsageError
from Utils.formats import write_dataset

from conftest import hand_made, tiny_args


@pytest.fixture
def logged():
    """The messages logged on the 'diffmm' logger while the test runs (its own handler: a test before may have
    turned the logger's propagation off, which hides it from caplog)."""
    messages: List[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    log, handler = logging.getLogger("diffmm"), Keep(logging.WARNING)
    level = log.level
    if level == logging.NOTSET or level > logging.WARNING:
        log.setLevel(logging.WARNING)
    log.addHandler(handler)
    yield messages
    log.removeHandler(handler)
    log.setLevel(level)


def warned(logged: List[str], argv: List[str]) -> List[str]:
    """The warnings that parsing `argv` logs."""
    logged.clear()
    parse_args(argv)
    return [m for m in logged if m.startswith("warning:")]


def toy(modalities=("image", "text")) -> Data:
    train, val, test, features = hand_made(modalities=modalities)
    return Data("toy", *(sp.csr_matrix(m, dtype=np.float32) for m in (train, val, test)), features=features)


# ---------------------------------------------------------------------------------------------
# 6. flags that do nothing: warnings (the run goes on) and refusals (a contradiction to resolve)
# ---------------------------------------------------------------------------------------------

def test_no_dm_names_the_diffusion_flags_it_ignores(logged):
    [sentence] = warned(logged, ["--ablation", "no_dm", "--steps", "10", "--e_loss", "0.5", "--dims", "[64]"])
    assert "--steps" in sentence and "--e_loss" in sentence and "--dims" in sentence and "no_dm" in sentence
    assert "--noise_scale" not in sentence   # not given
    assert warned(logged, ["--ablation", "no_dm"]) == []
    # a flag given at its default value changes nothing either way: not named
    assert warned(logged, ["--ablation", "no_dm", "--steps", "5"]) == []
    # the diffusion's flags are read without the ablation
    assert warned(logged, ["--steps", "10", "--e_loss", "0.5"]) == []


def test_no_msi_names_e_loss_and_a_published_command_is_not_warned_about(logged):
    [sentence] = warned(logged, ["--ablation", "no_msi", "--e_loss", "0.3"])
    assert "--e_loss" in sentence and "no_msi" in sentence
    # Table 3 runs the published command with each ablation: the preset's own --e_loss was not given by the user
    for ablation in ("no_dm", "no_msi", "no_cl"):
        assert warned(logged, ["--preset", "diffmm-baby", "--ablation", ablation]) == []
    # ... but a value other than the preset's is
    assert "--e_loss" in " ".join(warned(logged, ["--preset", "diffmm-baby", "--ablation", "no_dm", "--e_loss", "1"]))


def test_fusion_keep_without_fusion_ratio_is_named(logged):
    [sentence] = warned(logged, ["--fusion_keep", "0.3"])
    assert "--fusion_keep" in sentence and "--fusion_ratio 0" in sentence
    assert warned(logged, ["--fusion_keep", "0.3", "--fusion_ratio", "0.5"]) == []


def test_mdmns_guidance_flags_with_no_dm_are_named_and_steps_only_where_unread(logged):
    [sentence] = warned(logged, ["--model", "mdmns", "--ablation", "no_dm", "--guide_degree", "abs", "--steps", "7"])
    assert "--guide_degree" in sentence and "--steps" in sentence
    # cl_method 1 reads --steps for its noise levels int(frac x steps) with no_dm too
    [sentence] = warned(logged, ["--model", "mdmns", "--ablation", "no_dm", "--guide_degree", "abs", "--steps", "7",
                                 "--cl_method", "1"])
    assert "--guide_degree" in sentence and "--steps" not in sentence
    assert warned(logged, ["--model", "mdmns", "--guide_degree", "abs", "--steps", "7"]) == []


def test_mdmns_guidance_flags_on_one_modality_are_named_by_check(logged):
    args = parse_args(["--model", "mdmns", "--guide_degree", "one", "--guide_at_sampling", "true"])
    logged.clear()
    assert MDMNS.check(args, toy(("image",))) is None          # the run goes on, unguided
    [sentence] = [m for m in logged if m.startswith("warning:")]
    assert "--guide_degree" in sentence and "--guide_at_sampling" in sentence and "one modality" in sentence
    logged.clear()
    assert MDMNS.check(args, toy()) is None and logged == []   # two modalities: guided, nothing to say
    assert MDMNS.check(parse_args(["--model", "mdmns"]), toy(("image",))) is None and logged == []


def test_mdmns_guided_sampling_with_the_hidden_chain_is_refused(capsys):
    with pytest.raises(SystemExit) as refused:
        parse_args(["--model", "mdmns", "--guide_at_sampling", "true", "--reverse", "hidden"])
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert "--guide_at_sampling" in err and "--reverse hidden" in err
    for reverse in ("auto", "direct"):
        assert parse_args(["--model", "mdmns", "--guide_at_sampling", "true", "--reverse", reverse]).reverse == reverse
    assert parse_args(["--model", "mdmns", "--reverse", "hidden"]).reverse == "hidden"


def test_ngcf_node_dropout_without_its_switch_is_named(logged):
    [sentence] = warned(logged, ["--model", "ngcf", "--node_dropout", "[0.3]", "--node_dropout_type", "nodes"])
    assert "--node_dropout " in sentence and "--node_dropout_type" in sentence and "--node_dropout_flag 1" in sentence
    assert warned(logged, ["--model", "ngcf", "--node_dropout", "[0.3]", "--node_dropout_flag", "1"]) == []


def test_freedom_image_weight_beside_explicit_weights_is_named(logged):
    [sentence] = warned(logged, ["--model", "freedom", "--mm_weights", "0.5,0.5", "--mm_image_weight", "0.3"])
    assert "--mm_image_weight" in sentence and "--mm_weights" in sentence
    assert warned(logged, ["--model", "freedom", "--mm_weights", "0.5,0.5"]) == []


def test_help_texts_say_what_each_flag_does_when_ignored():
    def help_of(model: str, flag: str) -> str:
        return next(a.help for a in build_parser(model)._actions if a.dest == flag)

    assert "warning" in help_of("diffmm", "ablation") and "warning" in help_of("diffmm", "fusion_keep")
    assert "refused" in help_of("mdmns", "guide_at_sampling")
    assert "warning" in help_of("ngcf", "node_dropout") and "warning" in help_of("freedom", "mm_image_weight")
    assert "refused" in next(a.help for a in reproduce.parser()._actions if a.dest == "select")
    assert all("refused" in next(a.help for a in sweep.parser()._actions if a.dest == f)
               for f in ("prune_startup", "prune_warmup"))


def test_pruner_settings_without_prune_are_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep.main(["--grid", "lr=0.1,0.01", "--sweep_dir", str(out), "--prune_warmup", "3", "--quiet"]) == 2
    assert "--prune_warmup" in capsys.readouterr().out and not out.exists()
    opts, _ = sweep.parser().parse_known_args(["--grid", "lr=0.1", "--sweep_dir", str(out), "--prune_startup", "2"])
    with pytest.raises(UsageError, match="--prune_startup"):
        study.check_options(opts, [])
    opts.prune = True
    assert study.unused_prune_flags(opts) is None
    default, _ = sweep.parser().parse_known_args(["--grid", "lr=0.1", "--sweep_dir", str(out)])
    assert study.unused_prune_flags(default) is None


def test_reproduce_refuses_select_without_tune(tmp_path, capsys):
    for argv in (["--table", "2"], ["--table", "3"], ["--table", "4", "--tune"]):
        with pytest.raises(SystemExit) as refused:
            reproduce.main([*argv, "--data", "nothing", "--data_dir", str(tmp_path), "--select", "mmrec"])
        assert refused.value.code == 2 and "--select mmrec" in capsys.readouterr().err
    # with --table 2 --tune it is what selects: not refused (this one stops later, at the missing dataset)
    assert reproduce.main(["--table", "2", "--tune", "--data", "nothing", "--data_dir", str(tmp_path), "--select",
                           "mmrec"]) == 2
    assert "holds no dataset" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# 4. the contract: every check that reads only the flags refuses the command line when it is parsed
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,flag,value", [
    ("lightgcn", "n_layers", "-1"), ("ncl", "n_layers", "-1"), ("sgl", "n_layers", "-1"), ("lattice", "n_layers", "-1"),
    ("bm3", "dropout", "1.0"), ("lattice", "knn_k", "0"), ("lattice", "feat_embed_dim", "0"),
    ("freedom", "feat_embed_dim", "8"), ("freedom", "mm_weights", "0.2,0.3"), ("freedom", "n_mm_layers", "-1"),
    ("lgmrec", "keep_rate", "0"), ("lgmrec", "n_hyper_layer", "0"), ("mmssl", "T", "0"), ("mmssl", "tau", "0"),
    ("diffrec", "steps", "0"), ("diffrec", "weight_decay", "-1"), ("mf", "embedding_size", "0"),
    ("vbpr", "embedding_size", "0"),
])
def test_flag_only_checks_refuse_when_parsed(model, flag, value, capsys):
    with pytest.raises(SystemExit) as refused:
        parse_args(["--model", model, f"--{flag}", value])
    assert refused.value.code == 2 and f"--{flag}" in capsys.readouterr().err


@pytest.mark.parametrize("model", model_names())
def test_every_model_checks_its_shared_flags_itself(model):
    """--embedding_size and --n_layers are refused by the model's own check_flags (Params checks harness flags only),
    for every registered model that has them: a new model that forgets super().check_flags fails here."""
    parser = build_parser(model)
    args = parser.parse_args(["--model", model])
    for flag, bad in (("embedding_size", 0), ("n_layers", -1)):
        if hasattr(args, flag):
            problem = get_model(model).check_flags(argparse.Namespace(**{**vars(args), flag: bad}))
            assert problem and f"--{flag}" in problem, (model, flag, problem)
    assert get_model(model).check_flags(args) is None


def test_params_checks_no_model_flag():
    source = (Path(__file__).resolve().parents[1] / "Params.py").read_text()
    assert "hasattr(args" not in source


def test_check_keeps_the_flag_checks_for_arguments_that_were_not_parsed():
    """Main.run calls only check: arguments built without Params.parse_args are refused there too."""
    for model, flag, bad in (("lightgcn", "n_layers", -1), ("diffrec", "steps", 0), ("bm3", "dropout", 1.0)):
        args = build_parser(model).parse_args(["--model", model])
        problem = get_model(model).check(argparse.Namespace(**{**vars(args), flag: bad}), toy())
        assert problem and f"--{flag}" in problem


# ---------------------------------------------------------------------------------------------
# 5. the case-study figure reads every layout Main.py reads
# ---------------------------------------------------------------------------------------------

def write_layout(folder: Path, layout: str) -> None:
    """The hand-made dataset in `layout`; 'npz' = DiffMM's layout with scipy.sparse.save_npz files."""
    train, val, test, features = hand_made()
    splits = tuple(sp.csr_matrix(m, dtype=np.float32) for m in (train, val, test))
    if layout == "npz":
        folder.mkdir(parents=True)
        for stem, matrix in zip(("trnMat", "valMat", "tstMat"), splits):
            sp.save_npz(folder / f"{stem}.npz", matrix)
        for modality, values in features.items():
            np.save(folder / f"{modality}_feat.npy", values)
    else:
        write_dataset(folder, splits, features, layout)


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("layout", ["mmrec", "mmssl", "npz"])
def test_case_study_figure_of_a_run_on_any_layout(tmp_path, layout, capsys):
    data_dir, out = tmp_path / "data", tmp_path / "run"
    write_layout(data_dir / "mm", layout)
    assert not (data_dir / "mm" / "trnMat.pkl").exists()
    assert Main.main(tiny_args(data_dir, out, data="mm")) == 0
    assert is_png(figures.case_study(out, tmp_path / "case.png", modality="text", n_users=2))
    assert figures.main([str(out), "--case_stats"]) == 0
    assert '"modality": "image"' in capsys.readouterr().out
    assert figures.main([str(out)]) == 0 and is_png(out / "case_study.png")


@pytest.mark.parametrize("layout", ["mmrec", "mmssl", "npz"])
def test_generated_features_like_a_dataset_of_any_layout(tmp_path, layout):
    from Utils.synthetic import write_like

    write_layout(tmp_path / "like", layout)
    write_like(tmp_path / "copy", tmp_path / "like", {"image": 4})
    copy, like = load_data("copy", tmp_path), load_data("like", tmp_path)
    assert list(copy.features) == ["image"] and copy.features["image"].shape == (like.n_items, 4)
    assert (copy.train != like.train).nnz == 0 and (copy.test != like.test).nnz == 0
