"""The Kubernetes Pipes launcher: rendered pod specs field by field, selection from the environment, the deploy
files, and ``run()`` end to end against a fake Kubernetes API that "runs" a pod by executing its command here."""

import inspect
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import dagster as dg
import kubernetes
import pytest
import yaml
from dagster_k8s import K8sRunLauncher
from dagster_k8s.client import DagsterKubernetesClient
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
from dagster_k8s.pipes import build_pod_body

from arena_pipeline.definitions import PROFILE, build_launcher
from arena_pipeline.profile import REPO_ROOT
from arena_pipeline.resources.k8s_launcher import K8sJobLauncher
from arena_pipeline.resources.launcher import JobLauncher
from arena_pipeline.resources.launching import Launcher

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
    assert env["ARENA_NUM_MACHINES"] == "1"
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
    assert container["name"] == "job" and "ports" not in container  # single-node: no rendezvous port


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
        own = kw.pop("own", None)
        command = _launcher(**kw).command("gpu_jobs.train", [], accelerate_config=own)
        return command[command.index("--config_file") + 1]

    assert config(gpus=1).endswith("/gpu_1.yaml")
    assert config(gpus=8).endswith("/gpu_multi.yaml")
    assert config(gpus=8, num_machines=2).endswith("/multinode.yaml")
    assert config(gpus=8, accelerate_config="gpu_jobs/accelerate_configs/gpu_zero2.yaml").endswith("/gpu_zero2.yaml")
    assert config(gpus=8, own="gpu_zero3.yaml") == "gpu_jobs/accelerate_configs/gpu_zero3.yaml"  # a member's own
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


def _expand(command: list[str], env: dict[str, str]) -> list[str]:
    """What the kubelet does to a container command: $(VAR) -> the value of the container's env var VAR."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), part) for part in command]


def _operator_env(name: str, rank: int, replicas: int, port: int) -> dict[str, str]:
    """The env the Kubeflow training operator appends to each replica's containers (pytorch/envvar.go, master.go)."""
    return {"PYTHONUNBUFFERED": "0", "MASTER_PORT": str(port), "MASTER_ADDR": f"{name}-master-0",
            "WORLD_SIZE": str(replicas), "RANK": str(rank)}


