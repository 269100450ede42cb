"""metrics.json ``timing``: named phases that sum to the run's wall time; the phases inside ``trainer.fit`` (batches
drawn, training steps, checkpoints) told apart through Lightning's profiler hooks."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from segadapt.training.callbacks import PhaseTimes
from segadapt.training.sweep import sweep_summary
from segadapt.training.timing import PHASES, LoopProfiler, RunClock, format_timing

DRAW_S = 0.05  # seconds to draw one training item


class _SlowItems(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(DRAW_S)
        return torch.full((4,), float(index))


class _Toy(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_the_phases_of_a_fit_sum_to_its_wall_time(tmp_path):
    clock = RunClock()
    time.sleep(0.02)
    clock.lap("setup_s")
    phases, profiler = PhaseTimes(), LoopProfiler()
    trainer = pl.Trainer(max_steps=4, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         profiler=profiler, default_root_dir=tmp_path,
                         callbacks=[phases, ModelCheckpoint(dirpath=tmp_path, save_top_k=0, save_last=True,
                                                            every_n_train_steps=2)])
    trainer.fit(_Toy(), DataLoader(_SlowItems(), batch_size=1))
    clock.lap("lightning_s")
    clock.split_fit(phases.train_steps_s, phases.validation_s, profiler)
    timing = clock.as_dict()

    assert (tmp_path / "last.ckpt").is_file()
    assert timing["data_s"] >= 4 * DRAW_S  # four batches drawn, each one item
    assert timing["checkpoints_s"] > 0 and timing["train_steps_s"] > 0 and timing["setup_s"] >= 0.02
    assert timing["lightning_s"] >= 0
    named = sum(timing[k] for k in PHASES)
    assert named + timing["other_s"] == pytest.approx(timing["total_s"])
    assert abs(timing["other_s"]) < 1e-3  # every second of the run is in a named phase
    line = format_timing(timing)
    assert line.startswith("time (s): startup 0.0, setup ") and "other 0.0" in line


def test_run_clock_refuses_an_unknown_phase():
    with pytest.raises(KeyError, match="unknown timing phase 'loading_s'"):
        RunClock().lap("loading_s")


def test_sweep_summary_sums_every_phase_and_gives_runs_per_hour():
    runs = [{"timing": {"startup_s": 3.0, "data_s": 2.0, "train_steps_s": 6.0, "total_s": 12.0}},
            {"timing": {"data_s": 1.0, "train_steps_s": 9.0, "validation_s": 2.0, "total_s": 12.0}}]
    line = sweep_summary(runs, 36.0)
    assert "2 runs in 36 s wall (200 runs per hour)" in line
    assert "training steps 15 s (42% of the wall time)" in line and "data 3," in line and "startup 3," in line


def test_training_items_are_drawn_on_one_thread_with_the_same_values():
    from monai.data import Dataset as MonaiDataset
    from monai.transforms import Compose, Lambdad, RandAffined, RandGaussianNoised

    from segadapt.training.datamodule import SeededItems

    seen = []
    transform = Compose([RandAffined("image", prob=1.0, rotate_range=0.3, scale_range=0.1),
                         RandGaussianNoised("image", prob=1.0, std=0.1),
                         Lambdad("image", lambda x: seen.append(torch.get_num_threads()) or x)])
    volume = torch.rand(1, 24, 24, 24, generator=torch.Generator().manual_seed(0))
    dataset = MonaiDataset([{"image": volume}], transform=transform)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        item = SeededItems(dataset)[(0, 7)]
        assert seen == [1] and torch.get_num_threads() == 2  # drawn on one thread, the steps' count restored
        dataset.transform.set_random_state(seed=7)
        at_two_threads = dataset[0]
        assert seen == [1, 2]
        assert torch.equal(item["image"], at_two_threads["image"])
    finally:
        torch.set_num_threads(previous)
