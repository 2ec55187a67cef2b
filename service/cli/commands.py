"""Commands that use a running Graft over HTTP (GRAFT_URL, GRAFT_API_KEY). They import no torch
and no server code, so they start fast on any machine."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from service.cli.base import JsonOpt, app, datasets_app, err, jobs_app, models_app, out
from service.cli.job_options import with_job_options
from service.client import GraftClient
from service.enums import ExportFormat, JobStatus


def _client(ctx: typer.Context) -> GraftClient:
    obj = ctx.find_root().obj or {}
    return GraftClient(obj.get("url"), obj.get("api_key"))


def _answer(ctx: typer.Context, ask: Callable[[GraftClient], Any], as_json: bool,
            show: Callable[[Any], None]) -> None:
    """Ask the API, then print its JSON answer (--json) or show it to a person."""
    with _client(ctx) as client:
        answer = ask(client)
    if as_json:
        return _print_json(answer)
    show(answer)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))  # plain print: exact JSON, no rich wrapping or markup


@datasets_app.command("upload")
def datasets_upload(ctx: typer.Context,
                    path: Annotated[Path, typer.Argument(exists=True, help="a folder of <label>/<image> or "
                                                         "train|val/<label>/<image>, or a zip of one")],
                    name: Annotated[Optional[str], typer.Option(help="(default: the folder or file name)")] = None,
                    as_json: JsonOpt = False):
    """Upload a folder (zipped on the fly) or a zip; prints the dataset report."""
    with _client(ctx) as client, _transfer_progress() as progress:
        zipping = progress.add_task("zipping", total=None, visible=path.is_dir())
        uploading = progress.add_task("uploading", total=None)
        dataset = client.upload_dataset(
            path, name,
            zip_progress=lambda done, total: progress.update(zipping, completed=done, total=total),
            upload_progress=lambda done, total: progress.update(uploading, completed=done, total=total))
        progress.update(uploading, description="uploaded")
    if as_json:
        return _print_json(dataset)
    _show_dataset(dataset)


@datasets_app.command("list")
def datasets_list(ctx: typer.Context, as_json: JsonOpt = False):
    """Datasets, newest first."""
    with _client(ctx) as client:
        rows = client.list_datasets()
    if as_json:
        return _print_json(rows)
    table = Table("id", "name", "created", "images", "classes", "rejected", title="datasets")
    for d in rows:
        table.add_row(d["id"], d["name"], _when(d["created_at"]), str(d["num_images"]),
                      ", ".join(d["classes"]), str(len(d["rejected"])))
    out.print(table)


@datasets_app.command("show")
def datasets_show(ctx: typer.Context, dataset_id: str, as_json: JsonOpt = False):
    """One dataset's report: classes, counts per split, skipped files."""
    _answer(ctx, lambda client: client.get_dataset(dataset_id), as_json, _show_dataset)


SAMPLE = "bloodcells"  # service/samples/<SAMPLE>/: train/<class>/*.jpg, val/<class>/*.jpg, ATTRIBUTION.md
SAMPLE_CREDIT = "ATTRIBUTION.md"


@datasets_app.command("sample")
def datasets_sample(directory: Annotated[Path, typer.Argument(metavar="DIR", file_okay=False,
                                                              help="where to write it (created if missing)")],
                    force: Annotated[bool, typer.Option("--force", help="write into a folder that is not "
                                                        "empty (same-named files are replaced)")] = False):
    """Write a small set to try Graft on: blood-cell microscope photos in train/ and val/ class folders."""
    if directory.exists() and any(directory.iterdir()) and not force:
        err.print(f"[red]error:[/] {directory} is not empty; name a new or empty folder, or add --force to "
                  "write the sample into it anyway (files with the same names are replaced)", highlight=False,
                  soft_wrap=True)
        raise typer.Exit(1)
    written = write_sample(directory)
    classes = sorted({p.parent.name for p in written})
    per_split = ", ".join(f"{split}/ {sum(p.parts[-3] == split for p in written)}" for split in ("train", "val"))
    for line in (f"wrote {len(written)} images to {directory} ({per_split}): {len(classes)} classes, "
                 f"{', '.join(classes)}", _sample_credit(), f"next: graft datasets upload {directory}"):
        out.print(line, highlight=False, markup=False, soft_wrap=True)  # whole lines: paths stay copyable


