"""The inference engine: one thread runs every forward; concurrent requests for models that share
a backbone share its forward pass, and each still gets exactly its own answer; errors and
shutdown never leave a request hanging."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.serving.engine import EngineStopped, InferenceEngine
from service.store.migrate import upgrade
from service.settings import Settings
from service.store.tables import Model
from tests.support.data import hymenoptera_files, subset_zip
from tests.integration.test_api import assert_problem
from workers.artifacts import Classifier, LoadedModel
from workers.preprocessing import decode_square, eval_crop, normalize
from workers.worker import Worker

JOBS = {  # all at 64 px, so the two probes on the pretrained backbone land in one group
    "probe": {"strategy": "linear_probe", "image_size": 64, "epochs": 2},
    "probe_tta": {"strategy": "linear_probe", "image_size": 64, "epochs": 2, "tta_flip": True,
                  "head": "mlp", "hidden_dim": 16},
    "own": {"strategy": "linear_probe", "image_size": 64, "epochs": 2, "bn_mode": "adabn"},  # its own backbone
}
PHOTOS = [hymenoptera_files("val", label)[i] for i in range(3) for label in ("ants", "bees")]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Three real models trained through the API by an in-process worker, and the client serving them."""
    threads = torch.get_num_threads()
    # CPU serving even where a GPU is: these tests compare answers with the float32 CPU path.
    settings = Settings(data_dir=tmp_path_factory.mktemp("inference") / "data", poll_interval_s=0.1,
                        torch_threads=1, predict_device="cpu")
    settings.ensure_dirs()
    upgrade(settings.database_url)
    with TestClient(create_app(settings)) as client:
        dataset = client.post("/v1/datasets", files={"file": ("bugs.zip", subset_zip(6, 3))}).json()
        jobs = {name: client.post("/v1/jobs", json={"dataset_id": dataset["id"], **job}).json()["id"]
                for name, job in JOBS.items()}
        Worker(settings).run(max_jobs=len(jobs))
        ids = {}
        for name, job_id in jobs.items():
            job = client.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] == "succeeded", job
            ids[name] = job["model_id"]
        yield client, ids
    torch.set_num_threads(threads)


def loaded(client, model_id: str) -> LoadedModel:
    with client.app.state.db.session(readonly=True) as session:
        return client.app.state.model_cache.get(session.get(Model, model_id))


def post(client, model_id: str, paths, top_k: int = 2):
    return client.post(f"/v1/models/{model_id}/predict", params={"top_k": top_k},
                       files=[("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths])


def crops_of(model: LoadedModel, paths) -> list[torch.Tensor]:
    pre = model.preprocessing
    return [eval_crop(decode_square(p.read_bytes(), pre), pre) for p in paths]


def today(model: LoadedModel, paths) -> torch.Tensor:
    """What /predict computed before the engine: the classifier's own predict_proba on the batch."""
    return model.classifier.predict_proba(normalize(torch.stack(crops_of(model, paths)), model.preprocessing))


@pytest.fixture
def swap_engine(served):
    """Serve through an engine built by the test; the app's own comes back afterwards."""
    client, _ = served
    original = client.app.state.inference
    engines = []

    def swap(**kwargs) -> InferenceEngine:
        engine = InferenceEngine("cpu", torch_threads=client.app.state.settings.torch_threads, **kwargs).start()
        engines.append(engine)
        client.app.state.inference = engine
        return engine

    yield swap
    client.app.state.inference = original
    for engine in engines:
        engine.stop()


def assert_same_answer(got: dict, want: dict) -> None:
    """Same file, same labels in the same order, same scores up to float rounding: a forward over
    a batch of another size may sum in another order (3e-6 seen on a 16-core CPU)."""
    assert got["filename"] == want["filename"]
    assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]], (got, want)
    for a, b in zip(got["predictions"], want["predictions"]):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5), (got, want)


class ForwardCounter:
    """Counts forward passes of a module and the batch size of each, from a forward hook."""

    def __init__(self, module: torch.nn.Module, pause_s: float = 0.0):
        self.batches: list[int] = []
        self.pause_s = pause_s
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module, inputs):
        self.batches.append(len(inputs[0]))
        if self.pause_s:
            time.sleep(self.pause_s)

    def remove(self):
        self._handle.remove()


def test_the_models_are_what_the_tests_need(served):
    client, ids = served
    probe, probe_tta, own = (loaded(client, ids[n]) for n in ("probe", "probe_tta", "own"))
    assert probe.classifier.features is probe_tta.classifier.features  # one shared backbone module
    assert own.classifier.features is not probe.classifier.features
    assert probe_tta.classifier.tta_flip and not probe.classifier.tta_flip


