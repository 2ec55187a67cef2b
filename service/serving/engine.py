"""The prediction engine: one per API process, and its threads run every forward pass.

Why (measured on a 2-core CPU, issue 7): FastAPI runs the sync predict endpoint on anyio's thread
pool, so successive requests ran torch on different threads, each with its own OpenMP team; with
libgomp a second team anywhere in the process stops every team from spinning between ops, a
spinning team that shares the cores with other work stalls at every barrier, and an eager
forward re-takes the GIL after each of its ~150 ops, so Python work on any other thread (HTTP
parsing, the next request's dependencies) stalls it too. Here request threads only decode and
crop (Pillow releases the GIL) and hand uint8 crops to the engine threads, which own all tensor
math. One at a time takes what is waiting (up to `max_batch` images, waiting at most `window_s`
for more), groups requests whose models share a backbone module (linear probes share one), runs
that backbone once over the group (mirrored copies too, for tta_flip models), then each model's
head; meanwhile the next thread collects. On a CPU the backbone runs traced and frozen (BatchNorm
folded, one call without the GIL), each pass on half the cores: on 2 cores shared with other
work, one intra-op thread served more, and faster, than two, and two such passes at once served
25-55% more images a second than one under concurrent load (docs/benchmarks.md).
"""
from __future__ import annotations

import copy
import logging
import os
import threading
import time
import weakref
from collections import deque
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from service.errors import GraftError
from workers.artifacts import Classifier, LoadedModel, weight_bytes
from workers.backbones import freeze_for_cpu
from workers.preprocessing import normalize
from workers.device import resolve_device

log = logging.getLogger("graft.inference")

GPU_WINDOW_MS = 2.0  # default micro-batch window on a GPU, where 1 or 64 images cost about the same
# Default images per forward. 2-core CPU, frozen Lite0 on one thread: 78 img/s at batch 1, 66-78 at
# 4, 61-69 at 8, and 16 HTTP clients served 39-43 img/s at 8 against 53-62 at 1, 2 or 4.
MAX_BATCH = {"cpu": 2, "cuda": 256}


class EngineStopped(GraftError):
    status, code = 503, "unavailable"
    headers = {"Retry-After": "5"}


@dataclass(eq=False)
class _Request:
    model: LoadedModel
    crops: list[torch.Tensor]  # uint8 [3, H, W] each, CPU
    future: Future
    features: bool = False  # issue 16: the backbone's features (and the mirrors', for tta_flip), not scores