def sample_root():
    """The shipped sample set, read through importlib.resources so that an installed wheel works."""
    from importlib.resources import files

    return files("service") / "samples" / SAMPLE


def write_sample(directory: Path) -> list[Path]:
    """Copy the sample's images (train/<class>/*, val/<class>/*) into `directory`; returns their paths."""
    written = []
    for split in sorted(sample_root().iterdir(), key=lambda t: t.name):
        if not split.is_dir():
            continue  # the credit text stays out: it would be a skipped file in every upload
        for label in sorted(split.iterdir(), key=lambda t: t.name):
            target = directory / split.name / label.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(label.iterdir(), key=lambda t: t.name):
                (target / image.name).write_bytes(image.read_bytes())
                written.append(target / image.name)
    return written


def _sample_credit() -> str:
    """The credit CC BY 4.0 asks for, short; the full text ships next to the images."""
    return (f"images: PBC dataset, Acevedo et al., Data in Brief 30 (2020), CC BY 4.0; source and licence in "
            f"{sample_root() / SAMPLE_CREDIT}")


def _show_dataset(d: dict, max_rejected: int = 20) -> None:
    splits = sorted(d["split_counts"])
    out.print(f"dataset [bold]{d['name']}[/]  id {d['id']}", highlight=False)
    table = Table("class", *splits, "total")
    for label in d["classes"]:
        table.add_row(label, *(str(d["split_counts"][s].get(label, 0)) for s in splits),
                      str(d["class_counts"].get(label, 0)))
    table.add_row("[bold]all[/]", *(str(sum(d["split_counts"][s].values())) for s in splits),
                  f"[bold]{d['num_images']}[/]")
    out.print(table)
    if d.get("task") == "multi_label":  # issue 17: the rows count each label's images
        none = ((d.get("report") or {}).get("images_without_labels") or {}).get("total", 0)
        out.print(f"multi-label: several labels per image (counts per label; 'all' counts label uses); "
                  f"{none} image(s) have none of them")
    split = "kept from the train/ and val/ folders" if d["has_val_split"] else "held out per job (val_fraction)"
    out.print(f"validation split: {split}")
    report = d.get("report") or {}
    for problem in report.get("problems", []):
        out.print(f"[red]cannot train:[/] {problem}", highlight=False)
    for warning in report.get("warnings", []):
        out.print(f"[yellow]warning:[/] {warning}", highlight=False)
    rejected = d["rejected"]
    if not rejected:
        out.print("[green]every file was usable[/]")
        return
    out.print(f"[yellow]{len(rejected)} file(s) skipped:[/]")
    for r in rejected[:max_rejected]:
        out.print(f"  {r['path']}: {r['reason']}", markup=False)
    if len(rejected) > max_rejected:
        out.print(f"  … and {len(rejected) - max_rejected} more (see --json)")


@app.command()
@with_job_options  # one option per POST /v1/jobs field, help and defaults from its schema
def train(ctx: typer.Context,
          dataset_id: Annotated[str, typer.Argument(metavar="DATASET", help="a dataset id")],
          watch: Annotated[bool, typer.Option("--watch", "-w", help="follow it live, then print metrics")] = False,
          as_json: JsonOpt = False, **options):
    """Start a training job on a dataset; with --watch, follow it to the end. An option left out
    is not sent: the server's default applies."""
    with _client(ctx) as client:
        job = client.create_job(dataset_id, **options)
        if not watch:
            if as_json:
                return _print_json(job)
            out.print(f"job [bold]{job['id']}[/] {job['status']}; follow it with `graft jobs watch {job['id']}`")
            return
        if not as_json:
            err.print(f"job [bold]{job['id']}[/] queued")
        _watch(client, job, as_json)


@jobs_app.command("watch")
def jobs_watch(ctx: typer.Context, job_id: str, as_json: JsonOpt = False):
    """Follow a job live to its end, then print its metrics."""
    with _client(ctx) as client:
        _watch(client, client.get_job(job_id), as_json)