@pytest.mark.parametrize("optimize", [False, True])
def test_engine_gives_what_predict_proba_gives(served, optimize):
    client, ids = served
    engine = InferenceEngine("cpu", optimize=optimize).start()
    try:
        for name in JOBS:
            model = loaded(client, ids[name])
            got, expected = engine.predict_proba(model, crops_of(model, PHOTOS)), today(model, PHOTOS)
            # Eager: the same ops, up to the summation order of another thread count (1e-7 here).
            # Traced and frozen: BatchNorm folded into the convs, rounded differently.
            assert (got - expected).abs().max() < (1e-4 if optimize else 1e-6), name
    finally:
        engine.stop()


def test_concurrent_requests_for_shared_and_own_backbones_each_get_their_own_answer(served, swap_engine):
    client, ids = served
    alone = {(name, p.name): post(client, ids[name], [p]).json()["results"][0]
             for name in JOBS for p in PHOTOS}
    # A window makes the concurrent requests share forward passes; answers must not change.
    engine = swap_engine(window_ms=200, max_batch=64)
    start = threading.Barrier(len(alone))

    def one(key):
        start.wait()
        resp = post(client, ids[key[0]], [next(p for p in PHOTOS if p.name == key[1])])
        assert resp.status_code == 200, resp.text
        return key, resp.json()["results"][0]

    with ThreadPoolExecutor(len(alone)) as pool:
        together = dict(pool.map(one, alone))
    assert engine.forwards < len(alone)  # they did share
    for key, answer in together.items():
        assert_same_answer(answer, alone[key])


def test_a_batch_of_images_returns_one_result_per_image_in_upload_order(served):
    client, ids = served
    resp = post(client, ids["probe_tta"], PHOTOS)
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert [r["filename"] for r in results] == [p.name for p in PHOTOS]
    for photo, result in zip(PHOTOS, results):
        assert_same_answer(result, post(client, ids["probe_tta"], [photo]).json()["results"][0])
    probs = torch.tensor([[p["score"] for p in sorted(r["predictions"], key=lambda p: p["label"])] for r in results])
    assert torch.allclose(probs, today(loaded(client, ids["probe_tta"]), PHOTOS), atol=1e-4)


def test_a_corrupt_image_among_good_ones_is_a_422_naming_it_and_the_engine_keeps_serving(served):
    client, ids = served
    good = PHOTOS[0].read_bytes()
    files = [("file", ("fine.jpg", good)), ("file", ("broken.jpg", good[:300])), ("file", ("also-fine.jpg", good))]
    resp = client.post(f"/v1/models/{ids['probe']}/predict", files=files)
    assert_problem(resp, 422, "broken.jpg")
    assert resp.json()["filename"] == "broken.jpg"
    files += [("file", ("later-broken.jpg", b"not an image")), ("file", ("last-fine.jpg", good))]
    first_bad = client.post(f"/v1/models/{ids['probe']}/predict", files=files).json()["filename"]
    assert first_bad == "broken.jpg"  # of two bad files, the first is named
    assert_problem(client.post(f"/v1/models/{ids['probe']}/predict", files={"file": ("empty.jpg", b"")}), 422, "empty")
    assert post(client, ids["probe"], PHOTOS[:2]).status_code == 200


def test_an_error_in_the_forward_reaches_the_caller_and_the_engine_keeps_serving(served):
    client, ids = served
    good = loaded(client, ids["probe"])
    # A head that does not fit the backbone's features: the forward itself raises.
    broken = LoadedModel(Classifier(good.classifier.features, 7, 2).eval(), good.classes, good.preprocessing, {})
    engine = InferenceEngine("cpu").start()
    try:
        with pytest.raises(RuntimeError):
            engine.predict_proba(broken, crops_of(good, PHOTOS[:1]))
        got = engine.predict_proba(good, crops_of(good, PHOTOS[:1]))
        assert torch.allclose(got, today(good, PHOTOS[:1]), atol=1e-4)
    finally:
        engine.stop()


def test_concurrent_requests_share_one_forward_when_a_window_is_set(served):
    client, ids = served
    probe, probe_tta = loaded(client, ids["probe"]), loaded(client, ids["probe_tta"])
    counter = ForwardCounter(probe.classifier.features)  # the shared backbone, run as it is (not traced)
    engine = InferenceEngine("cpu", window_ms=2000, max_batch=64, optimize=False).start()
    requests = [(probe, PHOTOS[:2]), (probe_tta, PHOTOS[2:3]), (probe, PHOTOS[3:4]), (probe_tta, PHOTOS[4:6])]
    start = threading.Barrier(len(requests))

    def one(request):
        model, paths = request
        crops = crops_of(model, paths)
        start.wait()
        return engine.predict_proba(model, crops)

    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(one, requests))
    finally:
        engine.stop()
        counter.remove()
    images = sum(len(paths) * (2 if model.classifier.tta_flip else 1) for model, paths in requests)
    assert counter.batches == [images] and engine.forwards == 1  # one backbone pass, mirrors included
    for (model, paths), got in zip(requests, answers):
        assert torch.allclose(got, today(model, paths), atol=1e-5)


