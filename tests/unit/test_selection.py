"""auto's selection: folds, the selection-corrected estimate, the logistic head, and what trains."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from tests.support.training import SPEC, Recorder, one_thread, tiny_data  # noqa: F401
from workers.artifacts import Classifier
from workers.backbones import get_backbone
from workers.config import TrainConfig
from workers.training import auto, logistic, selection, train

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


# --- folds ----------------------------------------------------------------------------------------

def test_folds_are_stratified_and_the_same_for_the_same_seed():
    y = torch.tensor([0] * 23 + [1] * 7 + [2] * 11)
    k = selection.fold_count(y)
    assert k == 5
    folds = selection.stratified_folds(y, k, seed=3)
    for c in range(3):  # each class spread evenly: fold counts differ by at most one
        counts = torch.bincount(folds[y == c], minlength=k)
        assert int(counts.max() - counts.min()) <= 1
    sizes = torch.bincount(folds, minlength=k)
    assert int(sizes.max() - sizes.min()) <= 1
    assert torch.equal(folds, selection.stratified_folds(y, k, seed=3))
    assert not torch.equal(folds, selection.stratified_folds(y, k, seed=4))


def test_fold_count_is_limited_by_the_smallest_class_and_never_below_two():
    assert selection.fold_count(torch.tensor([0] * 50 + [1] * 3)) == 3
    assert selection.fold_count(torch.tensor([0] * 50 + [1])) == 2
    assert selection.fold_count(torch.tensor([0] * 50 + [1] * 50)) == 5


# --- the estimate -----------------------------------------------------------------------------------

def _logits_from_correctness(correct: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
    pred = torch.where(correct, y, (y + 1) % classes)
    return torch.nn.functional.one_hot(pred, classes).float() * 4


def test_the_95_interval_covers_the_chosen_candidates_true_accuracy():
    """Simulated datasets of 150 images, five candidates of known accuracy (0.80-0.86): the
    candidate picked on each draw has a known true accuracy, which the interval must cover in
    about 95% of the draws; and the estimate is less optimistic than the winner's own score."""
    truth = torch.tensor([0.80, 0.83, 0.85, 0.86, 0.84])
    gen = torch.Generator().manual_seed(0)
    covered, optimism_raw, optimism_bbc, draws = 0, 0.0, 0.0, 100
    for draw in range(draws):
        y = torch.randint(3, (150,), generator=gen)
        correct = torch.rand(len(truth), 150, generator=gen) < truth[:, None]
        logits = [_logits_from_correctness(c, y, 3) for c in correct]
        chosen = selection.select(logits, y)
        est = selection.bbc_estimate(logits, y, seed=draw)
        lo, hi = est["ci95"]
        covered += lo <= float(truth[chosen]) <= hi
        optimism_raw += selection.score(logits[chosen], y)[0] - float(truth[chosen])
        optimism_bbc += est["accuracy"] - float(truth[chosen])
    assert covered / draws >= 0.88
    assert abs(optimism_bbc) < optimism_raw  # the raw winner's score is biased up; BBC much less


# --- the logistic head ------------------------------------------------------------------------------

@pytest.mark.parametrize("classes", [2, 4])
def test_the_logistic_head_in_torch_predicts_what_scikit_learn_predicts(classes):
    gen = torch.Generator().manual_seed(classes)
    x = torch.randn(120, 16, generator=gen) * 3 + 5  # unstandardized: the folding must undo it
    y = torch.arange(120) % classes
    x[torch.arange(120), y] += 2.0
    fit = logistic.fit_logistic(x, y, classes, c=0.3)
    classifier = Classifier(torch.nn.Identity(), 16, classes)
    fit.load_into(classifier.head)
    mean, std = x.double().mean(0), x.double().std(0, unbiased=False)
    reference = LogisticRegression(C=0.3, max_iter=500, tol=logistic.TOL).fit(((x.double() - mean) / std).numpy(),
                                                                              y.numpy())
    probe = torch.randn(300, 16, generator=gen) * 3 + 5
    expected = reference.predict_proba(((probe.double() - mean) / std).numpy())
    with torch.no_grad():
        ours = torch.softmax(classifier.head_logits(probe).double(), 1).numpy()
    assert (ours.argmax(1) == expected.argmax(1)).all()
    assert np.abs(ours - expected).max() < 1e-4


# --- auto on Graft's own split: cross-validate, then refit on everything ----------------------------