def _watch(client: GraftClient, job: dict, as_json: bool) -> None:
    view = _JobView(err, quiet=as_json)
    try:
        with view:
            for event in client.watch_job(job["id"]):
                view.show(event)
    except KeyboardInterrupt:
        err.print(f"stopped watching; job {job['id']} goes on (`graft jobs cancel {job['id']}` stops it)")
        raise typer.Exit(130)
    job = client.get_job(job["id"])
    model = client.get_model(job["model_id"]) if job["model_id"] else None
    if as_json:
        _print_json({"job": job, "model": model})
    elif model:
        _show_metrics(model)
    else:
        error = job.get("error") or {}
        err.print(f"[red]job {job['id']} {job['status']}[/]" + (f": {error.get('message')}" if error else ""))
    if job["status"] != JobStatus.succeeded:
        raise typer.Exit(1)


class _JobView:
    """A job as its events tell it (the progress shape of workers/progress.py): one bar per phase,
    the candidate being tried and the leaderboard of finished ones. Live on a terminal; elsewhere
    (a pipe, a log) one line per event, which the server keeps to a bounded number per phase."""

    def __init__(self, console, quiet: bool = False):
        self.console, self.quiet = console, quiet
        self.live = not quiet and console.is_terminal
        self.bars = Progress(SpinnerColumn(finished_text="[green]✓[/]"), TextColumn("{task.description:<28}"),
                             BarColumn(), TextColumn("{task.fields[count]}"), TextColumn("{task.fields[speed]}"),
                             TextColumn("{task.fields[eta]}"), TextColumn("{task.fields[stats]}"),
                             console=console, auto_refresh=False)
        self.tasks: dict[tuple, Any] = {}
        self.current: tuple | None = None
        self.status, self.candidate, self.leaderboard = "queued", None, []
        self._live = None

    def __enter__(self) -> _JobView:
        if self.live:
            from rich.live import Live
            self._live = Live(self, console=self.console, refresh_per_second=4)
            self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.__exit__(*exc)

    def __rich__(self):
        from rich.console import Group
        from rich.text import Text
        parts: list = [Text.assemble(("job ", "dim"), (self.status, "bold"))]
        if self.tasks:
            parts.append(self.bars)
        if self.candidate:
            parts.append(Text(f"trying {_recipe_text(self.candidate)}", overflow="fold"))
        if self.leaderboard:
            parts.append(_leaderboard_table(self.leaderboard))
        return Group(*parts)

    def show(self, event: dict) -> None:
        data, kind = event.get("data") or {}, event.get("kind")
        if kind == "status":
            self.status = str(data.get("status", ""))
            if self.status in ("succeeded", "failed", "cancelled"):
                self.candidate = None
                if self.current is not None:
                    self._leave(self.current)
            self._line(f"job {self.status}" + "".join(f"  {k} {data[k]}" for k in ("attempt", "reason", "error_code")
                                                       if data.get(k) is not None))
        elif kind == "progress":
            self._progress(data)
        elif kind == "epoch":
            self._epoch(data)
        elif kind == "candidate":
            self._finished(data)
        elif kind == "warning":
            self._line(f"[yellow]warning:[/] {data.get('message', data)}", markup=True)
        else:
            self._line(str(kind).replace("_", " "))
        if self._live is not None:
            self._live.refresh()

    # -- what each event changes ------------------------------------------------------------------

    def _progress(self, data: dict) -> None:
        for phase in data.get("phases") or []:  # a whole progress dict (polling an older server's way)
            key = (phase.get("phase"), phase.get("backbone"))
            if key != _key(data):
                self._bar(key, phase, finished=True)
        if data.get("leaderboard") is not None:
            self.leaderboard = list(data["leaderboard"])
        key = _key(data)
        if self.current is not None and key != self.current:
            self._leave(self.current)
        self.current = key
        self._bar(key, data)
        if "candidate" in data:
            self.candidate = data["candidate"] if isinstance(data["candidate"], dict) else None
        task = self.bars.tasks[self._task(key)]
        self._line(f"{task.description}  {task.fields['count']}  {task.fields['speed']}  {task.fields['eta']}  "
                   f"{task.fields['stats']}".rstrip())

    def _epoch(self, data: dict) -> None:
        stats = f"train_loss {data.get('train_loss', 0):.4f}  val_acc {data.get('val_accuracy', 0):.3f}"
        key = self.current if self.current and self.current[0] == "training" else ("training", None)
        if key not in self.tasks or self.bars.tasks[self.tasks[key]].fields.get("unit") == "epochs":
            # a server that sends epochs only: the bar counts them
            if self.current is not None and self.current != key:
                self._leave(self.current)
            self._bar(key, {"phase": "training", "unit": "epochs", "done": data.get("epoch"),
                            "total": data.get("epochs")})
            self.current = key
        self.bars.update(self.tasks[key], stats=stats)
        self._line(f"training  epoch {data.get('epoch')}/{data.get('epochs')}  {stats}")

    def _finished(self, data: dict) -> None:
        entry = {k: v for k, v in data.items() if k not in ("rank", "of", "created_at")}
        self.leaderboard = sorted([*self.leaderboard, entry],
                                  key=lambda e: (-(e.get("val_accuracy") or 0.0), e.get("val_loss") or 0.0))
        self._line(f"scored {_recipe_text(data.get('recipe') or {})}  val_accuracy {data.get('val_accuracy', 0):.4f} "
                   f"({data.get('scored_on', '')}, {data.get('seconds', 0):.1f} s): rank {data.get('rank', '?')} of "
                   f"{data.get('of', '?')}")

    # -- bars ------------------------------------------------------------------------------------

    def _task(self, key: tuple):
        if key not in self.tasks:
            self.tasks[key] = self.bars.add_task(str(key[0]), total=None, unit="", count="", speed="", eta="",
                                                 stats="")
            self._relabel()
        return self.tasks[key]

    def _relabel(self) -> None:
        """Name the backbone on each bar once the job has run more than one."""
        backbones = {b for _, b in self.tasks if b}
        for (phase, backbone), task in self.tasks.items():
            self.bars.update(task, description=f"{phase} · {backbone}" if len(backbones) > 1 and backbone else phase)

    def _bar(self, key: tuple, p: dict, finished: bool = False) -> None:
        done, total, unit = p.get("done"), p.get("total"), p.get("unit") or ""
        count = f"{done:,}/{total:,} {unit}" if done is not None and total is not None else (
            f"{done:,} {unit}" if done is not None else "")
        rate, eta = p.get("rate"), p.get("eta_s")
        fields = {"unit": unit, "count": count.strip(), "speed": f"{rate:,.3g} {unit}/s" if rate and not finished else "",
                  "eta": f"ETA {_duration(eta)}" if eta is not None and not finished and done != total else ""}
        stats = _phase_stats(p)
        if stats:
            fields["stats"] = stats
        task = self._task(key)
        if finished:
            whole = max(done or 0, 1)
            self.bars.update(task, total=total if total and done == total else whole, completed=whole, **fields)
        else:
            self.bars.update(task, total=total or None, completed=done or 0, **fields)

    def _leave(self, key: tuple) -> None:
        """A phase that ended shows full, with what it really counted."""
        task = self.bars.tasks[self.tasks[key]]
        done = int(task.completed)
        self.bars.update(task.id, total=max(done, 1), completed=max(done, 1), speed="", eta="")

    def _line(self, text: str, markup: bool = False) -> None:
        if not self.quiet and not self.live:
            self.console.print(text, markup=markup, highlight=False, soft_wrap=True)


