"""Checkpoints written before a rename still load: DiffMM's `denoisers` (now `generators`: a VGAE is no denoiser) and
MMSSL's `generator` (now `rng`: the batches' random generator, not the GAN's generator)."""
from __future__ import annotations

import torch

import inference
from conftest import tiny_args
from Params import parse_args
from Models.base import PhaseTimer

CPU = torch.device("cpu")


def built(tiny_dir, tmp_path, *extra, seed="1"):
    args = parse_args(tiny_args(tiny_dir, tmp_path / "out", "--seed", seed, *extra))
    return inference.build_model(args, inference.load_run_data(args, True), CPU)


def scores(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.scorer()(torch.arange(model.data.n_users))


def test_a_diffmm_checkpoint_with_the_old_key_names_loads_the_same_model(tiny_dir, tmp_path):
    trained = built(tiny_dir, tmp_path, "--ablation", "no_dm")   # generators that are VGAEs
    trained.train_epoch(0, PhaseTimer(CPU))
    state = trained.training_state()
    assert "generators" in state["checkpoint"] and "generator_optimizers" in state["stateful"]
    # as a run saved before the rename wrote it
    old = dict(state, checkpoint={("denoisers" if k == "generators" else k): v for k, v in state["checkpoint"].items()},
               stateful={("denoiser_optimizers" if k == "generator_optimizers" else k): v
                         for k, v in state["stateful"].items()})
    assert "generators" not in old["checkpoint"] and "generator_optimizers" not in old["stateful"]

    fresh = built(tiny_dir, tmp_path, "--ablation", "no_dm", seed="2")
    assert not torch.equal(fresh.generators["image"].w0.weight, trained.generators["image"].w0.weight)
    fresh.load_training_state(old)
    for m, generator in trained.generators.items():
        for (name, want), got in zip(generator.state_dict().items(), fresh.generators[m].state_dict().values()):
            assert torch.equal(want, got), (m, name)
        assert fresh.generator_optimizers[m].state_dict()["state"].keys() == \
            trained.generator_optimizers[m].state_dict()["state"].keys()
    assert torch.equal(scores(fresh), scores(trained))


def test_an_mmssl_last_pt_with_the_old_generator_key_resumes_the_same_draws(tiny_dir, tmp_path):
    extra = ("--model", "mmssl", "--batch", "8", "--embed_size", "8", "--head_num", "2")
    trained = built(tiny_dir, tmp_path, *extra)
    trained.train_epoch(0, PhaseTimer(CPU))
    state = trained.training_state()
    assert "rng" in state["stateful"] and "generator" not in state and "generator" not in state["stateful"]
    # the layouts of runs saved before: the generator's state at the top only, or under `generator` in both places
    top_only = {k: v for k, v in state.items() if k != "stateful"}
    top_only["generator"] = state["stateful"]["rng"]
    top_only["stateful"] = {k: v for k, v in state["stateful"].items() if k != "rng"}
    both = dict(top_only, stateful={("generator" if k == "rng" else k): v for k, v in state["stateful"].items()})
    for old in (top_only, both):
        fresh = built(tiny_dir, tmp_path, *extra, seed="2")
        assert not torch.equal(fresh.rng.get_state(), trained.rng.get_state())
        fresh.load_training_state(old)
        assert torch.equal(fresh.rng.get_state(), trained.rng.get_state())
        assert all(torch.equal(a, b) for a, b in zip(fresh.sample_batch(), built_copy_batch(trained)))


def built_copy_batch(model):
    """The next batch `model` would draw, without moving its generator."""
    state = model.rng.get_state()
    batch = model.sample_batch()
    model.rng.set_state(state)
    return batch


def test_torch_generators_are_saved_by_the_base_class_and_old_freedom_files_still_resume(tiny_dir, tmp_path):
    """FREEDOM's pruning generator is in the base's `stateful` (no per-model override); a last.pt from before,
    which kept it beside under the same name, loads to the same state."""
    extra = ("--model", "freedom", "--batch", "8")
    trained = built(tiny_dir, tmp_path, *extra)
    trained.pre_epoch(0, PhaseTimer(CPU))
    trained.train_epoch(0, PhaseTimer(CPU))
    state = trained.training_state()
    assert torch.equal(state["stateful"]["pruning_generator"], trained.pruning_generator.get_state())
    old = dict(state, stateful={k: v for k, v in state["stateful"].items() if k != "pruning_generator"},
               pruning_generator=state["stateful"]["pruning_generator"])
    for saved in (state, old):
        fresh = built(tiny_dir, tmp_path, *extra, seed="2")
        assert not torch.equal(fresh.pruning_generator.get_state(), trained.pruning_generator.get_state())
        fresh.load_training_state(saved)
        assert torch.equal(fresh.pruning_generator.get_state(), trained.pruning_generator.get_state())
