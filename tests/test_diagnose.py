"""segadapt diagnose: the statistics on synthetic updates with known answers, and on real run folders."""

from __future__ import annotations

import copy
import csv
import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file

from segadapt.adapters import merge_and_unload
from segadapt.inference.diagnose import diagnose_run, effective_rank, intruder_dimensions, layer_stats, main
from segadapt.runs import CONFIG_FILE, read_run_config
from segadapt.training.load import load_run


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).Q


@pytest.mark.parametrize("n_intruders", [0, 1, 3, 5])
def test_intruder_dimensions_counts_new_dominant_directions(n_intruders):
    """W0 = U diag(sigma) V^T (64 x 96, sigma in [1, 2]); the update adds n rank-one terms of singular
    value 10 on random unit directions (|cos| with every column of U ~ sqrt(2 ln 64 / 64) ~ 0.36 < 0.5):
    they become the top n singular vectors of W and are the only ones unlike W0's."""
    u, v = orthonormal(64, 64, 0), orthonormal(96, 64, 1)
    w0 = u @ torch.diag(torch.linspace(2.0, 1.0, 64, dtype=torch.float64)) @ v.t()
    new_u, new_v = orthonormal(64, max(n_intruders, 1), 2)[:, :n_intruders], orthonormal(96, max(n_intruders, 1), 3)[:, :n_intruders]
    w = w0 + 10.0 * new_u @ new_v.t()
    assert intruder_dimensions(w0, w) == n_intruders
    # a small dense change (full fine-tuning-like) keeps every top direction: no intruder
    assert intruder_dimensions(w0, w0 + 0.01 * torch.randn(64, 96, dtype=torch.float64)) == 0


def test_effective_rank_and_relative_norm_from_their_definitions():
    u, v = orthonormal(20, 5, 4), orthonormal(30, 5, 5)
    assert effective_rank(u[:, :1] @ v[:, :1].t()) == pytest.approx(1.0)
    assert effective_rank(u @ v.t()) == pytest.approx(5.0)  # 5 equal singular values
    sigma = torch.tensor([3.0, 1.0], dtype=torch.float64)
    p = sigma / sigma.sum()
    assert effective_rank(u[:, :2] @ torch.diag(sigma) @ v[:, :2].t()) == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
    w0 = torch.ones(4, 6)
    assert layer_stats(w0, 1.5 * w0)["relative_norm"] == pytest.approx(0.5)
    assert effective_rank(torch.zeros(3, 3)) == 0.0


@pytest.fixture(scope="module")
def full_run(demo_runs, tmp_path_factory):
    """A 'full' fine-tuning run folder beside the demo adapter runs: same base, every weight moved."""
    run = tmp_path_factory.mktemp("full") / "fold0"
    run.mkdir()
    config = read_run_config(demo_runs[0])
    config["module"]["adapter"] = "full"
    config["module"]["preset"] = None
    config["run"]["method"] = "full"
    (run / CONFIG_FILE).write_text(yaml.safe_dump(config), encoding="utf-8")
    from segadapt.training.module import SegAdaptModule

    module = SegAdaptModule(**config["module"])  # the base, all trainable
    torch.manual_seed(0)
    state = {k: (v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v).contiguous() for k, v in module.net.state_dict().items()}
    save_file(state, str(run / "model.safetensors"), metadata={"format": "segadapt-weights"})
    shutil.copy(demo_runs[0] / "metrics.json", run / "metrics.json")  # a finished run
    return run


def test_diagnose_reads_adapter_and_full_runs_alike(demo_runs, full_run, tmp_path):
    adapter_rows = diagnose_run(demo_runs[0])
    full_rows = diagnose_run(full_run)
    # the adapter run: the adapted layers, each dW of CP rank 4 (matrix rank <= 4); values recomputed
    # here from the merged network against the base checkpoint
    module, config = load_run(demo_runs[0])
    merged = dict(merge_and_unload(copy.deepcopy(module.net)).named_modules())
    from segadapt.training.module import SegAdaptModule

    base = dict(SegAdaptModule(**{**config["module"], "adapter": "none"}).net.named_modules())
    assert len(adapter_rows) >= 5
    for row in adapter_rows:
        assert row["effective_rank"] <= 4.0 + 1e-6
        w, w0 = merged[row["layer"]].weight.detach(), base[row["layer"]].weight.detach()
        assert row["relative_norm"] == pytest.approx(float((w - w0).norm() / w0.norm()), rel=1e-4)
    # the full run: every conv moved by a dense random change -> high effective rank
    assert {r["layer"] for r in adapter_rows} <= {r["layer"] for r in full_rows}
    assert max(r["effective_rank"] for r in full_rows) > 4.0


def test_segadapt_diagnose_writes_table_csv_and_plot(demo_runs, full_run, tmp_path, capsys):
    from segadapt.cli import main as cli_main

    cli_main(["diagnose", str(demo_runs[0]), str(full_run), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "| run | layer |" in printed and "intruders" in printed
    with open(tmp_path / "out" / "diagnose.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["run"] for r in rows} == {str(demo_runs[0]), str(full_run)}
    assert (tmp_path / "out" / "diagnose.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case", ["no_run", "epsilon", "out_is_file", "untuned"])
def test_bad_input_is_one_error_line_and_exit_2(case, demo_runs, tmp_path, capsys):
    args = {"no_run": [str(tmp_path / "nothing")], "epsilon": [str(demo_runs[0]), "--epsilon", "2"]}.get(case)
    if case == "out_is_file":
        (tmp_path / "file").write_text("x", encoding="utf-8")
        args = [str(demo_runs[0]), "--out", str(tmp_path / "file")]
    if case == "untuned":  # a run whose weights equal the base's
        run = tmp_path / "untuned"
        shutil.copytree(demo_runs[0], run)
        module, _ = load_run(run)
        from segadapt.adapters import save_adapter

        with torch.no_grad():
            for name, p in module.net.named_parameters():
                if ".adapters." in name:
                    p.zero_()
        save_adapter(module.net, run / "adapter.safetensors")
        args = [str(run)]
    with pytest.raises(SystemExit) as stop:
        main(args + ["--out", str(tmp_path / "o")] if case != "out_is_file" else args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "o" / "diagnose.csv").exists()