def _key(p: dict) -> tuple:
    return (p.get("phase"), p.get("backbone"))


def _phase_stats(p: dict) -> str:
    """What else a person wants to see of a phase: its epoch and scores, its fold."""
    out = []
    if p.get("epoch") is not None and p.get("epochs"):
        out.append(f"epoch {p['epoch']}/{p['epochs']}")
    if p.get("val_accuracy") is not None:
        out.append(f"val_acc {p['val_accuracy']:.3f}")
    if p.get("fold") is not None and p.get("unit") != "folds":
        out.append(f"fold {p['fold']}")
    return "  ".join(out)


def _recipe_text(recipe: dict, keys: set | None = None) -> str:
    """A recipe in words; with `keys`, only those (a leaderboard names what differs between its rows)."""
    names = {"logistic_c": "C", "learning_rate": "lr", "unfreeze_stages": "stages"}
    shown = [k for k in recipe if k != "strategy" and (k in keys if keys is not None else k != "backbone")]
    words = [str(recipe[k]) if k == "backbone" else f"{names.get(k, k)}={recipe[k]}" for k in shown]
    return " ".join([str(recipe.get("strategy", "")), *words]).strip()


def _varying_keys(recipes: list[dict]) -> set:
    keys = {k for r in recipes for k in r}
    return {k for k in keys if len({json.dumps(r.get(k)) for r in recipes}) > 1}


