"""deploy/k8s/, checked offline: every object against the Kubernetes schemas (kubernetes-validate,
strict), the KEDA objects against KEDA's CRD schema (cloudcoil-models-keda: models generated from
KEDA 2.16's CRDs; a field they do not know fails too), the references between objects, the
settings against service/settings.py, and each ScaledObject's queue-depth query against the real
schema on PostgreSQL."""
from __future__ import annotations

import base64
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from sqlalchemy import text
from typer.testing import CliRunner

from service import cli
from service.settings import Settings
from service.store.db import Database
from service.store.queue import JobQueue
from service.store.tables import Dataset, Job, WorkerRecord
from tests.support.data import REPO

K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"
CLUSTER_SCOPED = {"Namespace"}
POSTGRESQL_SCALER_KEYS = {"query", "targetQueryValue", "activationTargetQueryValue", "connectionFromEnv",
                          "host", "port", "userName", "dbName", "sslmode", "passwordFromEnv"}


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {key: value for key, value in pairs}


def render() -> list[dict]:
    """What `kubectl apply -k deploy/k8s` sends (this kustomization's features only: resources,
    namespace, labels, the two generators without hash suffixes, the image), with the example secrets."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    objects = [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
    (config,) = kustomization["configMapGenerator"]
    objects.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": config["name"]},
                    "data": {k: v for f in config["envs"] for k, v in env_file(K8S / f).items()}})
    (secret,) = kustomization["secretGenerator"]
    assert secret["envs"] == ["secrets.env"] and (K8S / "secrets.env.example").is_file()
    objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret["name"]}, "type": "Opaque",
                    "data": {k: base64.b64encode(v.encode()).decode()
                             for k, v in env_file(K8S / "secrets.env.example").items()}})
    (image,) = kustomization["images"]
    labels = {k: v for entry in kustomization["labels"] for k, v in entry["pairs"].items()}
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = kustomization["namespace"]
        obj["metadata"].setdefault("labels", {}).update(labels)
        for pod in pod_specs(obj):
            for container in pod["containers"]:
                if container["image"] == image["name"]:
                    container["image"] = f"{image['newName']}:{image['newTag']}"
    return objects


def pod_specs(obj: dict) -> list[dict]:
    if obj["kind"] in ("Deployment", "Job"):
        return [obj["spec"]["template"]["spec"]]
    return []


MANIFESTS = render()
BY_KIND: dict[str, dict[str, dict]] = {}
for _obj in MANIFESTS:
    BY_KIND.setdefault(_obj["kind"], {})[_obj["metadata"]["name"]] = _obj
CONFIG = BY_KIND["ConfigMap"]["graft-config"]["data"]
SECRETS = {k: base64.b64decode(v).decode() for k, v in BY_KIND["Secret"]["graft-secrets"]["data"].items()}


@pytest.mark.parametrize("obj", [o for o in MANIFESTS if not o["apiVersion"].startswith("keda.sh/")],
                         ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_every_object_is_valid_against_the_kubernetes_schema(obj):
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def _without_unknown(value, known):
    """The parts of `value` the model kept (pydantic drops fields a CRD does not define)."""
    if isinstance(value, dict) and isinstance(known, dict):
        return {k: _without_unknown(v, known[k]) for k, v in value.items() if k in known}
    if isinstance(value, list) and isinstance(known, list):
        return [_without_unknown(v, k) for v, k in zip(value, known)]
    return value


@pytest.mark.parametrize("obj", [o for o in MANIFESTS if o["apiVersion"].startswith("keda.sh/")],
                         ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_keda_objects_are_valid_against_kedas_crd_schema(obj):
    from cloudcoil.models.keda import v1alpha1

    assert obj["apiVersion"] == "keda.sh/v1alpha1"
    model = getattr(v1alpha1, obj["kind"]).model_validate(obj)  # types, enums, required fields
    kept = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert _without_unknown(obj, kept) == obj, "a field KEDA's CRD does not define"


def test_references_between_objects_hold():
    deployments = BY_KIND["Deployment"]
    for obj in MANIFESTS:
        for pod in pod_specs(obj):
            for container in pod["containers"]:
                for source in container.get("envFrom", []):
                    if "configMapRef" in source:
                        assert source["configMapRef"]["name"] in BY_KIND["ConfigMap"]
                    if "secretRef" in source:
                        assert source["secretRef"]["name"] in BY_KIND["Secret"]
                mounts = {m["name"] for m in container.get("volumeMounts", [])}
                assert mounts <= {v["name"] for v in pod.get("volumes", [])}
        if obj["kind"] == "Deployment":
            assert obj["spec"]["selector"]["matchLabels"].items() <= obj["spec"]["template"]["metadata"]["labels"].items()
    for service in BY_KIND["Service"].values():
        (target,) = [d for d in deployments.values()
                     if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        named_ports = {p["name"] for c in target["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= named_ports
    for hpa in BY_KIND["HorizontalPodAutoscaler"].values():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    for pdb in BY_KIND["PodDisruptionBudget"].values():
        selected = [d for d in deployments.values()
                    if pdb["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert [d["metadata"]["name"] for d in selected] == ["graft-api"]
    hpa_targets = {h["spec"]["scaleTargetRef"]["name"] for h in BY_KIND["HorizontalPodAutoscaler"].values()}
    for scaled in BY_KIND["ScaledObject"].values():
        target = scaled["spec"]["scaleTargetRef"]["name"]
        assert target in deployments and target not in hpa_targets  # KEDA makes its own HPA
        for trigger in scaled["spec"]["triggers"]:
            auth = BY_KIND["TriggerAuthentication"][trigger["authenticationRef"]["name"]]
            for ref in auth["spec"]["secretTargetRef"]:
                assert ref["name"] in BY_KIND["Secret"] and ref["key"] in SECRETS
                assert ref["parameter"] == "connection"


def test_the_api_is_probed_scaled_and_kept_available():
    api = BY_KIND["Deployment"]["graft-api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["ports"][0]["containerPort"] == int(CONFIG["GRAFT_PORT"])
    assert BY_KIND["HorizontalPodAutoscaler"]["graft-api"]["spec"]["minReplicas"] >= 2
    assert BY_KIND["PodDisruptionBudget"]["graft-api"]["spec"]["minAvailable"] == 1


def test_workers_are_scaled_by_keda_with_gpus_apart_and_their_grace_period():
    grace = float(CONFIG["GRAFT_SHUTDOWN_GRACE_S"])
    for fleet, device in (("cpu", "cpu"), ("gpu", "cuda:0")):
        deployment = BY_KIND["Deployment"][f"graft-worker-{fleet}"]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == ["graft", "worker", "--device", device]
        assert pod["terminationGracePeriodSeconds"] == grace + 30  # drain, checkpoint, hand back
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert (gpus == 1) == (fleet == "gpu")
        assert deployment["spec"]["replicas"] == 0
        scaled = BY_KIND["ScaledObject"][f"graft-worker-{fleet}"]
        assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        (trigger,) = scaled["spec"]["triggers"]
        assert trigger["type"] == "postgresql" and set(trigger["metadata"]) <= POSTGRESQL_SCALER_KEYS


def test_pods_get_settings_graft_accepts_and_commands_it_has(tmp_path, monkeypatch):
    env = {**CONFIG, **SECRETS, "GRAFT_DATA_DIR": str(tmp_path)}
    graft_vars = {k for k in env if k.startswith("GRAFT_")}
    assert {k.removeprefix("GRAFT_").lower() for k in graft_vars} <= set(Settings.model_fields) | {"log_format"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # every value parses and passes its validators
    assert settings.storage_url.startswith("s3://") and settings.rate_limit_storage.startswith("redis://")
    assert settings.workers == 0 and settings.auth_required is True
    runner = CliRunner()
    for obj in MANIFESTS:
        for pod in pod_specs(obj):
            for container in pod["containers"]:
                command = container.get("command", [])
                if command[:1] == ["graft"]:
                    options = [part.split("=")[0] for part in command[2:] if part.startswith("--")]
                    help_text = runner.invoke(cli.app, [command[1], "--help"], terminal_width=200).output
                    assert all(option in help_text for option in options), (command, help_text)


@pytest.mark.postgres
def test_the_scalers_queries_count_each_fleets_queue_on_the_real_schema(postgres_url):
    db = Database(postgres_url)
    with db.session() as s:
        dataset = Dataset(name="d", classes=["a", "b"], class_counts={}, split_counts={}, num_images=0,
                          has_val_split=False, rejected=[])
        s.add(dataset)
        s.add_all([WorkerRecord(id="w-cpu", host="h", pid=1, device="cpu"),
                   WorkerRecord(id="w-gpu", host="h", pid=2, device="cuda:0")])
        s.flush()
        jobs = {}
        for name, gpu in (("q-cpu", False), ("q-cpu-2", False), ("q-gpu", True), ("run-cpu", False),
                          ("run-on-gpu", False), ("done", False), ("failed-gpu", True)):
            jobs[name] = JobQueue.enqueue(s, dataset_id=dataset.id, config={}, max_attempts=1, requires_gpu=gpu)
        s.flush()
        for name, status, worker in (("run-cpu", "running", "w-cpu"), ("run-on-gpu", "running", "w-gpu"),
                                     ("done", "succeeded", None), ("failed-gpu", "failed", None)):
            s.get(Job, jobs[name].id).status, s.get(Job, jobs[name].id).worker_id = status, worker
    counts = {}
    with db.engine.connect() as conn:
        for name, scaled in BY_KIND["ScaledObject"].items():
            counts[name] = conn.execute(text(scaled["spec"]["triggers"][0]["metadata"]["query"])).scalar_one()
    db.dispose()
    # CPU fleet: 2 waiting CPU jobs + 1 running on a CPU worker; GPU fleet: 1 waiting GPU job + 1 on a GPU worker.
    assert counts == {"graft-worker-cpu": 3, "graft-worker-gpu": 2}
