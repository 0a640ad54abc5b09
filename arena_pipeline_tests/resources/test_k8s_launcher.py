"""The Kubernetes Pipes launcher: rendered pod specs field by field, selection from the environment, the deploy
files, and ``run()`` end to end against a fake Kubernetes API that "runs" a pod by executing its command here."""

import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import dagster as dg
import kubernetes
import pytest
import yaml
from dagster_k8s import K8sRunLauncher
from dagster_k8s.client import DagsterKubernetesClient
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
from dagster_k8s.pipes import build_pod_body

from arena_pipeline.profile import REPO_ROOT
from arena_pipeline.resources.k8s_launcher import K8sJobLauncher, k8s_launcher_from_env, k8s_resources_from_env
from arena_pipeline.resources.launcher import JobLauncher

DEPLOY = REPO_ROOT / "deploy"
TRAIN_ARGS = ["--config", "/app/gpu_jobs/configs/llm_gemma2_9b_qlora.yaml", "--fold", "0",
              "--data", "/arena-state/arena/data/processed_folds.parquet",
              "--output-dir", "/arena-state/arena/stage1/llm/fold0"]
IMAGES = {"default": "reg.example/arena:abc", "generation": "reg.example/arena-vllm:abc"}


def _launcher(**overrides) -> K8sJobLauncher:
    settings = dict(
        images=IMAGES, namespace="arena", gpus=2, environment_gpus={"generation": 1}, cpu_request="8",
        memory_request="64Gi", memory_limit="80Gi", state_pvc="arena-state", state_mount_path="/arena-state",
        node_selector={"nvidia.com/gpu.product": "A100"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        service_account="arena-jobs", image_pull_policy="Always", image_pull_secrets=["regcred"],
        env_vars={"NCCL_DEBUG": "INFO"}, env_secrets=["hf-token"],
        volumes=[{"name": "scratch", "emptyDir": {}}], volume_mounts=[{"name": "scratch", "mountPath": "/scratch"}],
    )
    settings.update(overrides)
    return K8sJobLauncher(**settings)


def _env(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"]}


# ---- rendering ---------------------------------------------------------------------------------------------------


def test_training_pod_spec_field_by_field():
    spec = _launcher().pod_spec("gpu_jobs.train", TRAIN_ARGS, "default")
    (container,) = spec["containers"]
    assert container["image"] == "reg.example/arena:abc"
    assert container["imagePullPolicy"] == "Always"
    assert container["workingDir"] == "/app"
    assert container["command"] == [
        "python", "-m", "accelerate.commands.launch", "--config_file", "gpu_jobs/accelerate_configs/gpu_multi.yaml",
        "--num_processes", "2", "-m", "gpu_jobs.train", *TRAIN_ARGS,
    ]
    assert container["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "2"},
        "limits": {"memory": "80Gi", "nvidia.com/gpu": "2"},
    }
    env = _env(container)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["NCCL_DEBUG"] == "INFO"
    assert env["ARENA_MODEL_CACHE"] == "/arena-state/cache/models"
    assert env["HF_HOME"] == "/arena-state/cache/huggingface"
    assert env["ARENA_NUM_MACHINES"] == "1" and env["ARENA_MACHINE_RANK"] == "0"
    assert container["envFrom"] == [{"secretRef": {"name": "hf-token"}}]
    assert container["volumeMounts"] == [
        {"name": "arena-state", "mountPath": "/arena-state"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": "/scratch"},
    ]
    assert spec["volumes"] == [
        {"name": "arena-state", "persistentVolumeClaim": {"claimName": "arena-state"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
        {"name": "scratch", "emptyDir": {}},
    ]
    assert spec["restartPolicy"] == "Never"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "A100"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["serviceAccountName"] == "arena-jobs"
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert "hostname" not in spec and "subdomain" not in spec  # single-node: no per-rank DNS


def test_generation_pod_uses_its_image_gpu_count_and_plain_python():
    spec = _launcher().pod_spec("gpu_jobs.generate", ["--backend", "vllm", "--seed", 42], "generation",
                                accelerate=False)
    (container,) = spec["containers"]
    assert container["image"] == "reg.example/arena-vllm:abc"
    assert container["command"] == ["python", "-m", "gpu_jobs.generate", "--backend", "vllm", "--seed", "42"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    with pytest.raises(dg.Failure, match="no image for environment 'other'"):
        _launcher().pod_spec("gpu_jobs.generate", [], "other", accelerate=False)


def test_command_is_the_local_launchers_command_in_the_image():
    """The job code runs identically: the same accelerate launch line, plus the pod's process count."""
    config = "gpu_jobs/accelerate_configs/gpu_1.yaml"
    local = JobLauncher(accelerate_config=config, environments={"default": "python"}).command(
        "gpu_jobs.train", TRAIN_ARGS, accelerate=True)
    remote = _launcher(gpus=1).command("gpu_jobs.train", TRAIN_ARGS)
    assert remote[:5] == local[:5] and remote[5:7] == ["--num_processes", "1"] and remote[7:] == local[5:]
    plain = JobLauncher(environments={"default": "python"}).command("gpu_jobs.predict", ["--tta"], accelerate=False)
    assert _launcher().command("gpu_jobs.predict", ["--tta"], accelerate=False) == plain


def test_accelerate_config_follows_the_pod_shape():
    def config(**kw):
        command = _launcher(**kw).command("gpu_jobs.train", [], job_name="arena-train-x")
        return command[command.index("--config_file") + 1]

    assert config(gpus=1).endswith("/gpu_1.yaml")
    assert config(gpus=8).endswith("/gpu_multi.yaml")
    assert config(gpus=8, num_machines=2).endswith("/multinode.yaml")
    assert config(gpus=8, accelerate_config="gpu_jobs/accelerate_configs/gpu_zero2.yaml").endswith("/gpu_zero2.yaml")
    cpu = _launcher(gpus=0)
    assert config(gpus=0).endswith("/cpu_single.yaml")
    assert "--num_processes" not in cpu.command("gpu_jobs.train", [])
    assert cpu.resources("default") == {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "80Gi"}}
    for name in ("gpu_1.yaml", "gpu_multi.yaml", "multinode.yaml", "cpu_single.yaml"):
        assert (REPO_ROOT / "gpu_jobs" / "accelerate_configs" / name).exists(), name


def test_client_adds_pipes_env_to_our_pod_and_the_spec_is_a_valid_v1pod():
    """PipesK8sClient builds the pod from base_pod_spec/base_pod_meta with build_pod_body: our fields survive
    the strict conversion to kubernetes models and the Pipes bootstrap env is appended to our static env."""
    launcher = _launcher()
    pod = build_pod_body(
        pod_name="dagster-abc-stage1-oof-0123456789", image=None, command=None,
        env_vars={"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"},
        base_pod_meta=launcher.pod_meta("gpu_jobs.train", run_id="abcdef12-3456", extras={"model": "llm_x", "fold": 0}),
        base_pod_spec=launcher.pod_spec("gpu_jobs.train", TRAIN_ARGS),
    )
    assert isinstance(pod, kubernetes.client.V1Pod)
    container = pod.spec.containers[0]
    env = {item.name: item.value for item in container.env}
    assert env["DAGSTER_PIPES_CONTEXT"] == "ctx" and env["DAGSTER_PIPES_MESSAGES"] == "msgs"
    assert env["PYTHONUNBUFFERED"] == "1" and env["NCCL_DEBUG"] == "INFO"
    assert container.image == IMAGES["default"] and container.command[-len(TRAIN_ARGS):] == TRAIN_ARGS
    assert container.resources.limits["nvidia.com/gpu"] == "2"
    assert [m.mount_path for m in container.volume_mounts] == ["/arena-state", "/dev/shm", "/scratch"]
    assert pod.spec.volumes[0].persistent_volume_claim.claim_name == "arena-state"
    assert pod.spec.node_selector == {"nvidia.com/gpu.product": "A100"}
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu"
    assert pod.spec.service_account_name == "arena-jobs"
    labels = pod.metadata.labels
    assert labels["arena-pipeline/program"] == "train" and labels["arena-pipeline/model"] == "llm_x"
    assert labels["arena-pipeline/fold"] == "0" and labels["dagster/run-id"] == "abcdef12-3456"
    assert "app.kubernetes.io/created-by" in labels or "app.kubernetes.io/part-of" in labels  # dagster's common labels


def test_multinode_ranks_share_a_main_process_and_accelerate_accepts_the_command():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    launcher = _launcher(gpus=8, num_machines=2)
    job = "arena-train-abcdef12-0a1b2c"
    host = f"{job}-0.{job}.arena.svc.cluster.local"
    for rank in (0, 1):
        spec = launcher.pod_spec("gpu_jobs.train", TRAIN_ARGS, machine_rank=rank, job_name=job)
        assert spec["hostname"] == f"{job}-{rank}" and spec["subdomain"] == job
        (container,) = spec["containers"]
        assert _env(container)["ARENA_MACHINE_RANK"] == str(rank)
        command = container["command"]
        launch_args = command[command.index("accelerate.commands.launch") + 1:]
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(launch_args))
        assert args.config_file == "gpu_jobs/accelerate_configs/multinode.yaml"
        assert (args.num_machines, args.machine_rank, args.num_processes) == (2, rank, 16)
        assert (args.main_process_ip, args.main_process_port) == (host, 29500)
        assert args.multi_gpu and args.module and args.training_script == "gpu_jobs.train"
        assert args.training_script_args == TRAIN_ARGS
    service = launcher.service_manifest(job)
    assert service["spec"]["clusterIP"] == "None" and service["metadata"]["name"] == job
    assert service["spec"]["selector"] == {"arena-pipeline/job": job}
    assert launcher.pod_meta("gpu_jobs.train", job_name=job, machine_rank=1)["labels"]["arena-pipeline/job"] == job
    k8s_model_from_dict(kubernetes.client.V1Service, k8s_snake_case_dict(kubernetes.client.V1Service, service))
    # plain programs (generation) never go multi-node
    gen = launcher.pod_spec("gpu_jobs.generate", [], "generation", accelerate=False)
    assert "hostname" not in gen and "--num_machines" not in gen["containers"][0]["command"]


# ---- selection from the environment ------------------------------------------------------------------------------


def test_resources_from_env(monkeypatch):
    monkeypatch.delenv("ARENA_LAUNCHER", raising=False)
    assert k8s_resources_from_env() is None
    monkeypatch.setenv("ARENA_LAUNCHER", "local")
    assert k8s_resources_from_env() is None

    for key, value in {
        "ARENA_LAUNCHER": "k8s", "ARENA_K8S_IMAGE": "reg/arena:1", "ARENA_K8S_IMAGE_GENERATION": "reg/vllm:1",
        "ARENA_K8S_NAMESPACE": "ml", "ARENA_K8S_GPUS": "4", "ARENA_K8S_PVC": "arena-state",
        "ARENA_K8S_STATE_PATH": "/arena-state", "ARENA_STORAGE_HOME": "/arena-state/arena",
        "ARENA_K8S_NODE_SELECTOR": "pool=gpu,zone=a", "ARENA_K8S_CPU": "16", "ARENA_K8S_MEMORY": "128Gi",
        "ARENA_K8S_ENV": '{"NCCL_DEBUG": "WARN"}', "ARENA_K8S_ENV_SECRETS": "hf-token",
        "ARENA_K8S_ENVIRONMENT_GPUS": "generation=1", "ARENA_K8S_SERVICE_ACCOUNT": "jobs",
    }.items():
        monkeypatch.setenv(key, value)
    resources = k8s_resources_from_env()
    launcher = resources["launcher"]
    assert set(resources) == {"launcher"} and isinstance(launcher, K8sJobLauncher)
    assert launcher.images == {"default": "reg/arena:1", "generation": "reg/vllm:1"}
    assert (launcher.namespace, launcher.gpus, launcher.environment_gpus) == ("ml", 4, {"generation": 1})
    assert (launcher.state_pvc, launcher.state_mount_path) == ("arena-state", "/arena-state")
    assert launcher.node_selector == {"pool": "gpu", "zone": "a"}
    assert launcher.tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert (launcher.cpu_request, launcher.memory_request, launcher.service_account) == ("16", "128Gi", "jobs")
    assert launcher.env_vars == {"NCCL_DEBUG": "WARN"} and launcher.env_secrets == ["hf-token"]
    container = launcher.pod_spec("gpu_jobs.train", [])["containers"][0]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    assert container["command"][4] == "gpu_jobs/accelerate_configs/gpu_multi.yaml"

    monkeypatch.setenv("ARENA_STORAGE_HOME", "/elsewhere/arena")
    with pytest.raises(ValueError, match="ARENA_STORAGE_HOME"):
        k8s_resources_from_env()  # the jobs would not see the files the assets hand them
    monkeypatch.setenv("ARENA_STORAGE_HOME", "/arena-state/arena")
    monkeypatch.setenv("ARENA_K8S_GPUS", "two")
    with pytest.raises(ValueError, match="ARENA_K8S_GPUS must be an integer"):
        k8s_resources_from_env()
    monkeypatch.setenv("ARENA_K8S_GPUS", "4")
    monkeypatch.delenv("ARENA_K8S_IMAGE")
    with pytest.raises(ValueError, match="ARENA_K8S_IMAGE"):
        k8s_resources_from_env()
    monkeypatch.setenv("ARENA_LAUNCHER", "slurm")
    with pytest.raises(ValueError, match="ARENA_LAUNCHER must be"):
        k8s_resources_from_env()


def test_launcher_is_a_dagster_resource_in_definitions(monkeypatch):
    monkeypatch.setenv("ARENA_LAUNCHER", "k8s")
    monkeypatch.setenv("ARENA_K8S_IMAGE", "reg/arena:1")

    @dg.asset
    def needs_launcher(launcher: JobLauncher) -> None:  # the assets annotate the local class; any launcher fits
        pass

    defs = dg.Definitions(assets=[needs_launcher], resources=k8s_resources_from_env())
    dg.Definitions.validate_loadable(defs)
    assert isinstance(defs.resources["launcher"], K8sJobLauncher)


# ---- deploy files ------------------------------------------------------------------------------------------------


def test_deploy_files_agree_with_the_launcher():
    values = yaml.safe_load((DEPLOY / "k8s" / "dagster-values.yaml").read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    env = {item["name"]: item["value"] for item in deployment["env"]}
    launcher = k8s_launcher_from_env(env)  # the run pods inherit this env (includeConfigInLaunchedRuns)
    spec = launcher.pod_spec("gpu_jobs.train", TRAIN_ARGS)
    # the job pods mount the claim at the path the code server and run pods mount it
    run_mounts = {(m["name"], m["mountPath"]) for m in deployment["volumeMounts"] if "subPath" not in m}
    job_mounts = {(m["name"], m["mountPath"]) for m in spec["containers"][0]["volumeMounts"]}
    assert run_mounts <= job_mounts
    claims = {v["persistentVolumeClaim"]["claimName"] for v in deployment["volumes"]}
    assert claims == {launcher.state_pvc} == {yaml.safe_load((DEPLOY / "k8s" / "pvc.yaml").read_text())["metadata"]["name"]}
    assert env["ARENA_STORAGE_HOME"].startswith(launcher.state_mount_path + "/")
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    for item in deployment["volumes"]:
        k8s_model_from_dict(kubernetes.client.V1Volume, k8s_snake_case_dict(kubernetes.client.V1Volume, item))
    for item in deployment["volumeMounts"]:
        k8s_model_from_dict(kubernetes.client.V1VolumeMount,
                            k8s_snake_case_dict(kubernetes.client.V1VolumeMount, item))

    instance = yaml.safe_load((DEPLOY / "k8s" / "dagster.yaml").read_text())
    assert instance["run_launcher"]["class"] == "K8sRunLauncher"
    # every key of the run launcher's config is one K8sRunLauncher declares (its public config schema)
    schema = K8sRunLauncher.config_type()
    unknown = set(instance["run_launcher"]["config"]) - set(schema)
    missing = {key for key, field in schema.items() if field.is_required} - set(instance["run_launcher"]["config"])
    assert not unknown and not missing, (unknown, missing)
    env_vars = dict(item.split("=", 1) for item in instance["run_launcher"]["config"]["env_vars"])
    assert k8s_launcher_from_env(env_vars).pod_spec("gpu_jobs.train", [])["volumes"][0] == spec["volumes"][0]

    for name in ("pvc.yaml", "rbac.yaml", "example-train-pod.yaml"):
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()):
            model = getattr(kubernetes.client, f"V1{doc['kind']}")
            k8s_model_from_dict(model, k8s_snake_case_dict(model, doc))  # strict: unknown keys fail
    rules = yaml.safe_load_all((DEPLOY / "k8s" / "rbac.yaml").read_text())
    verbs = {res: set(rule["verbs"]) for rule in next(rules)["rules"] for res in rule["resources"]}
    assert {"create", "delete", "list", "get"} <= verbs["pods"] and "get" in verbs["pods/log"]
    assert {"create", "delete"} <= verbs["services"]
    example = yaml.safe_load((DEPLOY / "k8s" / "example-train-pod.yaml").read_text())
    assert example["spec"]["containers"][0]["command"][2] == "accelerate.commands.launch"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and launcher.working_dir == "/app"
    assert "AS job" in dockerfile and "AS vllm" in dockerfile


# ---- run() against a fake Kubernetes API -------------------------------------------------------------------------


class _Log(list):
    """What read_namespaced_pod_log(_preload_content=False) returns: an iterable of byte chunks with .data."""

    @property
    def data(self) -> bytes:
        return b"".join(self)


class FakeCoreApi:
    """The CoreV1Api calls PipesK8sClient and the launcher make. A created pod 'runs' at once: with execute=True
    its command runs here (with its env and working dir) and its merged output becomes the pod log."""

    def __init__(self, execute: bool = True):
        self.execute = execute
        self.pods: dict[str, kubernetes.client.V1Pod] = {}
        self.results: dict[str, tuple[int, list[bytes]]] = {}
        self.deleted_pods: list[str] = []
        self.services: list[dict] = []
        self.deleted_services: list[str] = []

    def create_namespaced_pod(self, namespace, body):
        assert namespace == "arena"
        name = body.metadata.name
        self.pods[name] = body
        container = body.spec.containers[0]
        if self.execute and any(e.name == "DAGSTER_PIPES_CONTEXT" for e in container.env):
            env = {**os.environ, **{e.name: e.value for e in container.env}}
            proc = subprocess.run(container.command, cwd=container.working_dir, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=120)
            code, lines = proc.returncode, [line for line in proc.stdout.splitlines() if line.strip()]
        else:
            code, lines = 0, [f"rank {body.metadata.labels.get('arena-pipeline/rank')} done"]
        start = datetime(2026, 1, 1, tzinfo=timezone.utc)
        stamp = lambda i: (start + timedelta(milliseconds=i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # noqa: E731
        self.results[name] = (code, [f"{stamp(i)} {line}\n".encode() for i, line in enumerate(lines)])

    def list_namespaced_pod(self, namespace, field_selector):
        name = field_selector.split("=", 1)[1]
        if name not in self.results:
            return SimpleNamespace(items=[])
        code = self.results[name][0]
        terminated = SimpleNamespace(exit_code=code, message=None, reason="Error" if code else "Completed")
        status = SimpleNamespace(name="job", ready=False,
                                 state=SimpleNamespace(running=None, waiting=None, terminated=terminated))
        return SimpleNamespace(items=[SimpleNamespace(status=SimpleNamespace(init_container_statuses=None,
                                                                             container_statuses=[status]))])

    def read_namespaced_pod_log(self, name, namespace, **kwargs):
        chunks = self.results[name][1]
        tail = kwargs.get("tail_lines")
        return _Log(chunks[-tail:] if tail else chunks)

    def delete_namespaced_pod(self, name, namespace):
        self.deleted_pods.append(name)

    def create_namespaced_service(self, namespace, body):
        self.services.append(body)

    def delete_namespaced_service(self, name, namespace):
        self.deleted_services.append(name)


@pytest.fixture
def fake_api(monkeypatch):
    api = FakeCoreApi()
    # no cluster here: the kubernetes package's public config loaders (what the Pipes client and the launcher call)
    monkeypatch.setattr(kubernetes.config, "load_kube_config", lambda *a, **k: None)
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda *a, **k: None)
    monkeypatch.setattr(DagsterKubernetesClient, "production_client", staticmethod(
        lambda *a, **k: DagsterKubernetesClient(batch_api=None, core_api=api, logger=lambda msg: None,
                                                sleeper=lambda s: None, timer=time.time)))
    return api


def _local_pod_launcher(**overrides) -> K8sJobLauncher:
    """A launcher whose 'image' is this machine: this python, this repository as working dir."""
    return _launcher(python=sys.executable, working_dir=str(REPO_ROOT), poll_interval_s=0.01, **overrides)


def _fake_asset(mode: str, module: str = "arena_pipeline_tests.resources.fake_jobs", **run_kwargs):
    @dg.asset(name=f"k8s_fake_{mode}")
    def _asset(context: dg.AssetExecutionContext, launcher: JobLauncher):
        result = launcher.run(context, module, [mode], extras={"model": "fake", "fold": 0}, **run_kwargs)
        return dg.MaterializeResult(metadata={**result.metadata, "command": " ".join(result.command),
                                              "wall_s": result.wall_s})

    return _asset


def test_run_submits_the_pod_and_pipes_metadata_comes_back(fake_api):
    result = dg.materialize([_fake_asset("report", accelerate=False)],
                            resources={"launcher": _local_pod_launcher()})
    assert result.success
    metadata = result.asset_materializations_for_node("k8s_fake_report")[0].metadata
    assert metadata["val_log_loss"].value == pytest.approx(0.95) and metadata["n_val"].value == 12
    (name, pod), = fake_api.pods.items()
    container = pod.spec.containers[0]
    assert container.command == [sys.executable, "-m", "arena_pipeline_tests.resources.fake_jobs", "report"]
    assert container.image == IMAGES["default"]
    assert container.resources.limits["nvidia.com/gpu"] == "2"
    assert {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES", "PYTHONUNBUFFERED", "NCCL_DEBUG"} <= {
        e.name for e in container.env}
    assert pod.metadata.labels["arena-pipeline/model"] == "fake"
    assert pod.metadata.labels["dagster/run-id"] == result.run_id
    assert fake_api.deleted_pods == [name]  # finished pods are cleaned up
    assert metadata["command"].text.endswith("fake_jobs report")


def test_failed_pod_fails_the_asset_with_the_log_tail(fake_api):
    result = dg.materialize([_fake_asset("fail", accelerate=False)], resources={"launcher": _local_pod_launcher()},
                            raise_on_error=False)
    assert not result.success
    description = result.failure_data_for_node("k8s_fake_fail").user_failure_data.description
    assert "pod(s)" in description and "namespace 'arena' failed" in description
    assert "ValueError: the real cause is here" in description
    assert len(fake_api.deleted_pods) == 1


def test_multinode_run_creates_workers_and_service_then_removes_them(fake_api):
    fake_api.execute = False  # the ranks only 'run'; the submitted objects are what is checked
    launcher = _local_pod_launcher(num_machines=3, gpus=8)
    result = dg.materialize([_fake_asset("noop", module="gpu_jobs.train")], resources={"launcher": launcher})
    assert result.success
    assert len(fake_api.pods) == 3 and len(fake_api.services) == 1
    job = fake_api.services[0]["metadata"]["name"]
    ranks = {}
    for name, pod in fake_api.pods.items():
        command = pod.spec.containers[0].command
        rank = int(command[command.index("--machine_rank") + 1])
        ranks[rank] = name
        assert pod.spec.hostname == f"{job}-{rank}" and pod.spec.subdomain == job
        assert pod.metadata.labels["arena-pipeline/job"] == job
        assert command[command.index("--main_process_ip") + 1] == f"{job}-0.{job}.arena.svc.cluster.local"
        assert command[command.index("--num_processes") + 1] == "24"
        has_pipes = any(e.name == "DAGSTER_PIPES_CONTEXT" for e in pod.spec.containers[0].env)
        assert has_pipes == (rank == 0)  # only rank 0 talks to Dagster
    assert sorted(ranks) == [0, 1, 2] and ranks[1] == f"{job}-1"
    assert sorted(fake_api.deleted_pods) == sorted(fake_api.pods) and fake_api.deleted_services == [job]