def _leaderboard_table(entries: list[dict], limit: int = 8) -> Table:
    table = Table("#", "candidate", "val_accuracy", "val_loss", "scored on", "seconds", title="candidates so far",
                  title_justify="left")
    keys = _varying_keys([e.get("recipe") or {} for e in entries]) if len(entries) > 1 else None
    for i, e in enumerate(entries[:limit], start=1):
        table.add_row(str(i), _recipe_text(e.get("recipe") or {}, keys), f"{e.get('val_accuracy', 0):.4f}",
                      f"{e.get('val_loss', 0):.4f}", str(e.get("scored_on", "")), f"{e.get('seconds', 0):.1f}")
    if len(entries) > limit:
        table.add_row("…", f"{len(entries) - limit} more", "", "", "", "")
    return table


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


def _transfer_progress() -> Progress:
    return Progress(TextColumn("{task.description:<10}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeElapsedColumn(), console=err)


def _show_metrics(model: dict) -> None:
    m = model["metrics"]
    # The id on a line of its own: a table's title wraps at the table's width, mid-id.
    out.print(f"model [bold]{model['id']}[/]  ({model['backbone']}, {model['recipe'].get('strategy')})",
              soft_wrap=True)
    if m.get("task") == "multi_label":
        return _show_multi_label_metrics(m)
    summary = Table("metric", "value", title="metrics")
    for key in ("val_accuracy", "balanced_accuracy", "macro_f1", "val_loss", "best_epoch", "num_train_images",
                "num_val_images", "num_test_images", "train_seconds", "train_images_per_s", "device"):
        if m.get(key) is not None:
            value = m[key]
            as_float = isinstance(value, float) and key != "train_images_per_s"
            summary.add_row(key, f"{value:.4f}" if as_float else str(value))
    test = m.get("test") or {}  # the held-out test split, scored on the finished model
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "loss"):
        if test.get(key) is not None:
            summary.add_row(f"test_{key}", f"{test[key]:.4f}")
    ood = m.get("ood")  # issue 17: predict answers unknown below this score
    if ood:
        summary.add_row("unknown below", f"{ood['kind']} score {ood['threshold']:.4f} "
                        f"({ood['held_out_pass_rate']:.0%} of held-out images pass)")
    out.print(summary)
    per_class = Table("class", "precision", "recall", "f1", "support", title="per class")
    for label, c in m.get("per_class", {}).items():
        per_class.add_row(label, f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"]))
    out.print(per_class)
    cm = m.get("confusion_matrix")
    if cm:
        matrix = Table("true \\ predicted", *cm["labels"], title="confusion matrix")
        for i, (label, row) in enumerate(zip(cm["labels"], cm["matrix"])):
            matrix.add_row(label, *(f"[bold green]{v}[/]" if i == j else str(v) for j, v in enumerate(row)))
        out.print(matrix)


def _show_multi_label_metrics(m: dict) -> None:
    """A multi-label model's metrics (issue 17): mAP and the rest, then each label's AP and threshold."""
    summary = Table("metric", "value", title="metrics (multi-label)")
    for key in ("map_macro", "map_micro", "subset_accuracy", "hamming_loss", "micro_f1", "macro_f1", "val_loss",
                "num_train_images", "num_val_images", "num_test_images", "train_seconds", "device"):
        if m.get(key) is not None:
            value = m[key]
            summary.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    for key in ("map_macro", "subset_accuracy", "hamming_loss"):
        if (m.get("test") or {}).get(key) is not None:
            summary.add_row(f"test_{key}", f"{m['test'][key]:.4f}")
    tuning = m.get("threshold_tuning") or {}
    if tuning:
        summary.add_row("thresholds", f"{tuning.get('method')}, on {tuning.get('on')}")
    out.print(summary)
    per_label = Table("label", "AP", "threshold", "precision", "recall", "f1", "support", title="per label")
    for label, c in (m.get("per_label") or {}).items():
        per_label.add_row(label, f"{c['ap']:.3f}" if c.get("ap") is not None else "–", f"{c['threshold']:.3f}",
                          f"{c['precision']:.3f}", f"{c['recall']:.3f}", f"{c['f1']:.3f}", str(c["support"]))
    out.print(per_label)


@jobs_app.command("list")
def jobs_list(ctx: typer.Context,
              status: Annotated[Optional[str], typer.Option(help="only jobs of this status")] = None,
              as_json: JsonOpt = False):
    """Jobs, newest first."""
    with _client(ctx) as client:
        rows = client.list_jobs(status)
    if as_json:
        return _print_json(rows)
    table = Table("id", "status", "dataset", "strategy", "progress", "created", "model", title="jobs")
    for j in rows:
        p = j["progress"]
        count = f" {p['done']}/{p['total']}" if p.get("done") is not None and p.get("total") else ""
        progress = f"{p.get('phase', '')}{count}" if p.get("phase") else (
            f"{p['epoch']}/{p['epochs']}" if "epoch" in p else "")
        table.add_row(j["id"], _status(j["status"]), j["dataset_id"], str(j["config"].get("strategy")),
                      progress, _when(j["created_at"]), j["model_id"] or "")
    out.print(table)


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: str):
    """A job as JSON."""
    with _client(ctx) as client:
        _print_json(client.get_job(job_id))


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: str):
    """Cancel a queued job, or stop a running one at its next step."""
    with _client(ctx) as client:
        job = client.cancel_job(job_id)
    out.print(f"job {job['id']}: {job['status']}" + (" (stopping)" if job["cancel_requested"] else ""))


