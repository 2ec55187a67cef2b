"""What a job shows while it runs: one shape for the progress of every phase, and which updates
become the job's events. Plain Python (no torch): the worker, the training code and tests use it.

The shape. Code that does a job's work reports through `Control.progress(update)`; an update
about a phase carries (`phase_update` builds one, `PhaseMeter` reports a loop's work in it):

    phase      its name, what a person reads: "decoding images", "extracting features",
               "caching activations", "pooling features", "adapting batchnorm statistics",
               "training", "auto search: ...", "auto refit", "scoring the test split"
    unit       what `done` and `total` count: "images" (decoded, through the backbone, trained
               on, scored), "folds", "candidates", "epochs", "fits"
    done       how many are done (0 when the phase starts)
    total      how many the phase has; None while unknown
    backbone   optional: the backbone the phase runs on, for a job that runs several. It is
               context: it stays until an update names another. A (phase, backbone) pair is
               one phase, with a bar of its own.
    candidate  optional (auto): the recipe being tried now (a dict, as auto's `_describe` gives it)
    finished   optional (auto): candidates just scored, each {"recipe", "val_accuracy",
               "val_loss", "scored_on", "images", "seconds"}; they join the leaderboard and are
               not kept in the phase
    ...        any other small, JSON-able fields of the phase (epoch, epochs, step, steps,
               train_loss, val_loss, val_accuracy, lr, fold, folds, auto_choice, ...)

An update without `phase` adds to the current one. An update with another phase starts that
phase (its fields replace the last phase's); coming back to a phase seen before continues it
(its fields, clock and bar), unless its `done` went down, which restarts its clock.

The job's progress (`ProgressTracker.progress`, stored as the job's `progress`) is the current
phase's fields, plus:

    rate       units per second in this phase, since it started (None until it can tell)
    eta_s      seconds left in this phase at that rate (None without a total or a rate)
    elapsed_s  seconds in this phase
    phases     every phase so far, in the order first seen: {"phase", "backbone", "unit", "done",
               "total", "seconds"} (the current one is the one `phase` and `backbone` name)
    leaderboard  auto's finished candidates, best first (accuracy, then loss)
    seq        counts the updates: of two copies of a job's progress, the larger seq is newer

Events (GET /v1/jobs/{id}/events), bounded per phase whatever the loop's length:

    progress   a phase's update as above, with rate, eta_s, elapsed_s and seq (no phases or
               leaderboard): when the phase starts or is come back to, each tenth of its total
               (at most one per EVENT_GAP_S), when `done` reaches `total`, and its last state
               when the next phase starts: at most 12 per visit of a phase
    epoch      an epoch's end (an update with `epoch` and `val_accuracy`): its metrics
    candidate  each finished candidate (auto): its entry, `rank` among those finished so far
               and `of` how many that is
"""
from __future__ import annotations

import time
from typing import Callable, Protocol

# Keys of the job's progress that belong to the job, not to its current phase.
JOB_KEYS = ("phases", "leaderboard", "seq")
CONTEXT_KEYS = ("backbone",)  # phase context that stays until changed
DERIVED_KEYS = ("rate", "eta_s", "elapsed_s")
EPOCH_KEYS = ("epoch", "epochs", "train_loss", "val_loss", "val_accuracy")
EVENT_TENTHS = 10
EVENT_GAP_S = 0.5
# A PhaseMeter reports at least this often while work goes on, or every REPORT_FRACTION of the total.
REPORT_EVERY_S = 0.5
REPORT_FRACTION = 0.02


class Reports(Protocol):
    def progress(self, update: dict) -> None: ...


def phase_update(phase: str, done: int | None = None, total: int | None = None, unit: str | None = None,
                 **fields) -> dict:
    """One update in the shape above."""
    update = {"phase": phase, "unit": unit, "done": done, "total": total, **fields}
    return {k: v for k, v in update.items() if v is not None or k == "total"}