@pytest.fixture(scope="module")
def unsplit():
    """A dozen photos plus six Graft held out itself, and a test split that must never be read."""
    data = tiny_data()
    poison = torch.full((4, *data.train_x.shape[1:]), 255, dtype=torch.uint8)
    return dataclasses.replace(data, val_given=False, test_x=poison, test_y=torch.tensor([0, 1, 0, 1]))


def test_auto_cross_validates_on_every_labeled_image_and_refits_on_all_of_them(unsplit, monkeypatch):
    fitted_rows: list[int] = []
    selected_on: list[int] = []
    real_path, real_select = logistic.LogisticPath.__init__, selection.select

    def counting_path(self, x, y, *a, **kw):
        fitted_rows.append(len(y))
        real_path(self, x, y, *a, **kw)

    def recording_select(logits, y):
        selected_on.append(len(y))
        return real_select(logits, y)

    monkeypatch.setattr(logistic.LogisticPath, "__init__", counting_path)
    monkeypatch.setattr(selection, "select", recording_select)
    monkeypatch.setattr(auto, "plan_top", lambda *args: None)  # heads only
    monkeypatch.setattr(auto, "plan_fine_tuning", lambda *args, **kwargs: [])
    config = TrainConfig(image_size=64, seed=7, time_budget_s=10)
    result = train(config, unsplit, SPEC.build_features(pretrained=True), SPEC.feature_dim, Recorder(), CPU)
    labeled = len(unsplit.train_y) + len(unsplit.val_y)
    k = selection.fold_count(torch.cat([unsplit.train_y, unsplit.val_y]))
    # k folds, each fitted on the other folds' images and their mirrors; then the refit on all
    assert fitted_rows[-1] == 2 * labeled and len(fitted_rows) == k + 1
    assert sum(fitted_rows[:-1]) == 2 * labeled * (k - 1)
    assert selected_on == [labeled]  # the selector saw the labeled images, never the test split
    m = result.metrics
    assert m["trained_on"] == {"images": labeled, "splits": ["train", "val"]}
    assert m["estimate"]["folds"] == k and m["val_accuracy"] == m["estimate"]["accuracy"]
    lo, hi = m["estimate"]["ci95"]
    assert lo <= m["val_accuracy"] <= hi
    assert m["num_val_images"] == labeled  # per-class metrics from every image's out-of-fold prediction
    assert sum(sum(row) for row in m["confusion_matrix"]["matrix"]) == labeled
    assert result.classifier.temperature == pytest.approx(m["calibration"]["temperature"], abs=1e-6)
    assert result.recipe["solver"] == "lbfgs" and result.recipe["logistic_c"] in logistic.C_GRID

    # The model is the chosen recipe, run explicitly on all the labeled images.
    everything = dataclasses.replace(unsplit, train_x=torch.cat([unsplit.train_x, unsplit.val_x]),
                                     train_y=torch.cat([unsplit.train_y, unsplit.val_y]), val_given=True)
    again = train(TrainConfig.model_validate(result.recipe), everything, SPEC.build_features(pretrained=True),
                  SPEC.feature_dim, Recorder(), CPU)
    assert torch.allclose(again.classifier.head.weight, result.classifier.head.weight, atol=1e-4)
    assert torch.allclose(again.classifier.head.bias, result.classifier.head.bias, atol=1e-4)


# --- choosing the backbone ------------------------------------------------------------------------

def _with_other_backbones(data, calls: list[str]):
    """`data` with the worker's hook: the same photos decoded for another backbone (at 64 px)."""
    def at_backbone(name):
        calls.append(name)
        spec = get_backbone(name)
        again = tiny_data(pre=spec.preprocessing.at_size(64))
        test_x = None if data.test_x is None else torch.full((len(data.test_x), *again.train_x.shape[1:]), 255,
                                                             dtype=torch.uint8)
        again = dataclasses.replace(again, val_given=data.val_given, test_x=test_x, test_y=data.test_y)
        return again, spec.build_features(pretrained=True)
    return dataclasses.replace(data, at_backbone=at_backbone)


def _best_entry(report):
    return max(report["candidates"], key=lambda e: (e["val_accuracy"], -e["val_loss"]))