@app.command()
def predict(ctx: typer.Context,
            model_id: Annotated[str, typer.Argument(metavar="MODEL", help="a model id, or the id of a finished job")],
            images: Annotated[list[Path], typer.Argument(metavar="IMAGES...", exists=True, dir_okay=False)],
            top_k: Annotated[int, typer.Option(help="labels per image")] = 3,
            min_score: Annotated[Optional[float], typer.Option(help=(
                "answer unknown below this out-of-distribution score instead of the model's own threshold"))] = None,
            as_json: JsonOpt = False):
    """Classify image files with a trained model; "unknown" when an image is none of its classes."""
    with _client(ctx) as client:
        answer = client.predict(model_id, images, top_k=top_k, min_score=min_score)
    if as_json:
        return _print_json(answer)
    out.print(f"model [bold]{answer['model_id']}[/]", soft_wrap=True)
    table = Table("file", "label", "score", "others")
    for r in answer["results"]:
        best, *rest = r["predictions"]
        if r.get("labels") is not None:  # a multi-label model (issue 17): every label over its threshold
            others = ", ".join(f"{name} {s:.4f}" for name, s in r["scores"].items() if name not in r["labels"])
            table.add_row(r["filename"], ", ".join(f"[bold]{name}[/]" for name in r["labels"]) or "(none)",
                          ", ".join(f"{r['scores'][name]:.4f}" for name in r["labels"]), others)
            continue
        label = "[bold yellow]unknown[/]" if r.get("unknown") else f"[bold]{best['label']}[/]"
        ood = r.get("ood")  # issue 17: none of the model's classes below the threshold
        others = ", ".join(f"{p['label']} {p['score']:.4f}" for p in (r["predictions"] if r.get("unknown") else rest))
        if ood:
            others += f"{'; ' if others else ''}{ood['kind']} score {ood['score']:.3f} (threshold {ood['threshold']:.3f})"
        table.add_row(r["filename"], label, "" if r.get("unknown") else f"{best['score']:.4f}", others)
    out.print(table)


