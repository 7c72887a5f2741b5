"""The Kubernetes Job a training run becomes, built by dagster-k8s's own code, and the Helm values.

No Kubernetes API server exists here and nothing in this module tries to reach one: the
K8sRunLauncher is constructed with kube-config loading stubbed out and with a batch API that only
records the V1Job it is handed (the core API is an empty object, so any other call would fail
loudly). Everything between the run's tags and that V1Job is dagster-k8s 0.29's real code path:
K8sContainerContext.create_for_run (the `dagster-k8s/config` tag) -> construct_dagster_k8s_job.
"""

import json
import uuid
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._core.code_pointer import ModuleCodePointer
from dagster._core.launcher import LaunchRunContext
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
from dagster_k8s import launcher as k8s_launcher
from dagster_k8s.job import UserDefinedDagsterK8sConfig, get_user_defined_k8s_config

from mloc_dagster.assets.training.adapters import TRAIN_JOB
from mloc_dagster.core.state import StateStore
from mloc_dagster.definitions import defs
from mloc_dagster.execution.k8s import K8S_CONFIG_TAG, gpu_k8s_config
from mloc_dagster.runs.requests import train_run_request

REPO = Path(__file__).resolve().parents[2]
VALUES = yaml.safe_load((REPO / "deploy" / "k8s" / "values.yaml").read_text())
IMAGE = "registry.example.com/mloc/mloc-dagster:0.1.0"
GPU_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


class RecordingBatchApi:
    """Stands in for kubernetes.client.BatchV1Api: keeps the Job instead of sending it."""

    def __init__(self):
        self.created = []

    def create_namespaced_job(self, body, namespace, **_kwargs):
        self.created.append((namespace, body))
        return body


@pytest.fixture()
def k8s_launcher_and_instance(monkeypatch):
    """A K8sRunLauncher configured as deploy/k8s/values.yaml makes the chart configure it."""
    monkeypatch.setattr(k8s_launcher, "load_kubernetes_config", lambda **_kwargs: None)
    cfg = VALUES["runLauncher"]["config"]["k8sRunLauncher"]
    batch_api = RecordingBatchApi()
    launcher = k8s_launcher.K8sRunLauncher(
        # What the chart's dagsterYaml.runLauncher.k8s template renders from these values:
        service_account_name="mloc-dagster",
        instance_config_map="mloc-dagster-instance",
        postgres_password_secret=VALUES["global"]["postgresqlSecretName"],
        dagster_home=VALUES["global"]["dagsterHome"],
        job_namespace=cfg["jobNamespace"] or "mloc",
        load_incluster_config=cfg["loadInclusterConfig"],
        image_pull_policy=cfg["imagePullPolicy"],
        env_secrets=[s["name"] for s in cfg["envSecrets"]],
        env_vars=cfg["envVars"],
        volumes=cfg["volumes"],
        volume_mounts=cfg["volumeMounts"],
        resources=cfg["resources"],
        fail_pod_on_run_failure=cfg["failPodOnRunFailure"],
        k8s_client_batch_api=batch_api,
        k8s_client_core_api=object(),
    )
    with dg.instance_for_test() as instance:
        launcher.register_instance(instance)
        yield launcher, instance, batch_api


def launch(launcher, instance, batch_api, tags):
    origin = JobPythonOrigin(TRAIN_JOB, RepositoryPythonOrigin(
        executable_path="/usr/local/bin/python",
        code_pointer=ModuleCodePointer("mloc_dagster.definitions", "defs"),
        container_image=IMAGE))
    run = instance.add_run(dg.DagsterRun(job_name=TRAIN_JOB, run_id=str(uuid.uuid4()), tags=tags,
                                         job_code_origin=origin, status=dg.DagsterRunStatus.STARTING))
    launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
    (namespace, job), = batch_api.created
    return run, namespace, job


def training_run_tags(tmp_path):
    """The tags the daemon gives a sensor-requested training job: the job's, then the request's."""
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    run = store.create_run(dialect="en-gb-scotland", dataset_version="/d", base_model_version="/m",
                           timebox_s=3600, max_jobs=2, candidate_every=2)
    tags = {**defs.resolve_job_def(TRAIN_JOB).run_tags, **train_run_request(run, 0).tags}
    tags.setdefault(K8S_CONFIG_TAG, json.dumps(gpu_k8s_config()))  # until the job carries it itself
    return tags


def env_by_name(container):
    return {e.name: e for e in container.env}