class PhaseMeter:
    """Counts a phase's work and reports it through a control: when it starts, then at least every
    REPORT_EVERY_S or REPORT_FRACTION of the total while `advance` is called, and when done reaches
    the total. `grow` adds work found later (a mirror pass asked for after the first)."""

    def __init__(self, control: Reports, phase: str, total: int | None, unit: str, done: int = 0,
                 clock: Callable[[], float] = time.monotonic, **fields):
        self.control, self.phase, self.total, self.unit, self.done = control, phase, total, unit, done
        self.fields, self.clock = fields, clock
        self._last_at, self._last_done = clock(), done
        self.report()

    def advance(self, n: int = 1, **fields) -> None:
        """`n` more units done; `fields` (e.g. epoch, step) join this and later reports."""
        self.done += n
        self.fields.update(fields)
        now = self.clock()
        finished = self.total is not None and self.done >= self.total
        step = self.total is not None and self.done - self._last_done >= self.total * REPORT_FRACTION
        if finished or step or now - self._last_at >= REPORT_EVERY_S:
            self.report()

    def grow(self, n: int) -> None:
        """`n` more units of work found (a mirror pass asked for after the others)."""
        self.total = (self.total or 0) + n

    def report(self, n: int = 0, **fields) -> None:
        """`n` more units done, reported now with `fields` for this report only (an epoch's
        metrics, which the tracker makes an epoch event of)."""
        self.done += n
        self._last_at, self._last_done = self.clock(), self.done
        self.control.progress(phase_update(self.phase, self.done, self.total, self.unit, **{**self.fields, **fields}))

    def __call__(self, n: int) -> None:  # a meter is a callback: on_batch=meter
        self.advance(n)


class _Visit:
    """One phase as the tracker follows it: its clock, and what its events have said."""

    def __init__(self, key: tuple, now: float, done: int | None):
        self.key = key
        self.started, self.start_done = now, done or 0  # the rate's origin
        self.entered, self.seconds_before = now, 0.0  # time in this visit; in earlier visits
        self.done: int | None = done
        self.tenths_logged = 0
        self.finished_logged = False
        self.last_event_at: float | None = None
        self.logged: dict | None = None  # the state its last event carried (or its last state, once left)
        self.fields: dict = {}  # its fields when last left: coming back starts from them

    def restart(self, now: float, done: int) -> None:
        self.started, self.start_done, self.entered, self.seconds_before = now, done, now, 0.0
        self.tenths_logged, self.finished_logged = 0, False

    def seconds(self, now: float, current: bool) -> float:
        return self.seconds_before + (now - self.entered if current else 0.0)