@app.command("predict-batch")
def predict_batch(ctx: typer.Context,
                  model_id: Annotated[str, typer.Argument(metavar="MODEL", help="a model id, or the id of a finished job")],
                  dataset_id: Annotated[Optional[str], typer.Argument(metavar="[DATASET_ID]",
                                                                      help="a dataset of the project to predict")] = None,
                  images: Annotated[Optional[Path], typer.Option("--zip", exists=True, help=(
                      "a zip of images, or a folder (zipped on the fly), instead of a dataset"))] = None,
                  top_k: Annotated[int, typer.Option(help="labels per image")] = 5,
                  watch: Annotated[bool, typer.Option("--watch", help="follow its progress until it ends")] = False,
                  output: Annotated[Optional[Path], typer.Option("--out", "-o", help=(
                      "save the results here once it succeeds (implies --watch); .jsonl gives JSON lines, "
                      "anything else CSV"))] = None,
                  as_json: JsonOpt = False):
    """Predict every image of a dataset or a zip on a worker, as a job; results as CSV or JSON lines."""
    if (dataset_id is None) == (images is None):
        err.print("give either a DATASET_ID or --zip FILE")
        raise typer.Exit(2)
    with _client(ctx) as client:
        batch = client.create_batch_prediction(model_id, dataset_id, images=images, top_k=top_k)
        if watch or output:
            with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=err, disable=as_json) as progress:
                task = progress.add_task(f"batch {batch['id'][:8]}", total=batch["progress"]["total"])
                batch = client.wait_batch_prediction(batch["id"], on_progress=lambda b: progress.update(
                    task, completed=b["progress"]["done"], description=f"batch {b['id'][:8]} {b['status']}"))
        if output and batch["status"] == JobStatus.succeeded:
            client.download_batch_results(batch["id"], output, "jsonl" if output.suffix == ".jsonl" else "csv")
    if as_json:
        return _print_json(batch)
    done = batch["progress"]
    out.print(f"batch prediction {batch['id']}: {_status(batch['status'])}, {done['done']}/{done['total']} images"
              + (f"; results in {output}" if output and batch["status"] == JobStatus.succeeded else ""))
    if batch.get("error"):
        err.print(f"{batch['error']['code']}: {batch['error']['message']}")
    if batch["status"] in (JobStatus.failed, JobStatus.cancelled):
        raise typer.Exit(1)


@models_app.command("list")
def models_list(ctx: typer.Context, as_json: JsonOpt = False):
    """Trained models, newest first."""
    with _client(ctx) as client:
        rows = client.list_models()
    if as_json:
        return _print_json(rows)
    table = Table("id", "backbone", "strategy", "classes", "val_accuracy", "created", "job", title="models")
    for m in rows:
        table.add_row(m["id"], m["backbone"], str(m["recipe"].get("strategy")), ", ".join(m["classes"]),
                      f"{m['metrics'].get('val_accuracy', 0):.4f}", _when(m["created_at"]), m["job_id"])
    out.print(table)


@models_app.command("show")
def models_show(ctx: typer.Context, model_id: str, as_json: JsonOpt = False):
    """A model's metrics, per-class scores and confusion matrix."""
    _answer(ctx, lambda client: client.get_model(model_id), as_json, _show_metrics)


@models_app.command("promote")
def models_promote(ctx: typer.Context, model_id: Annotated[str, typer.Argument(
                       metavar="MODEL_ID", help="a ready model (or the id of the job that trained it)")],
                   alias: Annotated[str, typer.Argument(metavar="ALIAS", help="e.g. prod, staging")],
                   as_json: JsonOpt = False):
    """Point an alias at a model (creating the alias): predicts through it switch to that model at once."""
    with _client(ctx) as client:
        moved = client.promote(model_id, alias)
    if as_json:
        return _print_json(moved)
    out.print(f"alias {moved['name']} -> model {moved['model_id']}")


@models_app.command("aliases")
def models_aliases(ctx: typer.Context, alias: Annotated[Optional[str], typer.Argument(
                       metavar="[ALIAS]", help="show this alias's history of moves instead")] = None,
                   as_json: JsonOpt = False):
    """The project's aliases and the models they point at; with ALIAS, every move of it."""
    with _client(ctx) as client:
        rows = client.alias_history(alias) if alias else client.list_aliases()
    if as_json:
        return _print_json(rows)
    if alias:
        table = Table("moved", "from", "to", "key", title=f"alias {alias}")
        for m in rows:
            table.add_row(_when(m["moved_at"]), m["from_model_id"] or "(created)", m["to_model_id"] or "(deleted)",
                          m["key_id"] or "-")
    else:
        table = Table("alias", "model", "moved", title="aliases")
        for a in rows:
            table.add_row(a["name"], a["model_id"], _when(a["updated_at"]))
    out.print(table)