class InferenceEngine:
    """Runs every forward pass of this process on one thread; request threads wait on futures.

    device: "auto" (the first GPU if any), "cpu" or "cuda[:N]". max_batch: images per forward
    (0: MAX_BATCH for the device). window_ms: how long the engine waits for more requests once
    one is waiting (None: 0 on CPU, GPU_WINDOW_MS on GPU).
    torch_threads: intra-op threads of the forward (0: half the cores, at least one; the rest
    decode and serve HTTP). parallel: engine threads, each running its own forwards (0: two on a CPU
    whose passes run on one thread each, so a second batch runs while the first does; else one).
    optimize: trace and freeze CPU backbones (False: the modules run as they are, forward hooks
    included).
    """

    def __init__(self, device: str = "auto", max_batch: int = 0, window_ms: float | None = None,
                 torch_threads: int = 0, decode_threads: int = 0, optimize: bool = True, parallel: int = 0):
        self.device = resolve_device(device)
        self.max_batch = max_batch or MAX_BATCH[self.device.type]
        on_gpu = self.device.type == "cuda"
        self.window_s = (GPU_WINDOW_MS if window_ms is None and on_gpu else window_ms or 0.0) / 1000
        self.threads = torch_threads or default_threads()
        self.optimize = optimize and not on_gpu
        # Two CPU passes where each runs on one thread (a 2-core machine by default): measured
        # there. Wider passes stay one at a time: two OpenMP teams in a process stop libgomp's
        # teams from spinning between ops (above), which was not measured for this. A GPU runs one.
        self.parallel = parallel or (2 if not on_gpu and self.threads == 1 and (os.cpu_count() or 1) >= 2 else 1)
        self.forwards = 0  # backbone forward passes run: tests and benchmarks read it
        self._pending: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._state = "stopped"
        self._starts = 0  # nested lifespans of one app (test clients run their own) share the engine
        self._run = 0  # which start() the engine threads belong to: a restart never doubles them
        self._threads: list[threading.Thread] = []
        # One engine thread at a time collects a batch (and waits out its window), so requests
        # that arrive together still share a forward; the others are running theirs meanwhile.
        self._collecting = threading.Lock()
        self._preparing = threading.Lock()  # one copy of each backbone, whichever thread needs it first
        # id(original backbone) -> {input size: what runs; None = the original itself}; an entry
        # goes when its original is garbage-collected (the model left every cache).
        self._backbones: dict[int, dict[int, nn.Module | None]] = {}
        self._host_copy_bytes: dict[int, int] = {}  # id(original backbone) -> bytes of its CPU copies
        self._heads: dict[int, Classifier] = {}
        self._decode_threads = decode_threads or os.cpu_count() or 2
        self._decoder: ThreadPoolExecutor | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "InferenceEngine":
        with self._cond:
            self._starts += 1
            if self._starts > 1:
                return self
            self._state, self._run = "running", self._run + 1
        self._decoder = ThreadPoolExecutor(self._decode_threads, thread_name_prefix="graft-decode")
        self._threads_before = torch.get_num_threads()
        self._threads = []
        for i in range(self.parallel):
            ready = threading.Event()
            self._threads.append(threading.Thread(target=self._serve, args=(self._run, ready), daemon=True,
                                                  name=f"graft-inference-{i}"))
            self._threads[-1].start()
            ready.wait()
        # Every other thread that starts using torch from now on runs it on one thread (torch
        # sizes a thread's team the first time it runs a parallel op): no second team, e.g. in a
        # request thread loading a model, to throttle the engine's or spin on its cores.
        torch.set_num_threads(1)
        log.info("inference engine on %s: max batch %d, window %.1f ms, %d forward(s) at once on %d "
                 "thread(s) each", self.device, self.max_batch, self.window_s * 1000, self.parallel, self.threads,
                 extra={"action": "inference_start"})
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Refuse new work, fail what is queued (503), let the batch in flight finish (up to
        timeout_s). After nested start()s, the last stop() stops the engine."""
        with self._cond:
            if self._starts == 0:
                return
            self._starts -= 1
            if self._starts:
                return
            self._state = "stopped"
            queued = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for request in queued:
            _fail(request.future, EngineStopped("the server is shutting down; retry on another instance"))
        self._decoder.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:  # daemons: a forward that outlives this does not block exit
            thread.join(max(0.0, deadline - time.monotonic()))
        torch.set_num_threads(self._threads_before)

    # -- what request threads call -------------------------------------------------------------
    def predict_proba(self, model: LoadedModel, items: list, decode=None) -> torch.Tensor:
        """Calibrated probabilities [len(items), classes] on the CPU, as Classifier.predict_proba
        gives them. `decode` maps each item to the model's uint8 [3, H, W] eval crop (several items
        in parallel on the decode threads; its exceptions reach the caller); None: items are crops."""
        return self.predict_scored(model, items, decode)[0]

    def predict_scored(self, model: LoadedModel, items: list, decode=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """predict_proba's probabilities, and the model's out-of-distribution scores [len(items)]
        (workers/ood.py; None for a model that keeps no such score)."""
        crops = items if decode is None else self._decode_all(decode, items)
        return self._wait(self.submit(model, crops))

    def features(self, model: LoadedModel, items: list, decode=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The model's backbone features [len(items), D] of each item's eval crop, and of its mirror when
        the model averages mirrors (tta_flip; else None), float32 on the CPU: what its head reads
        (active-learning suggestions, issue 16). Same threads and batching as predict_proba."""
        crops = items if decode is None else self._decode_all(decode, items)
        return self._wait(self.submit(model, crops, features=True))

    def submit(self, model: LoadedModel, crops: list[torch.Tensor], features: bool = False) -> Future:
        """Queue crops for `model`; the future gets what predict_scored returns (`features`: what
        features() returns)."""
        request = _Request(model, crops, Future(), features)
        with self._cond:
            if self._state != "running":
                raise EngineStopped("the prediction engine is not running")
            self._pending.append(request)
            self._cond.notify()
        return request.future

    def _decode_all(self, decode, items: list) -> list[torch.Tensor]:
        if len(items) < 2 or self._decoder is None:
            return [decode(item) for item in items]
        # One task per decode thread, not one per item: each future costs GIL time (submit, the
        # result's notify, the wake-up), as much as a tenth of a batch image's share.
        size = -(-len(items) // self._decode_threads)
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        try:
            return [crop for crops in self._decoder.map(lambda chunk: [decode(item) for item in chunk], chunks)
                    for crop in crops]
        except (CancelledError, RuntimeError) as exc:  # stop() shut the decode threads down
            if self._state == "running":
                raise
            raise EngineStopped("the server is shutting down; retry on another instance") from exc

    def _wait(self, future: Future) -> tuple[torch.Tensor, torch.Tensor | None]:
        while True:
            try:
                return future.result(timeout=1.0)
            except TimeoutError:
                if future.done():  # the forward itself raised a TimeoutError
                    raise
                # Every future is resolved by the engine thread or by stop(); this covers a thread
                # that died some other way, so a request never hangs.
                if not any(thread.is_alive() for thread in self._threads):
                    _fail(future, EngineStopped("the prediction engine stopped"))

    # -- the engine thread ---------------------------------------------------------------------
    def _serve(self, run: int, ready: threading.Event) -> None:
        # torch sizes a thread's OpenMP team once, lazily, from the process default: fix this
        # thread's now, before start() lowers the default for every other thread.
        torch.get_num_threads()
        torch.set_num_threads(self.threads)
        ready.set()
        if self.device.type == "cuda":
            torch.zeros(1, device=self.device)  # CUDA context now, not in the first request
        while True:
            with self._collecting:
                batch = self._collect(run)
            if batch is None:
                return
            self._run_batch(batch)
            # While the engine waits for the next batch, this one's requests (and the models they
            # hold) must not stay alive: a model the cache evicted is freed now, copies and all.
            del batch

    def _run_batch(self, batch: list[_Request]) -> None:
        groups: dict[tuple, list[_Request]] = {}
        for request in batch:
            pre = request.model.preprocessing
            key = (id(request.model.classifier.features), pre.input_size, pre.mean, pre.std)
            groups.setdefault(key, []).append(request)
        for group in groups.values():
            try:
                self._forward(group)
            except BaseException as exc:  # noqa: BLE001 - each waiting request gets the error, the thread lives on
                log.exception("inference failed", extra={"action": "inference_error"})
                for request in group:
                    _fail(request.future, exc)

    def _collect(self, run: int) -> list[_Request] | None:
        """The next requests to run: all that wait, up to max_batch images, after the window."""
        with self._cond:
            while not self._pending and self._live(run):
                self._cond.wait()
            if not self._live(run):
                return None
            batch = [self._pending.popleft()]
            images = len(batch[0].crops)
            deadline = time.monotonic() + self.window_s
            while images < self.max_batch and self._live(run):
                if self._pending:
                    batch.append(self._pending.popleft())
                    images += len(batch[-1].crops)
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return batch

    def _live(self, run: int) -> bool:
        return self._state == "running" and self._run == run

    @torch.inference_mode()
    def _forward(self, group: list[_Request]) -> None:
        """One backbone pass over every image of the group (and mirrors for tta_flip), then heads."""
        first = group[0].model
        backbone = self._backbone(first.classifier.features, first.preprocessing.input_size)
        # HWC-contiguous crops stacked as NHWC = channels_last NCHW: one copy, no layout change later.
        crops = [c for request in group for c in request.crops]
        u8 = torch.stack([c.permute(1, 2, 0) for c in crops]).permute(0, 3, 1, 2)
        x = normalize(u8.to(self.device, non_blocking=True), first.preprocessing)
        offsets = [0]
        for request in group:
            offsets.append(offsets[-1] + len(request.crops))
        mirrored = [x[offsets[i]:offsets[i + 1]].flip(-1) for i, r in enumerate(group) if r.model.classifier.tta_flip]
        if mirrored:
            x = torch.cat([x, *mirrored]).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            chunks = [backbone(chunk) for chunk in x.split(self.max_batch)]
        with self._cond:
            self.forwards += len(chunks)
        feats = (torch.cat(chunks) if len(chunks) > 1 else chunks[0]).float()
        mirror_at = len(crops)
        for i, request in enumerate(group):
            classifier = self._head(request.model.classifier)
            n = offsets[i + 1] - offsets[i]
            if request.features:  # issue 16: the features themselves (suggestions)
                theirs = feats[mirror_at:mirror_at + n].cpu() if classifier.tta_flip else None
                mirror_at += n if classifier.tta_flip else 0
                request.future.set_result((feats[offsets[i]:offsets[i + 1]].cpu(), theirs))
                continue
            own, own_mirrored = feats[offsets[i]:offsets[i + 1]], None
            logits = classifier.head_logits(own).float()
            mirrored = None
            if classifier.tta_flip:
                own_mirrored = feats[mirror_at:mirror_at + n]
                mirrored = classifier.head_logits(own_mirrored).float()
                mirror_at += n
            served, probs = request.model.classifier.serve(logits, mirrored)
            ood = getattr(classifier, "ood", None)  # issue 17: the model's out-of-distribution score, when it keeps one
            scores = ood.score(served, classifier.temperature, own, own_mirrored).cpu() if ood is not None else None
            request.future.set_result((probs.cpu(), scores))

    def _backbone(self, features: nn.Module, input_size: int) -> nn.Module:
        with self._preparing:
            return self._prepared(features, input_size)

    def _prepared(self, features: nn.Module, input_size: int) -> nn.Module:
        key = id(features)
        if key not in self._backbones:
            self._backbones[key] = {}
            weakref.finalize(features, self._forget, key)
        prepared = self._backbones[key]
        if input_size not in prepared:
            if self.device.type != "cpu":  # a copy: the original may be the process-wide shared backbone
                prepared[input_size] = copy.deepcopy(features).to(self.device, memory_format=torch.channels_last)
            else:  # None (never the original itself: that would keep it alive forever) runs it eagerly
                prepared[input_size] = freeze_for_cpu(features, input_size) if self.optimize else None
                if prepared[input_size] is not None:  # folded weights: about the original's bytes again
                    self._host_copy_bytes[key] = self._host_copy_bytes.get(key, 0) + weight_bytes(features)
        module = prepared[input_size]
        return features if module is None else module

    def _forget(self, key: int) -> None:
        self._backbones.pop(key, None)
        self._host_copy_bytes.pop(key, None)

    def host_copy_bytes(self, features: nn.Module) -> int:
        """Host memory of what the engine prepared from this backbone (a traced and frozen copy on
        a CPU; 0 before its first forward, and on a GPU, whose copies live in device memory)."""
        return self._host_copy_bytes.get(id(features), 0)

    def _head(self, classifier: Classifier) -> Classifier:
        if self.device.type == "cpu":
            return classifier
        key = id(classifier)
        with self._preparing:
            if key not in self._heads:
                # A copy without the backbone (already on the device), for head_logits and serving settings.
                head = copy.deepcopy(classifier, memo={id(classifier.features): nn.Identity()})
                self._heads[key] = head.to(self.device)
                weakref.finalize(classifier, self._heads.pop, key, None)
            return self._heads[key]


def default_threads() -> int:
    """Intra-op threads of the engine's forward: half the cores, the rest decode and serve HTTP."""
    return max(1, (os.cpu_count() or 2) // 2)


def _fail(future: Future, exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except Exception:  # InvalidStateError: already resolved
        pass