@pytest.mark.parametrize("val_given", [False, True])
def test_auto_chooses_the_backbone_among_the_lites_when_the_job_leaves_it(unsplit, val_given):
    calls: list[str] = []
    data = _with_other_backbones(dataclasses.replace(unsplit, val_given=val_given), calls)
    result = train(TrainConfig(image_size=64, seed=7, time_budget_s=120), data, SPEC.build_features(pretrained=True),
                   SPEC.feature_dim, Recorder(), CPU)
    report = result.metrics["auto"]
    chosen = result.recipe["backbone"]
    # Each other Lite decoded once for the search, and the chosen one again for the test split.
    assert calls == ["efficientnet_lite1", "efficientnet_lite2"] + ([chosen] if chosen != SPEC.name else [])
    assert result.metrics["num_test_images"] == len(unsplit.test_y)
    tried = {e["recipe"]["backbone"] for e in report["candidates"]}
    assert tried == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    labeled = len(unsplit.train_y) + (0 if val_given else len(unsplit.val_y))
    scored_on = len(unsplit.val_y) if val_given else labeled
    assert {e["images"] for e in report["candidates"]} == {scored_on}  # every backbone on the same images
    assert _best_entry(report)["recipe"]["backbone"] == chosen
    # The model is that backbone's network and expects its preprocessing.
    n_params = sum(p.numel() for p in result.classifier.features.parameters())
    assert n_params == sum(p.numel() for p in get_backbone(chosen).build_features(pretrained=False).parameters())
    expected = get_backbone(chosen).preprocessing.at_size(64)
    assert (result.preprocessing or unsplit.preprocessing) == expected


def test_a_backbone_the_job_names_is_kept_and_a_small_budget_keeps_the_default(unsplit):
    calls: list[str] = []
    data = _with_other_backbones(unsplit, calls)
    named = train(TrainConfig(backbone="efficientnet_lite0", image_size=64, seed=7, time_budget_s=120), data,
                  SPEC.build_features(pretrained=True), SPEC.feature_dim, Recorder(), CPU)
    assert calls == [] and {e["recipe"]["backbone"] for e in named.metrics["auto"]["candidates"]} == {SPEC.name}
    small = train(TrainConfig(image_size=64, seed=7, time_budget_s=10), data, SPEC.build_features(pretrained=True),
                  SPEC.feature_dim, Recorder(), CPU)
    skipped = small.metrics["auto"]["skipped_for_time"]
    assert calls == [] and [s["backbone"] for s in skipped] == ["efficientnet_lite1", "efficientnet_lite2"]
    assert small.recipe["backbone"] == SPEC.name and small.preprocessing is None


def test_a_repeat_job_reuses_the_tops_activations_and_folds_and_gives_the_same_model(unsplit, monkeypatch):
    from workers.training import top
    from workers.training.probe import REUSED_FEATURES

    REUSED_FEATURES.clear()
    data = dataclasses.replace(unsplit, source_key="repeat-test", test_x=None, test_y=None)
    computed, fitted = [], []
    real_compute, real_fit = top.StageActivations.compute.__func__, top.fit_top
    monkeypatch.setattr(top.StageActivations, "compute",
                        classmethod(lambda cls, *a, **kw: computed.append(1) or real_compute(cls, *a, **kw)))
    monkeypatch.setattr(top, "fit_top", lambda *a, **kw: fitted.append(1) or real_fit(*a, **kw))
    monkeypatch.setattr(auto, "plan_fine_tuning", lambda *args, **kwargs: [])
    config = TrainConfig(backbone="efficientnet_lite0", image_size=64, seed=7, time_budget_s=60)
    runs = []
    for _ in range(2):
        computed.clear(), fitted.clear()
        runs.append(train(config, data, SPEC.build_features(pretrained=True), SPEC.feature_dim, Recorder(), CPU))
        runs[-1].calls = (len(computed), len(fitted))
    k = runs[0].metrics["estimate"]["folds"]
    assert any(e["recipe"]["strategy"] == "fine_tune_top" for e in runs[0].metrics["auto"]["candidates"])
    refits = int(runs[0].recipe["strategy"] == "fine_tune_top")
    assert runs[0].calls == (1, k + refits)
    assert runs[1].calls == (0, 0)  # the bottom pass, the folds and the refit came from the first job
    assert runs[1].metrics["auto"]["candidates"] == [{**e, "seconds": e2["seconds"]} for e, e2 in
                                                     zip(runs[0].metrics["auto"]["candidates"],
                                                         runs[1].metrics["auto"]["candidates"])]
    for a, b in zip(runs[0].classifier.state_dict().values(), runs[1].classifier.state_dict().values()):
        assert torch.equal(a, b)
    # A relabeled image: the same pixels (activations reused), but the folds and the refit train again.
    relabeled = data.train_y.clone()
    relabeled[0] = (relabeled[0] + 1) % len(data.classes)
    computed.clear(), fitted.clear()
    train(config, dataclasses.replace(data, train_y=relabeled), SPEC.build_features(pretrained=True),
          SPEC.feature_dim, Recorder(), CPU)
    assert len(computed) == 0 and len(fitted) >= k
    REUSED_FEATURES.clear()