class ProgressTracker:
    """Folds a job's progress updates into its progress (`progress`) and says which become events
    (the shape and the rules: this module's docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, **context):
        """`context`: e.g. the job's backbone, which its phases run on until an update names another."""
        self.clock = clock
        self._phase: dict = {}  # the current phase's fields
        self._context: dict = {k: v for k, v in context.items() if k in CONTEXT_KEYS}
        self._visits: dict[tuple, _Visit] = {}  # by (phase, backbone), in the order first seen
        self._current: _Visit | None = None
        self._leaderboard: list[dict] = []
        self._seq = 0

    @property
    def progress(self) -> dict:
        now = self.clock()
        out = {**self._phase, **self._derived(now)}
        if self._visits:
            out["phases"] = [self._summary(v, now) for v in self._visits.values()]
        if self._leaderboard:
            out["leaderboard"] = [dict(e) for e in self._leaderboard]
        out["seq"] = self._seq
        return out

    def update(self, update: dict) -> list[dict]:
        """Fold one update in; returns the events it makes, each a dict with its "kind"."""
        now = self.clock()
        self._seq += 1
        update = {k: v for k, v in update.items() if k not in JOB_KEYS and k not in DERIVED_KEYS}
        finished = update.pop("finished", None) or []
        events: list[dict] = []
        for key in CONTEXT_KEYS:
            if key in update:
                self._context[key] = update[key]
        new_phase = "phase" in update and (self._current is None or self._key(update) != self._current.key)
        if new_phase:
            events += self._leave(now)
            key = self._key(update)
            before = self._visits[key].fields if key in self._visits else {}
            self._phase = {**before, **{k: v for k, v in self._context.items() if v is not None}, **update}
            self._enter(key, now)
        else:
            self._phase.update(update)
        if self._current is not None:
            events += self._phase_events(self._current, now, new_phase)
        if "epoch" in update and "val_accuracy" in update:
            events.append({"kind": "epoch", **{k: update[k] for k in EPOCH_KEYS if k in update}})
        events += [{"kind": "candidate", **self._rank(entry)} for entry in finished]
        return events

    # -- phases ----------------------------------------------------------------------------------

    def _key(self, update: dict) -> tuple:
        return (update["phase"], update.get("backbone", self._context.get("backbone")))

    def _enter(self, key: tuple, now: float) -> None:
        visit = self._visits.get(key)
        if visit is None:
            visit = self._visits[key] = _Visit(key, now, self._phase.get("done"))
        visit.entered, visit.finished_logged = now, False
        self._current = visit

    def _leave(self, now: float) -> list[dict]:
        """Leave the current phase: its last state is an event unless its last event said it."""
        visit = self._current
        if visit is None:
            return []
        state = self._event_state(now)
        visit.fields = dict(self._phase)
        visit.seconds_before += now - visit.entered
        self._current = None
        said = visit.logged is not None and _same(visit.logged, state)
        visit.logged = state
        return [] if said else [{"kind": "progress", **state}]

    def _phase_events(self, visit: _Visit, now: float, new_phase: bool) -> list[dict]:
        done, total = self._phase.get("done"), self._phase.get("total")
        if done is not None and visit.done is not None and done < visit.done:
            visit.restart(now, done)  # it started over (the next candidate's training)
        visit.done = done
        log = new_phase
        if done is not None and total:
            tenths = min(EVENT_TENTHS, int(EVENT_TENTHS * done / total))
            if done >= total and not visit.finished_logged:
                log = visit.finished_logged = True
            elif tenths > visit.tenths_logged and (visit.last_event_at is None
                                                   or now - visit.last_event_at >= EVENT_GAP_S):
                log = True
            if log:
                visit.tenths_logged = max(visit.tenths_logged, tenths)
        if not log:
            return []
        visit.last_event_at = now
        visit.logged = self._event_state(now)
        return [{"kind": "progress", **visit.logged}]

    def _event_state(self, now: float) -> dict:
        return {**self._phase, **self._derived(now), "seq": self._seq}

    def _derived(self, now: float) -> dict:
        """rate, eta_s and elapsed_s of the current phase."""
        visit = self._current
        if visit is None:
            return {}
        done, total = self._phase.get("done"), self._phase.get("total")
        rate = eta = None
        if done is not None and now > visit.started and done > visit.start_done:
            per_s = (done - visit.start_done) / (now - visit.started)
            rate = _round(per_s)
            eta = round(max(0, total - done) / per_s, 1) if total is not None else None
        return {"rate": rate, "eta_s": eta, "elapsed_s": round(visit.seconds(now, True), 2)}

    def _summary(self, visit: _Visit, now: float) -> dict:
        current = visit is self._current
        state = self._phase if current else (visit.logged or {})
        phase, backbone = visit.key
        return {"phase": phase, "backbone": backbone, "unit": state.get("unit"), "done": state.get("done"),
                "total": state.get("total"), "seconds": round(visit.seconds(now, current), 2)}

    # -- auto's leaderboard ------------------------------------------------------------------------

    def _rank(self, entry: dict) -> dict:
        mine = dict(entry)
        self._leaderboard.append(mine)
        self._leaderboard.sort(key=lambda e: (-(e.get("val_accuracy") or 0.0), e.get("val_loss") or 0.0))
        rank = next(i for i, e in enumerate(self._leaderboard, start=1) if e is mine)
        return {**entry, "rank": rank, "of": len(self._leaderboard)}


def _same(a: dict, b: dict) -> bool:
    """Two states alike but for the clock."""
    return ({k: v for k, v in a.items() if k not in DERIVED_KEYS and k != "seq"}
            == {k: v for k, v in b.items() if k not in DERIVED_KEYS and k != "seq"})


def _round(x: float) -> float:
    """Three significant digits: what a person reads of a rate."""
    return float(f"{x:.3g}")