def test_training_run_becomes_a_gpu_job(k8s_launcher_and_instance, tmp_path):
    launcher, instance, batch_api = k8s_launcher_and_instance
    run, namespace, job = launch(launcher, instance, batch_api, training_run_tags(tmp_path))

    assert namespace == "mloc" and job.kind == "Job" and job.metadata.name == f"dagster-run-{run.run_id}"
    pod = job.spec.template.spec
    container = pod.containers[0]
    assert container.image == IMAGE and pod.restart_policy == "Never"
    assert container.args[:5] == ["/usr/local/bin/python", "-m", "dagster", "api", "execute_run"]

    # One GPU, requested and limited; dagster-k8s deep-merges the tag into the launcher's CPU and
    # memory defaults, so the training pod keeps those too.
    assert container.resources.limits == {"nvidia.com/gpu": "1", "memory": "8Gi"}
    assert container.resources.requests == {"nvidia.com/gpu": "1", "cpu": "1", "memory": "4Gi"}

    # Node identity from the downward API: the node the pod was scheduled on.
    env = env_by_name(container)
    assert env["MLOC_NODE_ID"].value is None
    assert env["MLOC_NODE_ID"].value_from.field_ref.field_path == "spec.nodeName"

    # Scheduling onto the GPU pool.
    assert pod.node_selector == GPU_SELECTOR
    assert [t.to_dict() for t in pod.tolerations] == [{**GPU_TOLERATION, "toleration_seconds": None, "value": None}]

    # What the chart's run launcher adds: MLOC_HOME on the shared volume, secrets, the instance.
    assert env["MLOC_HOME"].value == "/mloc"
    assert env["DAGSTER_HOME"].value == VALUES["global"]["dagsterHome"]
    assert env["DAGSTER_PG_PASSWORD"].value_from.secret_key_ref.name == "dagster-postgresql-secret"
    assert "mloc-secrets" in [s.secret_ref.name for s in container.env_from if s.secret_ref]
    mounts = {m.mount_path: m.name for m in container.volume_mounts}
    assert mounts == {"/mloc": "mloc-home", "/mloc/gpu": "gpu-leases"}
    volumes = {v.name: v for v in pod.volumes}
    assert volumes["mloc-home"].persistent_volume_claim.claim_name == "mloc-home"
    assert volumes["gpu-leases"].empty_dir is not None

    assert job.metadata.labels["dagster/run-id"] == run.run_id
    assert job.spec.template.metadata.labels["dagster/job"] == TRAIN_JOB
    assert instance.get_run_by_id(run.run_id).tags["dagster/image"] == IMAGE


def test_a_slice_lands_on_the_node_it_was_placed_on(k8s_launcher_and_instance, tmp_path):
    """A slice of a distributed round: the GPU job, pinned to its pool node by the node name label."""
    from mloc_dagster.core.state.rounds import PlannedSlice
    from mloc_dagster.runs.requests import slice_run_request

    launcher, instance, batch_api = k8s_launcher_and_instance
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    run = store.create_run(dialect="en-gb-scotland", dataset_version="/d", base_model_version="/m", kind="distributed",
                           parallelism=2, round_samples=64)
    placed, = store.place_slices(run.run_id, 0, [PlannedSlice(0, "gke-gpu-pool-1-abcd", [[0, 64]], 10.0)])
    tags = {**defs.resolve_job_def(TRAIN_JOB).run_tags, **slice_run_request(run, placed).tags}
    _, _, job = launch(launcher, instance, batch_api, tags)
    pod = job.spec.template.spec
    assert pod.node_selector == {**GPU_SELECTOR, "kubernetes.io/hostname": "gke-gpu-pool-1-abcd"}
    assert pod.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    assert job.metadata.labels.get("dagster/run-id") and tags["mloc/node"] == "gke-gpu-pool-1-abcd"


def test_cpu_run_keeps_the_launcher_defaults(k8s_launcher_and_instance):
    launcher, instance, batch_api = k8s_launcher_and_instance
    _, _, job = launch(launcher, instance, batch_api, {"dagster/partition": "en-gb-scotland"})
    pod = job.spec.template.spec
    assert pod.containers[0].resources.requests == {"cpu": "1", "memory": "4Gi"}
    assert "nvidia.com/gpu" not in (pod.containers[0].resources.limits or {})
    assert not pod.node_selector and not pod.tolerations
    assert "MLOC_NODE_ID" not in env_by_name(pod.containers[0])


def test_train_job_carries_the_gpu_tag():
    tag = defs.resolve_job_def(TRAIN_JOB).run_tags[K8S_CONFIG_TAG]
    assert json.loads(tag) == gpu_k8s_config()