def test_the_top_is_cross_validated_over_fewer_folds_when_k_do_not_fit(unsplit, monkeypatch):
    """The budget fits fine_tune_top's refit and TOP_MIN_FOLDS folds but not the heads' k: the top
    is scored out of fold over 3 folds (every image once), the heads over k, and the report says so."""
    from workers.training import top

    fitted = []
    real_plan, real_fit = auto.plan_top, top.fit_top
    monkeypatch.setattr(auto, "plan_top", lambda c, n, folds, *a: real_plan(c, n, folds, *a) if folds <= 3 else None)
    monkeypatch.setattr(top, "fit_top", lambda *a, **kw: fitted.append(len(a[5])) or real_fit(*a, **kw))
    monkeypatch.setattr(auto, "plan_fine_tuning", lambda *args, **kwargs: [])
    data = dataclasses.replace(unsplit, test_x=None, test_y=None)
    result = train(TrainConfig(backbone="efficientnet_lite0", image_size=64, seed=7, time_budget_s=60), data,
                   SPEC.build_features(pretrained=True), SPEC.feature_dim, Recorder(), CPU)
    k, n = result.metrics["estimate"]["folds"], len(data.train_y) + len(data.val_y)
    assert k > 3
    top_entries = [e for e in result.metrics["auto"]["candidates"] if e["recipe"]["strategy"] == "fine_tune_top"]
    assert len(top_entries) == 1 and top_entries[0]["images"] == n  # out of fold on every image
    folds = fitted[:3]
    assert len(folds) == 3 and sum(n - f for f in folds) == n  # 3 folds, each image held out once
    assert "3 folds for fine_tune_top" in result.metrics["auto"]["selected_on"]


def test_a_top_of_network_winner_says_unknown_by_its_folds_own_features(unsplit, monkeypatch):
    """Issue 17: a fine_tune_top model keeps the "cosine" score. Its threshold comes from the
    held-out images' scores, each computed by the fold's model that never trained on that image; its
    stored centre and class means are the final network's features, as /predict computes them."""
    from workers.ood import cosine_parameters, pass_threshold
    from workers.preprocessing import eval_crop, normalize

    monkeypatch.setattr(selection, "select", lambda logits, y: len(logits) - 1)  # the top: scored last
    monkeypatch.setattr(auto, "plan_fine_tuning", lambda *args, **kwargs: [])
    data = dataclasses.replace(unsplit, test_x=None, test_y=None)
    result = train(TrainConfig(backbone="efficientnet_lite0", image_size=64, seed=7, time_budget_s=60), data,
                   SPEC.build_features(pretrained=True), SPEC.feature_dim, Recorder(), CPU)
    assert result.recipe["strategy"] == "fine_tune_top"
    ood, held = result.classifier.ood, result.held_out
    assert ood.kind == "cosine" and ood.details["scored_by"] == "each fold's own model"
    assert ood.details["fitted_on"] == "out of fold predictions" and ood.details["images"] == len(held.y)
    assert ood.threshold == pytest.approx(pass_threshold(held.feature_scores))
    # The fold models' scores are not the final model's own view of images it trained on.
    final = cosine_parameters(held.features, held.y, list(range(len(data.classes))))
    assert torch.allclose(ood.center, final["center"], atol=1e-5) and torch.allclose(ood.means, final["means"],
                                                                                      atol=1e-5)
    # What /predict computes (the network's own forward and its mirror's, then the score) is the
    # score of those features, up to the cache's fp16 activations.
    x = normalize(eval_crop(torch.cat([data.train_x, data.val_x])[:6], data.preprocessing), data.preprocessing)
    c = result.classifier.eval()
    with torch.no_grad():
        served = ood.score(None, 1.0, c.features(x), c.features(x.flip(-1)))
    assert torch.allclose(served, ood.score(None, 1.0, held.features[:6]), atol=2e-3)