def test_without_a_window_requests_that_arrive_during_a_forward_share_the_next_one(served):
    client, ids = served
    probe = loaded(client, ids["probe"])
    counter = ForwardCounter(probe.classifier.features, pause_s=0.5)
    # One forward at a time: with a second engine thread free, the next request would not wait.
    engine = InferenceEngine("cpu", window_ms=0, max_batch=64, optimize=False, parallel=1).start()
    crops = crops_of(probe, PHOTOS[:1])
    try:
        first = engine.submit(probe, crops)
        while not counter.batches:  # the first forward is running (and pausing)
            time.sleep(0.01)
        rest = [engine.submit(probe, crops) for _ in range(3)]
        results = [f.result(timeout=30)[0] for f in (first, *rest)]  # (probabilities, OOD scores)
    finally:
        engine.stop()
        counter.remove()
    assert counter.batches == [1, 3]
    assert all(torch.equal(r, results[0]) for r in results[1:])


def test_on_a_cpu_a_second_forward_runs_while_the_first_does(served):
    """Two engine threads by default on a CPU: a request that arrives during a long forward is
    answered before that forward ends, and both answers are right."""
    client, ids = served
    probe, own = loaded(client, ids["probe"]), loaded(client, ids["own"])
    slow = ForwardCounter(probe.classifier.features, pause_s=1.5)
    engine = InferenceEngine("cpu", optimize=False, torch_threads=1).start()
    assert engine.parallel == 2  # two one-thread passes fit any machine of 2 cores or more
    try:
        first = engine.submit(probe, crops_of(probe, PHOTOS[:1]))
        while not slow.batches:  # the first forward is running (and pausing)
            time.sleep(0.01)
        second = engine.submit(own, crops_of(own, PHOTOS[1:2]))
        assert torch.allclose(second.result(timeout=30)[0], today(own, PHOTOS[1:2]), atol=1e-5)
        assert not first.done(), "the second answer came while the first forward still ran"
        assert torch.allclose(first.result(timeout=30)[0], today(probe, PHOTOS[:1]), atol=1e-5)
    finally:
        engine.stop()
        slow.remove()


def test_stopping_with_requests_in_flight_and_queued_does_not_hang(served):
    client, ids = served
    probe = loaded(client, ids["probe"])
    counter = ForwardCounter(probe.classifier.features, pause_s=0.5)
    engine = InferenceEngine("cpu", max_batch=1, optimize=False).start()
    crops = crops_of(probe, PHOTOS[:1])
    outcomes = []

    def one():
        try:
            outcomes.append(engine.predict_proba(probe, crops))
        except EngineStopped as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        while not counter.batches:  # one forward in flight, three requests queued behind it
            time.sleep(0.01)
        started = time.monotonic()
        engine.stop(timeout_s=10)
        for t in threads:
            t.join(10)
        assert time.monotonic() - started < 5
    finally:
        counter.remove()
    assert not any(t.is_alive() for t in threads)
    assert len(outcomes) == 4
    assert sum(isinstance(o, torch.Tensor) for o in outcomes) >= 1  # the one in flight finished
    assert any(isinstance(o, EngineStopped) for o in outcomes)  # the queued ones were told, not dropped
    with pytest.raises(EngineStopped):
        engine.submit(probe, crops)


def test_a_stopped_engine_answers_503_problem_json(served, swap_engine):
    client, ids = served
    swap_engine().stop()
    resp = post(client, ids["probe"], PHOTOS[:1])
    assert_problem(resp, 503, "not running")
    assert resp.headers["retry-after"]


def test_a_nested_lifespan_leaves_the_engine_running_and_a_stopped_engine_restarts(served):
    client, ids = served
    with TestClient(client.app) as inner:  # e.g. schemathesis' client inside a test client's lifespan
        assert post(inner, ids["probe"], PHOTOS[:1]).status_code == 200
    assert post(client, ids["probe"], PHOTOS[:1]).status_code == 200
    probe = loaded(client, ids["probe"])
    engine = InferenceEngine("cpu").start()
    engine.stop()
    engine.start()
    try:
        got = engine.predict_proba(probe, crops_of(probe, PHOTOS[:1]))
        assert torch.allclose(got, today(probe, PHOTOS[:1]), atol=1e-4)
    finally:
        engine.stop()
    with pytest.raises(EngineStopped):
        engine.submit(probe, crops_of(probe, PHOTOS[:1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_predictions_match_the_cpu_ones(served):
    client, ids = served
    engine = InferenceEngine("cuda").start()
    try:
        for name in JOBS:
            model = loaded(client, ids[name])
            got = engine.predict_proba(model, crops_of(model, PHOTOS))
            assert got.device.type == "cpu"
            assert (got - today(model, PHOTOS)).abs().max() < 2e-2, name  # bf16 autocast
            assert next(model.classifier.parameters()).device.type == "cpu"  # the cached model stays put
    finally:
        engine.stop()
