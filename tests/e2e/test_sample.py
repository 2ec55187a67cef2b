"""`graft datasets sample DIR`: the set the README's walk-through starts from, shipped in the package,
must upload cleanly and train a model that is clearly better than guessing."""
from __future__ import annotations

import subprocess
import sys
import threading

from typer.testing import CliRunner

from service import cli
from service.app import create_app
from service.client import GraftClient
from tests.support.data import REPO
from tests.support.live import uvicorn_thread, venv_env
from workers.worker import Worker

SAMPLE = REPO / "service" / "samples" / "bloodcells"
CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


def sample(*argv: str):
    return CliRunner().invoke(cli.app, ["datasets", "sample", *argv])


def test_sample_writes_train_and_val_class_folders_and_says_what_to_run_next(tmp_path):
    result = sample(str(tmp_path / "s"))
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(tmp_path / "s").as_posix() for p in (tmp_path / "s").rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(SAMPLE).as_posix() for p in SAMPLE.rglob("*.jpg"))
    assert written == shipped and len(written) == 160
    assert {p.split("/")[1] for p in written} == set(CLASSES)
    assert (tmp_path / "s" / written[0]).read_bytes() == (SAMPLE / written[0]).read_bytes()
    assert "wrote 160 images" in result.output and "train/ 120, val/ 40" in result.output
    assert "CC BY 4.0" in result.output and f"next: graft datasets upload {tmp_path / 's'}" in result.output


def test_sample_refuses_a_folder_that_is_not_empty_unless_forced(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    refused = sample(str(tmp_path))
    assert refused.exit_code == 1 and "is not empty" in refused.output and "--force" in refused.output
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
    forced = sample(str(tmp_path), "--force")
    assert forced.exit_code == 0 and len(list(tmp_path.rglob("*.jpg"))) == 160
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_sample_command_imports_no_torch(tmp_path):
    """A client command: it must start fast on a machine that only talks to Graft."""
    code = ("import sys; from service import cli\n"
            "try: cli.main(['datasets', 'sample', sys.argv[1]])\n"
            "except SystemExit as e: assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")], env=venv_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "s").rglob("*.jpg"))) == 160


def test_the_installed_package_ships_the_sample():
    """The image installs Graft as a wheel (not editable): every sample file must be package data."""
    import fnmatch
    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    files = [p.relative_to(REPO / "service").as_posix() for p in SAMPLE.rglob("*") if p.is_file()]
    assert "samples/bloodcells/ATTRIBUTION.md" in files and len(files) == 161
    assert all(any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/") for pat in patterns) for f in files)
    assert sum((REPO / "service" / f).stat().st_size for f in files) < 3_000_000  # the repository stays small


def test_the_sample_uploads_cleanly_and_trains_far_above_chance(tmp_path, settings):
    """The walk-through's first steps, as a user runs them: sample, upload the folder, train."""
    assert sample(str(tmp_path / "sample")).exit_code == 0
    with uvicorn_thread(create_app(settings)) as url, GraftClient(url, timeout=60) as client:
        dataset = client.upload_dataset(tmp_path / "sample", None)
        assert dataset["classes"] == CLASSES and dataset["rejected"] == [] and dataset["has_val_split"]
        assert dataset["report"]["trainable"], dataset["report"]
        job = client.create_job(dataset["id"], strategy="linear_probe", image_size=96, epochs=30)
        worker = threading.Thread(target=Worker(settings).run, kwargs={"max_jobs": 1}, daemon=True)
        worker.start()
        worker.join(240)
        job = client.get_job(job["id"])
        assert job["status"] == "succeeded", job
        metrics = client.get_model(job["model_id"])["metrics"]
    assert metrics["num_val_images"] == 40  # scored on the shipped val/ folder, never trained on
    assert metrics["val_accuracy"] >= 0.5, metrics["val_accuracy"]  # chance is 1/8
