"""Norm tuning in ``segadapt auto``'s search space (issue 21): the method ``norms`` (the affine parameters of the
normalisation layers alone) and ``norms: true`` beside an adapter, on a network with affine norms; left out of the
space, with a note, on one without (the demo's multi-view UNet: MONAI's InstanceNorm without affine); an ensemble
of members that each train their own norm copies on one base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from segadapt.adapters import norm_layers
from segadapt.runs import read_metrics
from segadapt.training import auto
from segadapt.training.auto import main as auto_main

from test_auto import CONFIGS, TINY, _argv, _case_files, _mean_probabilities, _outer_folds  # noqa: E402 (tests/ is on sys.path)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore::optuna.exceptions.ExperimentalWarning")

AFFINE = ["model.kwargs.norm=[instance,{affine:true}]"]  # the tiny multi-view UNet with affine InstanceNorms


def _search(root: Path, *more: str) -> auto.Search:
    return auto.Search(CONFIGS, [*TINY, f"paths.data={root}/data", f"paths.runs={root}/runs", *more], trials=1)


def test_norm_tuning_leaves_the_space_of_a_network_without_affine_norms(tmp_path, capsys):
    plain = _search(tmp_path)
    assert not norm_layers(plain._net)
    default = yaml.safe_load((CONFIGS / "auto.yaml").read_text())
    assert "norms" in default["methods"] and default["norms"] == [False, True]
    assert plain.space["methods"] == [m for m in default["methods"] if m != "norms"] and plain.space["norms"] == [False]
    out = capsys.readouterr().out
    assert "auto: search space: methods lora_c," in out and "norms false;" in out
    assert "norm tuning left out: multiview_unet has no normalisation layer with affine parameters" in out

    affine = _search(tmp_path, *AFFINE)
    assert norm_layers(affine._net)
    assert affine.space["methods"] == default["methods"] and affine.space["norms"] == [False, True]
    out = capsys.readouterr().out
    assert "norms false/true;" in out and "left out" not in out


@pytest.fixture(scope="module")
def normed(tmp_path_factory) -> dict:
    """On the affine-norm network: a 2-trial search of fold 0 whose adapter trials all train the norms beside the
    adapter, their ensemble forced; and a 1-trial search of norm tuning alone (its own runs folder)."""
    root = tmp_path_factory.mktemp("norms")
    space = yaml.safe_load((CONFIGS / "auto.yaml").read_text())
    space["placements"] = {"all_conv": {"preset": "all_conv"}}  # no `train`: the members can share a base
    (root / "auto.yaml").write_text(yaml.safe_dump(space))
    ensemble = auto_main(_argv(root, *AFFINE, "--trials", "2", "--folds", "0", "--space", str(root / "auto.yaml"),
                               "auto.methods=[lora_c,cp_lora]", "auto.norms=[true]", "auto.lr_factor=[3,10]",
                               "auto.ensemble=2", "auto.ensemble_rule=always", "auto.pruner=none"))
    alone = auto_main(_argv(root, *AFFINE, "--trials", "1", "--folds", "0", "auto.methods=[norms]", "auto.ensemble=0",
                            runs="alone"))
    return {"root": root, "ensemble": ensemble, "alone": alone}


def _norm_copies(adapter_file: Path, norms: set) -> set:
    """The norm layers (of `norms`) whose trained copy (``<layer>.weight``, ``<layer>.bias``) an adapter file holds."""
    with safe_open(str(adapter_file), framework="pt") as handle:
        return {key.rsplit(".", 1)[0] for key in handle.keys()} & norms


def test_norms_beside_the_adapter_and_an_ensemble_of_such_members(normed):
    """Every adapter trial trains its own copy of every affine norm layer (in its adapter file); two such members
    share one base: the ensemble is formed, and its prediction is the mean of the members each predicted alone."""
    from segadapt.inference import Predictor

    root, fold = normed["root"], normed["ensemble"]["folds"][0]
    norms = set(norm_layers(_search(root, *AFFINE)._net))
    assert norms
    for trial in fold["trials"]:
        assert trial["state"] == "COMPLETE" and trial["choice"]["norms"] is True and trial["adapter"]["spec"]["norms"]
        assert _norm_copies(Path(trial["run_dir"]) / "adapter.safetensors", norms) == norms
    folder = root / "runs/phantom_sah/multiview_unet/auto/fold0"
    members = [folder / name for name in json.loads((folder / "ensemble.json").read_text())["members"]]
    assert len(members) == 2 and all(_norm_copies(m / "adapter.safetensors", norms) == norms for m in members)
    files = _case_files(root / "data/phantom_sah/dataset.json")
    image = files[_outer_folds(root)[0][0]][0]
    mean = _mean_probabilities(members, image)
    assert Predictor.from_runs([folder]).predict(image).probabilities == pytest.approx(mean, abs=1e-5)
    for member in members:  # the members predict apart: each runs its own norm copies
        assert _mean_probabilities([member], image) != pytest.approx(mean, abs=1e-4)


def test_norm_tuning_alone_trains_only_the_affine_norm_parameters(normed):
    root, fold = normed["root"], normed["alone"]["folds"][0]
    net = _search(root, *AFFINE)._net
    affine = sum(p.numel() for name in norm_layers(net) for p in net.get_submodule(name).parameters())
    [trial] = fold["trials"]
    assert trial["state"] == "COMPLETE" and set(trial["choice"]) == {"method", "lr_factor"}
    assert trial["choice"]["method"] == "norms" and trial["trainable_params"] == affine
    final = read_metrics(root / "alone/phantom_sah/multiview_unet/auto/fold0")
    assert final["cost"]["trainable_params"] == affine and fold["outer"]["dice"] == final["val"]["dice"]


def test_a_member_with_norms_and_one_training_the_decoder_do_not_share_a_base(normed, tmp_path):
    """Two members that each train their own norm copies share a base; a member that trains the decoder in full
    (norms inside it included) cannot sit beside one that trains a copy of those norms: it is passed over."""
    from segadapt.training.auto_ensemble import share_a_base
    from segadapt.training.jobs import train

    root, trials = normed["root"], normed["ensemble"]["folds"][0]["trials"]
    normed_runs = [t["run_dir"] for t in trials]
    search = _search(root, *AFFINE)
    choice = {"method": "lora_c", "rank": 2, "rank_pattern": "uniform", "placement": "encoder+decoder", "norms": True,
              "lr_factor": 1.0}
    decoder_run = tmp_path / "decoder"
    train(search.trial_config(0, choice, decoder_run))
    assert share_a_base(normed_runs)
    assert not share_a_base([normed_runs[0], decoder_run]) and not share_a_base([decoder_run, normed_runs[0]])
