"""The one progress shape (workers/progress.py): what a phase reports, how often, what becomes an
event, and rate and ETA, on a clock the test moves; then auto's candidates on real photos."""
from __future__ import annotations

import itertools

import pytest
import torch

from tests.support.training import SPEC, Recorder, one_thread, tiny_data  # noqa: F401
from workers.config import TrainConfig
from workers.progress import EVENT_TENTHS, REPORT_EVERY_S, PhaseMeter, ProgressTracker


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tracked:
    """A Control whose updates go through a tracker, as the worker's do."""

    def __init__(self, clock):
        self.tracker = ProgressTracker(clock=clock, backbone="efficientnet_lite0")
        self.updates, self.events = [], []

    def progress(self, update):
        self.updates.append(update)
        self.events += self.tracker.update(update)

    def stop_if_asked(self):
        pass


def test_a_long_loop_reports_often_but_its_events_stay_few():
    clock = Clock()
    control = Tracked(clock)
    meter = PhaseMeter(control, "decoding images", 20_000, "images", clock=clock)
    for _ in range(20_000):  # 400 s of work at 50 images/s
        clock.now += 0.02
        meter.advance(1)
    reported = [u["done"] for u in control.updates]
    assert reported[0] == 0 and reported[-1] == 20_000
    gaps = [b - a for a, b in itertools.pairwise(reported)]
    assert max(gaps) <= REPORT_EVERY_S / 0.02 + 1  # at least every REPORT_EVERY_S of work
    events = [e for e in control.events if e["kind"] == "progress"]
    assert 2 <= len(events) <= EVENT_TENTHS + 2
    assert events[0]["done"] == 0 and events[-1]["done"] == 20_000
    assert [round(e["done"], -2) for e in events[1:]] == list(range(2_000, 20_001, 2_000))  # each tenth
    half = events[5]
    assert half["rate"] == 50.0 and half["eta_s"] == pytest.approx(200.0, abs=0.5)
    assert control.tracker.progress["phases"] == [{"phase": "decoding images", "backbone": "efficientnet_lite0",
                                                   "unit": "images", "done": 20_000, "total": 20_000,
                                                   "seconds": pytest.approx(400.0)}]


def test_a_new_phase_replaces_the_fields_and_a_phase_come_back_to_keeps_its_own():
    clock = Clock()
    control = Tracked(clock)
    features = PhaseMeter(control, "extracting features", 10, "images", clock=clock)
    clock.now += 1
    features.advance(10)
    PhaseMeter(control, "auto search: heads", 2, "candidates", clock=clock, candidate={"logistic_c": 1.0})
    progress = control.tracker.progress
    assert progress["phase"] == "auto search: heads" and progress["total"] == 2 and "rate" in progress
    clock.now += 1
    features.grow(4)  # a mirror pass asked for later
    features.advance(4)
    assert control.tracker.progress["done"] == 14 and control.tracker.progress["unit"] == "images"
    control.progress({"phase": "auto search: heads", "done": 1})  # back: its unit, total, candidate stay
    progress = control.tracker.progress
    assert (progress["unit"], progress["total"], progress["candidate"]) == ("candidates", 2, {"logistic_c": 1.0})
    assert [(p["phase"], p["done"], p["total"]) for p in progress["phases"]] == [
        ("extracting features", 14, 14), ("auto search: heads", 1, 2)]
    # Another backbone's decoding is a phase of its own; the backbone stays until changed.
    control.progress({"phase": "decoding images", "backbone": "efficientnet_lite1", "unit": "images", "done": 0,
                      "total": 5})
    control.progress({"phase": "extracting features", "unit": "images", "done": 0, "total": 5})
    assert [(p["phase"], p["backbone"]) for p in control.tracker.progress["phases"]][-2:] == [
        ("decoding images", "efficientnet_lite1"), ("extracting features", "efficientnet_lite1")]


def test_epochs_and_finished_candidates_are_events_and_make_a_leaderboard():
    clock = Clock()
    control = Tracked(clock)
    meter = PhaseMeter(control, "training", 2, "epochs", clock=clock)
    for epoch in (1, 2):
        clock.now += 0.1
        meter.report(1, epoch=epoch, epochs=2, train_loss=0.5, val_loss=0.4, val_accuracy=0.8)
    assert [e["epoch"] for e in control.events if e["kind"] == "epoch"] == [1, 2]
    worse = {"recipe": {"logistic_c": 0.1}, "val_accuracy": 0.8, "val_loss": 0.5, "scored_on": "out of fold"}
    better = {"recipe": {"logistic_c": 1.0}, "val_accuracy": 0.9, "val_loss": 0.6, "scored_on": "out of fold"}
    control.progress({"finished": [worse]})
    control.progress({"finished": [better]})
    ranks = [(e["recipe"], e["rank"], e["of"]) for e in control.events if e["kind"] == "candidate"]
    assert ranks == [({"logistic_c": 0.1}, 1, 1), ({"logistic_c": 1.0}, 1, 2)]
    assert [e["recipe"] for e in control.tracker.progress["leaderboard"]] == [{"logistic_c": 1.0}, {"logistic_c": 0.1}]
    assert "finished" not in control.tracker.progress


@pytest.mark.usefixtures("one_thread")
def test_auto_reports_each_candidate_it_scores_and_its_phases():
    from workers.training import train

    control = Tracked(Clock())
    config = TrainConfig(strategy="auto", image_size=64, epochs=2, batch_size=4, seed=7)
    result = train(config, tiny_data(), SPEC.build_features(pretrained=True), SPEC.feature_dim, control,
                   torch.device("cpu"))
    report = result.metrics["auto"]["candidates"]
    finished = [e for e in control.events if e["kind"] == "candidate"]
    assert sorted(map(str, (e["recipe"] for e in finished))) == sorted(map(str, (c["recipe"] for c in report)))
    board = control.tracker.progress["leaderboard"]
    assert len(board) == len(report)
    assert [e["val_accuracy"] for e in board] == sorted((e["val_accuracy"] for e in board), reverse=True)
    phases = [p["phase"] for p in control.tracker.progress["phases"]]
    assert phases[0] == "extracting features" and any(p.startswith("auto search") for p in phases)
    for update in control.updates:
        if update.get("phase", "").startswith("auto search") and "done" in update:
            assert {"unit", "total"} <= set(update) or update.get("finished") is not None, update