def test_pytorchjob_manifest_replicas_env_resources_and_labels():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    launcher = _launcher(gpus=8, num_machines=3)
    pipes_env = {"DAGSTER_PIPES_CONTEXT": "ctx", "DAGSTER_PIPES_MESSAGES": "msgs"}
    job = launcher.pytorchjob_manifest("arena-train-abcdef12-0a1b2c", "gpu_jobs.train", TRAIN_ARGS,
                                       run_id="abcdef12-3456", extras={"model": "llm_x", "fold": 0},
                                       pipes_env=pipes_env)
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["metadata"]["name"] == "arena-train-abcdef12-0a1b2c" and job["metadata"]["namespace"] == "arena"
    assert job["metadata"]["labels"]["dagster/run-id"] == "abcdef12-3456"
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["runPolicy"]["backoffLimit"] == 0 and spec["runPolicy"]["cleanPodPolicy"] == "Running"
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    for role, replica in replicas.items():
        assert replica["restartPolicy"] == "Never"
        template = replica["template"]
        labels = template["metadata"]["labels"]
        assert labels["dagster/run-id"] == "abcdef12-3456" and labels["arena-pipeline/model"] == "llm_x"
        assert labels["arena-pipeline/job"] == "arena-train-abcdef12-0a1b2c"
        (container,) = template["spec"]["containers"]
        assert container["name"] == "pytorch"  # the operator sets its env in, and validates, this container
        assert container["ports"] == [{"name": "pytorchjob-port", "containerPort": 29500}]
        assert container["image"] == IMAGES["default"]
        assert container["resources"] == {"requests": {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "8"},
                                          "limits": {"memory": "80Gi", "nvidia.com/gpu": "8"}}
        assert [m["mountPath"] for m in container["volumeMounts"]] == ["/arena-state", "/dev/shm", "/scratch"]
        assert template["spec"]["volumes"][0] == {"name": "arena-state",
                                                  "persistentVolumeClaim": {"claimName": "arena-state"}}
        assert template["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "A100"}
        env = _env(container)
        assert env["ARENA_NUM_MACHINES"] == "3" and env["NCCL_DEBUG"] == "INFO"
        # only the master talks to Dagster (the global main process opens Pipes)
        assert ({k: env[k] for k in pipes_env if k in env} == pipes_env) == (role == "Master")
        assert role == "Master" or not set(pipes_env) & set(env)
        # a valid pod template for the API server
        k8s_model_from_dict(kubernetes.client.V1PodTemplateSpec,
                            k8s_snake_case_dict(kubernetes.client.V1PodTemplateSpec, template))
    # every replica's command, with the operator's env expanded, is one accelerate accepts, rank by rank
    command = replicas["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert command == replicas["Master"]["template"]["spec"]["containers"][0]["command"]
    for rank in range(3):
        expanded = _expand(command, _operator_env(job["metadata"]["name"], rank, 3, 29500))
        launch_args = expanded[expanded.index("accelerate.commands.launch") + 1:]
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(launch_args))
        assert args.config_file == "gpu_jobs/accelerate_configs/multinode.yaml"
        assert (args.num_machines, args.machine_rank, args.num_processes) == (3, rank, 24)
        assert (args.main_process_ip, args.main_process_port) == ("arena-train-abcdef12-0a1b2c-master-0", 29500)
        assert args.multi_gpu and args.module and args.training_script == "gpu_jobs.train"
        assert args.training_script_args == TRAIN_ARGS
    # a member's own accelerate config reaches every replica; plain programs (generation) never go multi-node
    own = launcher.pytorchjob_manifest("j", "gpu_jobs.train", [], accelerate_config="gpu_zero2.yaml")
    assert own["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"][4] == \
        "gpu_jobs/accelerate_configs/gpu_zero2.yaml"
    gen = launcher.pod_spec("gpu_jobs.generate", [], "generation", accelerate=False)
    assert gen["containers"][0]["name"] == "job" and "--num_machines" not in gen["containers"][0]["command"]
    with pytest.raises(ValueError, match="several machines"):
        _launcher().pytorchjob_manifest("j", "gpu_jobs.train", [])

# ---- selection from the environment ------------------------------------------------------------------------------


K8S_ENV = {
    "ARENA_LAUNCHER": "k8s", "ARENA_K8S_IMAGE": "reg/arena:1", "ARENA_K8S_IMAGE_GENERATION": "reg/vllm:1",
    "ARENA_K8S_NAMESPACE": "ml", "ARENA_K8S_GPUS": "4", "ARENA_K8S_PVC": "arena-state",
    "ARENA_K8S_STATE_PATH": "/arena-state", "ARENA_STORAGE_HOME": "/arena-state/arena",
    "ARENA_K8S_NODE_SELECTOR": "pool=gpu,zone=a", "ARENA_K8S_CPU": "16", "ARENA_K8S_MEMORY": "128Gi",
    "ARENA_K8S_ENV": '{"NCCL_DEBUG": "WARN"}', "ARENA_K8S_ENV_SECRETS": "hf-token",
    "ARENA_K8S_ENVIRONMENT_GPUS": "generation=1", "ARENA_K8S_SERVICE_ACCOUNT": "jobs",
    "ARENA_K8S_NUM_MACHINES": "2",
}


def _set_env(monkeypatch, env: dict[str, str]) -> None:
    for key in [k for k in os.environ if k.startswith("ARENA_K8S_") or k in ("ARENA_LAUNCHER", "ARENA_STORAGE_HOME")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_launcher_config_from_env(monkeypatch):
    _set_env(monkeypatch, {})
    assert isinstance(build_launcher(PROFILE), JobLauncher)
    monkeypatch.setenv("ARENA_LAUNCHER", "local")
    assert isinstance(build_launcher(PROFILE), JobLauncher)

    _set_env(monkeypatch, K8S_ENV)
    configured = build_launcher(PROFILE)
    assert isinstance(configured, K8sJobLauncher)
    # strings and numbers are dg.EnvVar config (the UI shows the variable), resolved when the resource starts
    assert configured.gpus.env_var_name == "ARENA_K8S_GPUS"
    assert configured.namespace.env_var_name == "ARENA_K8S_NAMESPACE"
    launcher = configured.process_config_and_initialize()
    assert launcher.images == {"default": "reg/arena:1", "generation": "reg/vllm:1"}
    assert (launcher.namespace, launcher.gpus, launcher.num_machines) == ("ml", 4, 2)
    assert launcher.environment_gpus == {"generation": 1}
    assert (launcher.state_pvc, launcher.state_mount_path) == ("arena-state", "/arena-state")
    assert launcher.node_selector == {"pool": "gpu", "zone": "a"}
    assert (launcher.cpu_request, launcher.memory_request, launcher.service_account) == ("16", "128Gi", "jobs")
    assert launcher.env_vars == {"NCCL_DEBUG": "WARN"} and launcher.env_secrets == ["hf-token"]
    assert launcher.delete_pods and launcher.tolerations is None
    spec = launcher.pod_spec("gpu_jobs.train", [], accelerate=False)
    assert spec["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "4"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert launcher.pod_spec("gpu_jobs.train", [], accelerate=True)["containers"][0]["command"][4] == \
        "gpu_jobs/accelerate_configs/multinode.yaml"
    assert "tolerations" not in launcher.model_copy(update={"gpus": 0}).pod_spec("gpu_jobs.train", [])

    # a bad value names its variable
    monkeypatch.setenv("ARENA_K8S_GPUS", "two")
    with pytest.raises(dg.DagsterInvalidConfigError, match='"ARENA_K8S_GPUS" cannot be coerced into an int'):
        build_launcher(PROFILE).process_config_and_initialize()
    monkeypatch.setenv("ARENA_K8S_GPUS", "4")
    monkeypatch.delenv("ARENA_K8S_IMAGE")
    with pytest.raises(Exception, match="ARENA_K8S_IMAGE"):
        build_launcher(PROFILE).process_config_and_initialize()
    monkeypatch.setenv("ARENA_K8S_IMAGE", "reg/arena:1")
    monkeypatch.setenv("ARENA_K8S_ENVIRONMENT_GPUS", "generation=one")
    with pytest.raises(ValueError, match="ARENA_K8S_ENVIRONMENT_GPUS"):
        build_launcher(PROFILE)
    monkeypatch.setenv("ARENA_K8S_ENVIRONMENT_GPUS", "generation=1")
    monkeypatch.setenv("ARENA_K8S_TOLERATIONS", '{"key": "x"}')
    with pytest.raises(ValueError, match="ARENA_K8S_TOLERATIONS must be a JSON list"):
        build_launcher(PROFILE)
    monkeypatch.delenv("ARENA_K8S_TOLERATIONS")
    monkeypatch.setenv("ARENA_STORAGE_HOME", "/elsewhere/arena")
    with pytest.raises(ValueError, match="ARENA_STORAGE_HOME"):
        build_launcher(PROFILE)  # the jobs would not see the files the assets hand them
    monkeypatch.setenv("ARENA_LAUNCHER", "slurm")
    with pytest.raises(ValueError, match="ARENA_LAUNCHER must be"):
        build_launcher(PROFILE)


def test_both_backends_are_the_one_launcher_interface(monkeypatch):
    _set_env(monkeypatch, {"ARENA_LAUNCHER": "k8s", "ARENA_K8S_IMAGE": "reg/arena:1"})
    with pytest.raises(TypeError, match="abstract"):
        Launcher()
    run = inspect.signature(Launcher.run)
    for backend in (JobLauncher, K8sJobLauncher):
        assert issubclass(backend, Launcher) and inspect.signature(backend.run) == run, backend

    @dg.asset
    def needs_launcher(launcher: Launcher) -> None:  # what the assets annotate
        pass

    defs = dg.Definitions(assets=[needs_launcher], resources={"launcher": build_launcher(PROFILE)})
    dg.Definitions.validate_loadable(defs)
    assert isinstance(defs.resources["launcher"], K8sJobLauncher)
    assert not JobLauncher(environments={"generation": "/no/such/python"}).has_environment("generation")
    assert K8sJobLauncher(images=IMAGES).has_environment("generation")
    assert not K8sJobLauncher(images={"default": "x"}).has_environment("generation")

# ---- deploy files ------------------------------------------------------------------------------------------------


EXAMPLE_ARGS = ["--config", "/app/gpu_jobs/configs/llm_gemma2_9b_qlora.yaml", "--fold", "0",
                "--data", "/arena-state/arena/data/processed_folds.parquet",
                "--output-dir", "/arena-state/arena/stage1/llm_gemma2_9b_qlora/fold0"]


def _launcher_from(monkeypatch, env: dict[str, str]) -> K8sJobLauncher:
    """The launcher definitions.py builds under ``env``, its dg.EnvVar settings resolved as at run start."""
    _set_env(monkeypatch, env)
    return build_launcher(PROFILE).process_config_and_initialize()


def test_deploy_files_agree_with_the_launcher(monkeypatch):
    values = yaml.safe_load((DEPLOY / "k8s" / "dagster-values.yaml").read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    env = {item["name"]: item["value"] for item in deployment["env"]}
    launcher = _launcher_from(monkeypatch, env)  # the run pods inherit this env (includeConfigInLaunchedRuns)
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

    # the example renderings are what the launcher submits under these values (regenerate them with the CLI)
    example = yaml.safe_load((DEPLOY / "k8s" / "example-train-pod.yaml").read_text())
    assert example == launcher.pod_manifest("gpu_jobs.train", EXAMPLE_ARGS, job_name="arena-example")
    multinode = launcher.model_copy(update={"num_machines": 2})
    example_job = yaml.safe_load((DEPLOY / "k8s" / "example-train-pytorchjob.yaml").read_text())
    assert example_job == multinode.pytorchjob_manifest("arena-example", "gpu_jobs.train", EXAMPLE_ARGS)
    for replica in example_job["spec"]["pytorchReplicaSpecs"].values():
        k8s_model_from_dict(kubernetes.client.V1PodTemplateSpec,
                            k8s_snake_case_dict(kubernetes.client.V1PodTemplateSpec, replica["template"]))

    instance = yaml.safe_load((DEPLOY / "k8s" / "dagster.yaml").read_text())
    assert instance["run_launcher"]["class"] == "K8sRunLauncher"
    # every key of the run launcher's config is one K8sRunLauncher declares (its public config schema)
    schema = K8sRunLauncher.config_type()
    unknown = set(instance["run_launcher"]["config"]) - set(schema)
    missing = {key for key, field in schema.items() if field.is_required} - set(instance["run_launcher"]["config"])
    assert not unknown and not missing, (unknown, missing)
    env_vars = dict(item.split("=", 1) for item in instance["run_launcher"]["config"]["env_vars"])
    assert _launcher_from(monkeypatch, env_vars).pod_spec("gpu_jobs.train", [])["volumes"][0] == spec["volumes"][0]

    for name in ("pvc.yaml", "rbac.yaml", "example-train-pod.yaml"):
        for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()):
            model = getattr(kubernetes.client, f"V1{doc['kind']}")
            k8s_model_from_dict(model, k8s_snake_case_dict(model, doc))  # strict: unknown keys fail
    rules = next(yaml.safe_load_all((DEPLOY / "k8s" / "rbac.yaml").read_text()))["rules"]
    verbs = {(group, res): set(rule["verbs"]) for rule in rules for group in rule["apiGroups"]
             for res in rule["resources"]}
    assert {"create", "delete", "list", "get"} <= verbs[("", "pods")] and "get" in verbs[("", "pods/log")]
    assert {"create", "get", "delete"} <= verbs[("kubeflow.org", "pytorchjobs")]
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
        self.pods: dict[str, Any] = {}
        self.results: dict[str, tuple[int, list[str]]] = {}
        self.deleted_pods: list[str] = []

    def create_namespaced_pod(self, namespace, body):
        assert namespace == "arena"
        name = body.metadata.name
        self.pods[name] = body
        container = body.spec.containers[0]
        if self.execute and any(e.name == "DAGSTER_PIPES_CONTEXT" for e in container.env):
            env = {**os.environ, **{e.name: e.value for e in container.env}}
            proc = subprocess.run(container.command, cwd=container.working_dir, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=120)
            self.finish(name, proc.returncode, proc.stdout.splitlines())
        else:
            self.finish(name, 0, [f"{name} done"])

    def finish(self, name: str, code: int, lines: list[str]) -> None:
        self.results[name] = (code, [line for line in lines if line.strip()])

    def _status(self, name: str):
        code = self.results[name][0]
        terminated = SimpleNamespace(exit_code=code, message=None, reason="Error" if code else "Completed")
        container = SimpleNamespace(name="job", ready=False,
                                    state=SimpleNamespace(running=None, waiting=None, terminated=terminated))
        return SimpleNamespace(phase="Failed" if code else "Succeeded", init_container_statuses=None,
                               container_statuses=[container])

    def read_namespaced_pod(self, name, namespace):
        if name not in self.results:
            raise kubernetes.client.ApiException(status=404, reason="Not Found")
        return SimpleNamespace(metadata=SimpleNamespace(name=name), status=self._status(name))

    def list_namespaced_pod(self, namespace, field_selector=None, label_selector=None):
        if field_selector:
            names = [field_selector.split("=", 1)[1]]
        else:
            key, value = label_selector.split("=", 1)
            names = [name for name, pod in self.pods.items() if pod.metadata.labels.get(key) == value]
        return SimpleNamespace(items=[self.read_namespaced_pod(name, namespace) for name in names
                                      if name in self.results])

    def read_namespaced_pod_log(self, name, namespace, **kwargs):
        """Like the API: a stream of timestamped byte chunks with _preload_content=False, else the text."""
        lines = self.results[name][1]
        tail = kwargs.get("tail_lines")
        lines = lines[-tail:] if tail else lines
        if kwargs.get("_preload_content", True):
            return "".join(f"{line}\n" for line in lines)
        start = datetime(2026, 1, 1, tzinfo=timezone.utc)
        stamp = lambda i: (start + timedelta(milliseconds=i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # noqa: E731
        return _Log(f"{stamp(i)} {line}\n".encode() for i, line in enumerate(lines))

    def delete_namespaced_pod(self, name, namespace):
        self.deleted_pods.append(name)


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
    def _asset(context: dg.AssetExecutionContext, launcher: Launcher):
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


class FakeCustomObjectsApi:
    """The CustomObjectsApi calls of the multi-node path, with the training operator's part played here: a created
    PyTorchJob gets its pods in ``core`` (named and labelled as the operator names them, with its env appended);
    the master 'runs' its job program here (what accelerate would start as the main process, with the pod's env,
    the command's $(VAR)s expanded) and its output becomes the master pod's log. The job reports Running once,
    then Succeeded or Failed from the master's exit code."""

    def __init__(self, core: FakeCoreApi, fail_on_poll: BaseException | None = None):
        self.core, self.fail_on_poll = core, fail_on_poll
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.polls = 0

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural, namespace) == ("kubeflow.org", "v1", "pytorchjobs", "arena")
        self.created.append(body)
        name = body["metadata"]["name"]
        replicas = body["spec"]["pytorchReplicaSpecs"]
        total = sum(replica["replicas"] for replica in replicas.values())
        roles = [("master", 0, replicas["Master"])] + [("worker", i, replicas["Worker"])
                                                        for i in range(replicas["Worker"]["replicas"])]
        for role, index, replica in roles:
            rank = index + (role == "worker")
            template = replica["template"]
            container = template["spec"]["containers"][0]
            port = container["ports"][0]["containerPort"]
            env = {**{e["name"]: e["value"] for e in container["env"]}, **_operator_env(name, rank, total, port)}
            command = _expand(container["command"], env)
            pod = f"{name}-{role}-{index}"
            self.core.pods[pod] = SimpleNamespace(metadata=SimpleNamespace(name=pod, labels=template["metadata"]["labels"]),
                                                  command=command, env=env)
            if role == "master":
                program = command[command.index("-m", 3) + 1:]  # `-m <module> <args>` after accelerate's options
                proc = subprocess.run([sys.executable, "-m", *program], cwd=str(REPO_ROOT),
                                      env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, timeout=120)
                self.core.finish(pod, proc.returncode, proc.stdout.splitlines())
            else:
                self.core.finish(pod, 0, [f"worker {index} done"])

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.polls += 1
        if self.fail_on_poll is not None and self.polls == 2:
            raise self.fail_on_poll
        conditions = [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}]
        if self.polls > 1:
            code = self.core.results[f"{name}-master-0"][0]
            conditions.append({"type": "Failed", "status": "True", "reason": "PyTorchJobFailed",
                               "message": f"PyTorchJob {name} is failed because 1 Master replica(s) failed."}
                              if code else {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded",
                                            "message": f"PyTorchJob {name} is successfully completed."})
        return {"metadata": {"name": name}, "status": {"conditions": conditions}}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, propagation_policy=None):
        self.deleted.append(name)


@pytest.fixture
def fake_operator(fake_api, monkeypatch):
    custom = FakeCustomObjectsApi(fake_api)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda *a, **k: fake_api)
    monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", lambda *a, **k: custom)
    return custom


def _multinode_asset(mode: str, received: list, extra: list[str] = ()):
    @dg.asset(name=f"k8s_multinode_{mode}")
    def _asset(context: dg.AssetExecutionContext, launcher: Launcher):
        result = launcher.run(context, "arena_pipeline_tests.resources.fake_jobs", [mode, *extra],
                              extras={"model": "fake", "fold": 0}, on_message=received.append)
        return dg.MaterializeResult(metadata={**result.metadata, "command": " ".join(result.command)})

    return _asset


def test_multinode_run_is_a_pytorchjob_whose_master_reports_through_pipes(fake_operator, fake_api, tmp_path):
    go = tmp_path / "go"
    go.write_text("")  # the `steps` job finishes at once
    received: list = []
    launcher = _local_pod_launcher(num_machines=3, gpus=8)
    result = dg.materialize([_multinode_asset("steps", received, [str(go)])], resources={"launcher": launcher})
    assert result.success
    (job,) = fake_operator.created
    name = job["metadata"]["name"]
    assert job["metadata"]["labels"]["dagster/run-id"] == result.run_id
    assert sorted(fake_api.pods) == [f"{name}-master-0", f"{name}-worker-0", f"{name}-worker-1"]
    ranks = {pod: fake_api.pods[pod].command[fake_api.pods[pod].command.index("--machine_rank") + 1]
             for pod in fake_api.pods}
    assert ranks == {f"{name}-master-0": "0", f"{name}-worker-0": "1", f"{name}-worker-1": "2"}
    assert ["DAGSTER_PIPES_CONTEXT" in fake_api.pods[pod].env for pod in sorted(ranks)] == [True, False, False]
    # the master's Pipes messages came back from its log: the materialization's metadata and the step messages
    metadata = result.asset_materializations_for_node("k8s_multinode_steps")[0].metadata
    assert metadata["val_log_loss"].value == pytest.approx(0.9)
    assert [m["step"] for m in received] == [1, 2] and received[1]["loss"] == pytest.approx(0.5)
    assert "--num_machines 3 --machine_rank $(RANK)" in metadata["command"].text
    assert fake_operator.deleted == [name]  # the job (and with it its pods) is removed when done


def test_failed_pytorchjob_fails_the_asset_with_its_cause_and_is_deleted(fake_operator, fake_api):
    launcher = _local_pod_launcher(num_machines=2, gpus=1)
    result = dg.materialize([_multinode_asset("fail", [])], resources={"launcher": launcher}, raise_on_error=False)
    assert not result.success
    description = result.failure_data_for_node("k8s_multinode_fail").user_failure_data.description
    (job,) = fake_operator.created
    name = job["metadata"]["name"]
    assert f"PyTorchJob '{name}' in namespace 'arena' failed" in description
    assert "1 Master replica(s) failed" in description  # the job's condition
    assert f"last log lines of {name}-master-0" in description and "ValueError: the real cause is here" in description
    assert "noise line 0" not in description  # only the tail
    assert fake_operator.deleted == [name]


def test_cancelled_run_deletes_the_pytorchjob_even_when_pods_are_kept(fake_api, monkeypatch):
    custom = FakeCustomObjectsApi(fake_api, fail_on_poll=dg.DagsterExecutionInterruptedError())
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", lambda *a, **k: fake_api)
    monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", lambda *a, **k: custom)
    launcher = _local_pod_launcher(num_machines=2, gpus=1, delete_pods=False)
    result = dg.materialize([_multinode_asset("report", [])], resources={"launcher": launcher}, raise_on_error=False)
    assert not result.success
    assert custom.deleted == [custom.created[0]["metadata"]["name"]]