@models_app.command("export")
def models_export(ctx: typer.Context, model_id: str,
                  format: Annotated[ExportFormat, typer.Option("--format", "-f")] = ExportFormat.onnx,
                  output: Annotated[Path, typer.Option("--output", "-o", help="a file, or a folder for the "
                                                       "server's file name")] = Path("."),
                  as_json: JsonOpt = False):
    """Download a model as a zip: the model file, manifest.json (preprocessing, classes) and USAGE.md."""
    with _client(ctx) as client, _transfer_progress() as progress:
        task = progress.add_task(f"{format.value}", total=None)
        path = client.export_model(model_id, format.value, output,
                                   progress=lambda done, total: progress.update(task, completed=done,
                                                                                total=total or None))
    if as_json:
        return _print_json({"path": str(path), "bytes": path.stat().st_size})
    out.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


def _status(status: str) -> str:
    color = {JobStatus.succeeded: "green", JobStatus.failed: "red", JobStatus.cancelled: "yellow",
             JobStatus.running: "cyan"}.get(status, "white")
    return f"[{color}]{status}[/]"


def _when(iso: str) -> str:
    return iso.replace("T", " ")[:19]


@app.command()
def label(ctx: typer.Context,
          model_id: Annotated[str, typer.Argument(metavar="MODEL", help="a model id, or the id of a finished job")],
          dataset_id: Annotated[Optional[str], typer.Option("--dataset", help=(
              "the dataset whose unlabeled images to label (default: the newest version of the model's)"))] = None,
          k: Annotated[int, typer.Option("-k", help="how many suggestions")] = 20,
          strategy: Annotated[str, typer.Option(help="margin, entropy or diverse")] = "margin",
          accept: Annotated[bool, typer.Option("--accept", help="accept every pre-label without asking")] = False,
          create_class: Annotated[bool, typer.Option("--create-class", help="a label that is no class yet "
                                                     "becomes one")] = False,
          train_again: Annotated[bool, typer.Option("--train", help="queue a default job on the labeled dataset")] = False,
          as_json: JsonOpt = False):
    """Label the images the model is least sure of (issue 16): each suggestion shows the model's guess;
    press Enter to accept it, type another class, 's' to skip, 'q' to stop. One change is sent at the end."""
    with _client(ctx) as client:
        answer = client.suggestions(model_id, dataset_id, k=k, strategy=strategy)
        if as_json and not accept:
            return _print_json(answer)
        rows = answer["suggestions"]
        if not rows:
            out.print(f"dataset {answer['dataset_id']} has no unlabeled images to suggest")
            return
        table = Table("#", "image", "pre-label", "score", "margin", "others", title=f"suggestions ({strategy})")
        for r in rows:
            table.add_row(str(r["rank"]), r["original_name"], r["predicted_label"], f"{r['score']:.3f}",
                          f"{r['margin']:.3f}", ", ".join(f"{p['label']} {p['score']:.3f}" for p in r["predictions"][1:]))
        if not as_json:
            out.print(table)
        labels = {r["image_id"]: r["predicted_label"] for r in rows} if accept else _ask_labels(rows)
        if not labels:
            out.print("nothing labeled")
            return
        dataset = client.label_images(answer["dataset_id"], labels, create_class=create_class)
        job = client.create_job(dataset["id"]) if train_again else None
    if as_json:
        return _print_json({"dataset": dataset, "labeled": labels, "job": job})
    out.print(f"labeled {len(labels)} image(s): dataset {dataset['id']} (version {dataset['version']}) now has "
              f"{dataset['report'].get('unlabeled_count', 0)} unlabeled")
    if job is not None:
        out.print(f"queued job {job['id']}: graft jobs watch {job['id']}")
    else:
        out.print(f"train again: graft train {dataset['id']}")


def _ask_labels(rows: list[dict]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for r in rows:
        reply = typer.prompt(f"{r['rank']}. {r['original_name']} [{r['predicted_label']}]", default="",
                             show_default=False).strip()
        if reply.lower() == "q":
            break
        if reply.lower() == "s":
            continue
        labels[r["image_id"]] = reply or r["predicted_label"]
    return labels
