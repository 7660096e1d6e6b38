"""The loop state: what a checkpoint saves is exactly what a resumed run gets back, and the guards behave."""

import math

import pytest
import torch

from lora_ft.training.guards import BestAdapter, ForgettingBudget, OverfittingWatch
from lora_ft.training.state import LoopState


def test_the_loop_state_survives_a_weights_only_checkpoint_round_trip(tmp_path):
    weights = {"a.lora_A.weight": torch.randn(2, 3), "a.lora_B.weight": torch.randn(3, 2)}
    state = LoopState(step=7, epoch=1, position=3, evaluated_epoch=1,
                      before={"validation": {"loss": 2.5, "examples": 8}},
                      best=BestAdapter(loss=1.25, step=6, bad_evals=1, weights=weights),
                      watch=OverfittingWatch(recent=[1.5, 1.4], previous=(1.3, 1.6), worsening=1),
                      forgetting=ForgettingBudget(before={"kl": 0.0, "ppl_base": 9.5}, within_budget=(4, weights)))
    torch.save({**state.to_checkpoint(), "optimizer": {}}, tmp_path / "state.pt")
    back = LoopState.from_checkpoint(torch.load(tmp_path / "state.pt", weights_only=True))
    assert (back.step, back.epoch, back.position, back.evaluated_epoch) == (7, 1, 3, 1)
    assert back.before == state.before and back.forgetting.before == state.forgetting.before
    assert (back.best.loss, back.best.step, back.best.bad_evals) == (1.25, 6, 1)
    assert all(torch.equal(back.best.weights[k], v) for k, v in weights.items())
    assert back.forgetting.within_budget[0] == 4 and torch.equal(back.forgetting.within_budget[1]["a.lora_B.weight"],
                                                                 weights["a.lora_B.weight"])
    assert back.watch == state.watch
    fresh = LoopState.from_checkpoint(LoopState().to_checkpoint())
    assert fresh == LoopState() and math.isinf(fresh.best.loss)


def test_best_adapter_keeps_only_real_improvements_and_counts_the_others():
    best, taken = BestAdapter(), []

    def snapshot():
        taken.append(len(taken))
        return {"w": torch.tensor(float(len(taken)))}

    best.consider(2.0, 1, snapshot)
    best.consider(2.0 - 1e-8, 2, snapshot)  # float noise: not an improvement
    best.consider(2.5, 3, snapshot)
    assert (best.loss, best.step, best.bad_evals, len(taken)) == (2.0, 1, 2, 1)
    assert best.patience_exhausted(2) and not best.patience_exhausted(3) and not best.patience_exhausted(None)
    best.consider(1.0, 4, snapshot)
    assert (best.step, best.bad_evals, best.weights["w"].item()) == (4, 0, 2.0)


def test_overfitting_watch_reports_the_gap_and_warns_when_validation_rises_while_training_falls(caplog):
    watch = OverfittingWatch()
    for loss in (2.0, 1.0):
        watch.record(loss)
    assert watch.on_evaluation(1.8, 10, None) == pytest.approx({"train_loss": 1.5, "gap": 0.3})
    assert watch.recent == [] and watch.worsening == 0
    for val, train in ((1.9, 1.2), (2.0, 1.0)):  # validation up, training down, twice
        watch.record(train)
        watch.on_evaluation(val, 20, None)
    assert watch.worsening == 2 and "overfitting" in caplog.text
    watch.record(0.9)
    watch.on_evaluation(1.7, 40, None)  # validation improved: the count restarts
    assert watch.worsening == 0
    assert math.isnan(OverfittingWatch().on_evaluation(1.0, 1, None)["train_loss"])  # nothing logged yet