def test_tag_is_valid_for_run_and_step_launchers():
    """K8sRunLauncher parses the run tag; k8s_job_executor parses the same value from op tags."""
    from_tag = get_user_defined_k8s_config({K8S_CONFIG_TAG: json.dumps(gpu_k8s_config())})
    assert from_tag == UserDefinedDagsterK8sConfig.from_dict(gpu_k8s_config())
    assert from_tag.container_config["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert from_tag.pod_spec_config == {"node_selector": GPU_SELECTOR, "tolerations": [GPU_TOLERATION]}


def test_scheduling_is_configurable(monkeypatch):
    monkeypatch.setenv("MLOC_K8S_GPU_NODE_SELECTOR", '{"cloud.google.com/gke-accelerator": "nvidia-l4"}')
    monkeypatch.setenv("MLOC_K8S_GPU_TOLERATIONS", "[]")
    config = gpu_k8s_config()
    assert config["pod_spec_config"] == {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}
    assert gpu_k8s_config(node_selector={"pool": "gpu"}, tolerations=[GPU_TOLERATION])["pod_spec_config"] == {
        "node_selector": {"pool": "gpu"}, "tolerations": [GPU_TOLERATION]}
    monkeypatch.setenv("MLOC_K8S_GPU_NODE_SELECTOR", "{}")
    assert "pod_spec_config" not in gpu_k8s_config()
    monkeypatch.setenv("MLOC_K8S_GPU_TOLERATIONS", '{"key": "x"}')
    with pytest.raises(ValueError, match="MLOC_K8S_GPU_TOLERATIONS must be a JSON array"):
        gpu_k8s_config()
    monkeypatch.setenv("MLOC_K8S_GPU_TOLERATIONS", "[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        gpu_k8s_config()


def test_helm_values_have_what_the_chart_needs():
    embedded = yaml.safe_load((REPO / "dagster.yaml").read_text())

    assert VALUES["runLauncher"]["type"] == "K8sRunLauncher"
    launcher = VALUES["runLauncher"]["config"]["k8sRunLauncher"]

    user_code = VALUES["dagster-user-deployments"]
    assert user_code["enabled"] and user_code["enableSubchart"]
    (deployment,) = user_code["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", "mloc_dagster.definitions"]
    assert deployment["image"]["repository"] and deployment["image"]["tag"] and deployment["port"]
    # Code server and run pods see the same MLOC_HOME volume and the same MLOC_DATABASE_URL secret.
    assert {e["name"]: e["value"] for e in deployment["env"]}["MLOC_HOME"] == "/mloc"
    assert "MLOC_HOME=/mloc" in launcher["envVars"]
    assert [s["name"] for s in deployment["envSecrets"]] == [s["name"] for s in launcher["envSecrets"]]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in deployment["volumes"] + launcher["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims == {"mloc-home"}

    pg = VALUES["postgresql"]
    for key in ("postgresqlHost", "postgresqlUsername", "postgresqlDatabase", "postgresqlParams"):
        assert key in pg
    assert pg["service"]["port"] == 5432 and pg["postgresqlScheme"] == "postgresql+psycopg2"
    assert VALUES["global"]["postgresqlSecretName"]

    daemon = VALUES["dagsterDaemon"]
    assert daemon["enabled"] and daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    assert daemon["runRetries"] == {"enabled": True, "maxRetries": embedded["run_retries"]["max_retries"],
                                    "retryOnAssetOrOpFailure": True}
    assert daemon["runMonitoring"]["enabled"]
    assert VALUES["concurrency"]["enabled"]
    assert VALUES["concurrency"]["pools"] == {"defaultLimit": embedded["concurrency"]["pools"]["default_limit"],
                                              "granularity": embedded["concurrency"]["pools"]["granularity"]}
    # The chart refuses a run limit in both places.
    assert "maxConcurrentRuns" not in daemon["runCoordinator"]["config"]["queuedRunCoordinator"]


def test_dockerfile_pins_torch_before_the_project():
    lines = (REPO / "deploy" / "k8s" / "Dockerfile").read_text().splitlines()
    assert next(line for line in lines if line.startswith("FROM ")) == "FROM python:3.11-slim"
    torch = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line and line.startswith("RUN"))
    project = next(i for i, line in enumerate(lines) if line.startswith("RUN pip install ."))
    assert torch < project
    assert any("espeak-ng" in line for line in lines[:torch])
    assert '"mloc_dagster.definitions"' in lines[-1]
