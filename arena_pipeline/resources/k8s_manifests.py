"""What the Kubernetes launcher submits: its settings (resource config) and the manifests they render.

No Kubernetes API call happens here. :class:`K8sJobSettings` holds the cluster settings as typed fields of the
``launcher`` resource (``definitions.py`` sets them from ``ARENA_K8S_*`` with ``dg.EnvVar``) and renders:

- ``pod_spec`` / ``pod_meta`` / ``pod_manifest``: the one pod of a single-node job, handed to dagster-k8s'
  ``PipesK8sClient`` (which adds the Pipes bootstrap env to its first container);
- ``pytorchjob_manifest``: a Kubeflow ``PyTorchJob`` (``kubeflow.org/v1``) for accelerate jobs on several
  machines: one ``Master`` and ``machines - 1`` ``Worker`` replicas of the same pod, the master's container
  carrying the Pipes bootstrap env. The training operator gives every replica ``MASTER_ADDR`` (the master's
  Service, ``<job>-master-0``), ``MASTER_PORT`` (the container port named ``pytorchjob-port``) and ``RANK``
  (the replica's node rank: master 0, worker *i* -> *i* + 1); Kubernetes expands ``$(VAR)`` in the command,
  so every replica runs ``accelerate launch --num_machines N --machine_rank $(RANK) --main_process_ip
  $(MASTER_ADDR) --main_process_port $(MASTER_PORT) ...``. The operator's ``WORLD_SIZE`` is not used: it
  counts pods in operator releases before 1.7 and processes after; ``--num_processes`` is computed here.

The job runs the command the local launcher runs, with the in-image python and config paths.
"""

from __future__ import annotations

import copy
import posixpath
import re
import secrets
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from arena_pipeline.resources.launching import Launcher

LABEL_PREFIX = "arena-pipeline"
STATE_VOLUME = "arena-state"
SHM_VOLUME = "dshm"
CONTAINER_NAME = "job"
ACCELERATE_CONFIGS = "gpu_jobs/accelerate_configs"
DEFAULT_STATE_PATH = "/arena-state"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# what the Kubeflow training operator expects of a PyTorchJob's pods and sets in them
PYTORCHJOB = {"group": "kubeflow.org", "version": "v1", "plural": "pytorchjobs"}
PYTORCH_CONTAINER = "pytorch"  # the operator validates that each replica has a container of this name
PYTORCH_PORT_NAME = "pytorchjob-port"  # its containerPort becomes MASTER_PORT
_SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _label_value(value: Any) -> str:
    """A valid Kubernetes label value: at most 63 of [A-Za-z0-9._-], starting and ending alphanumeric."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", str(value))[:63]
    return text.strip("-._")


def _dns_label(text: str, limit: int = 63) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower())[:limit].strip("-")


def current_namespace() -> str:
    """The namespace this process runs in (its service account's), else ``default``."""
    path = Path(_SA_NAMESPACE_FILE)
    return path.read_text().strip() if path.exists() else "default"


def check_state_mount(pvc: str, mount: str, storage_root: str) -> None:
    """Refuse settings under which the job pods would not see the files the assets hand them."""
    path, folder = posixpath.normpath(storage_root), posixpath.normpath(mount)
    if path != folder and not path.startswith(folder.rstrip("/") + "/"):
        raise ValueError(
            f"the job pods mount the state volume '{pvc}' at {mount}, but the storage resource writes under "
            f"{storage_root}: set ARENA_STORAGE_HOME to a folder under {mount} (e.g. {mount}/arena) or "
            "ARENA_K8S_STATE_PATH to the folder the storage uses, so both sides see the same paths"
        )


class K8sJobSettings(Launcher):
    """The Kubernetes launcher's settings and the manifests they render (``K8sJobLauncher`` submits them)."""

    images: dict[str, str] = Field(
        description="Job image per environment: 'default' (training, prediction) and e.g. 'generation' (vLLM)."
    )
    namespace: str = Field(default="", description="Namespace of the job pods ('': the run pod's own).")
    accelerate_config: str | None = Field(
        default=None,
        description="accelerate config file inside the image (relative to working_dir); default: chosen from the "
                    "pod's shape (multinode.yaml, gpu_multi.yaml, gpu_1.yaml or cpu_single.yaml).",
    )
    python: str = Field(default="python", description="Python executable inside the image.")
    working_dir: str = Field(default="/app", description="Where the repository lives inside the image.")
    gpus: int = Field(default=1, description="GPUs per pod (limits and requests of gpu_resource).")
    environment_gpus: dict[str, int] = Field(default={}, description="GPUs per pod for named environments.")
    gpu_resource: str = Field(default="nvidia.com/gpu", description="Extended resource name of a GPU.")
    processes_per_machine: int | None = Field(
        default=None,
        description="accelerate processes per pod (default: the pod's GPU count; none passed for CPU pods).",
    )
    cpu_request: str | None = "4"
    memory_request: str | None = "32Gi"
    cpu_limit: str | None = None
    memory_limit: str | None = None
    shm_size: str | None = Field(
        default="16Gi", description="Size of the in-memory /dev/shm (NCCL and DataLoader workers need more than 64M)."
    )
    node_selector: dict[str, str] = {}
    tolerations: list[dict[str, Any]] | None = Field(
        default=None, description="Pod tolerations; None: tolerate the nvidia.com/gpu taint when the pod has GPUs."
    )
    affinity: dict[str, Any] = {}
    service_account: str | None = None
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[str] = []
    env_vars: dict[str, str] = Field(default={}, description="Extra environment variables of the job container.")
    env_secrets: list[str] = Field(default=[], description="Secrets whose keys become env vars (e.g. HF_TOKEN).")
    state_pvc: str | None = Field(default=None, description="PersistentVolumeClaim holding the state folder.")
    state_mount_path: str = Field(
        default=DEFAULT_STATE_PATH,
        description="Where state_pvc is mounted: the same path the storage resource uses in the run pod.",
    )
    volumes: list[dict[str, Any]] = Field(default=[], description="Extra pod volumes (raw Kubernetes dicts).")
    volume_mounts: list[dict[str, Any]] = Field(default=[], description="Extra container volume mounts.")
    pod_labels: dict[str, str] = {}
    pod_annotations: dict[str, str] = {}
    num_machines: int = Field(default=1, description="Pods per accelerate job (a PyTorchJob when > 1).")
    main_process_port: int = Field(default=29500, description="The master's rendezvous port (PyTorchJob).")
    poll_interval_s: float = 10.0
    pod_wait_timeout_s: float = 7 * 24 * 3600.0
    delete_pods: bool = Field(default=True, description="Delete finished pods (False keeps them for debugging).")
    load_incluster_config: bool | None = None
    kubeconfig_file: str | None = None
    kube_context: str | None = None

    def has_environment(self, environment: str) -> bool:
        return environment in self.images

    def image_for(self, environment: str) -> str:
        if environment not in self.images:
            raise dg.Failure(
                f"k8s launcher has no image for environment '{environment}' (configured: {sorted(self.images)}); "
                "add it to `images` (ARENA_K8S_IMAGE / ARENA_K8S_IMAGE_GENERATION / ARENA_K8S_IMAGES)"
            )
        return self.images[environment]

    def job_namespace(self) -> str:
        return self.namespace or current_namespace()

    def gpus_for(self, environment: str) -> int:
        return int(self.environment_gpus.get(environment, self.gpus))

    def machines_for(self, accelerate: bool) -> int:
        """Multi-node applies to accelerate jobs only; plain programs (generation) always run in one pod."""
        return max(1, self.num_machines) if accelerate else 1

    def job_name(self, run_id: str, module: str) -> str:
        """Name of a job's pod or PyTorchJob: ``arena-<program>-<run id>-<random>`` (a DNS label)."""
        program = _dns_label(module.rsplit(".", 1)[-1], 16)
        return _dns_label(f"arena-{program}-{run_id[:8]}-{secrets.token_hex(3)}", 50)

    def accelerate_config_for(self, environment: str, machines: int = 1, own: str | None = None) -> str:
        """A member's own config (``own``: a file name under gpu_jobs/accelerate_configs, or a path in the
        image), else the configured one, else the one matching the pod: several machines, GPUs, or a CPU."""
        if own:
            return own if "/" in own else f"{ACCELERATE_CONFIGS}/{own}"
        if self.accelerate_config:
            return self.accelerate_config
        per_machine = self.processes_per_machine or self.gpus_for(environment)
        if machines > 1:
            name = "multinode.yaml"
        elif per_machine > 1:
            name = "gpu_multi.yaml"
        elif self.gpus_for(environment) == 1:
            name = "gpu_1.yaml"
        else:
            name = "cpu_single.yaml"
        return f"{ACCELERATE_CONFIGS}/{name}"

    def command(self, module: str, args: list, *, accelerate: bool = True, environment: str = "default",
                accelerate_config: str | None = None) -> list[str]:
        """The container command: the local launcher's command with the in-image python and config path."""
        args = [str(a) for a in args]
        if not accelerate:
            return [self.python, "-m", module, *args]
        machines = self.machines_for(accelerate)
        per_machine = self.processes_per_machine or self.gpus_for(environment)
        dist: list[str] = []
        if per_machine:
            dist += ["--num_processes", str(per_machine * machines)]  # accelerate counts processes over all machines
        if machines > 1:  # the operator's env, expanded by Kubernetes in each replica
            dist += ["--num_machines", str(machines), "--machine_rank", "$(RANK)",
                     "--main_process_ip", "$(MASTER_ADDR)", "--main_process_port", "$(MASTER_PORT)"]
        return [self.python, "-m", "accelerate.commands.launch", "--config_file",
                self.accelerate_config_for(environment, machines, accelerate_config), *dist, "-m", module, *args]

    def container_env(self, machines: int = 1) -> list[dict[str, str]]:
        env: dict[str, str] = {"PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "5"}
        if self.state_pvc:  # model caches on the shared volume: converted GGUF checkpoints, hub downloads
            env["ARENA_MODEL_CACHE"] = posixpath.join(self.state_mount_path, "cache", "models")
            env["HF_HOME"] = posixpath.join(self.state_mount_path, "cache", "huggingface")
        env["ARENA_NUM_MACHINES"] = str(machines)
        env.update(self.env_vars)
        return [{"name": k, "value": v} for k, v in env.items()]

    def resources(self, environment: str) -> dict[str, dict[str, str]]:
        requests = {k: v for k, v in (("cpu", self.cpu_request), ("memory", self.memory_request)) if v}
        limits = {k: v for k, v in (("cpu", self.cpu_limit), ("memory", self.memory_limit)) if v}
        gpus = self.gpus_for(environment)
        if gpus:  # extended resources: requests must equal limits
            requests[self.gpu_resource] = limits[self.gpu_resource] = str(gpus)
        return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}

    def pod_volumes(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        volumes: list[dict[str, Any]] = []
        mounts: list[dict[str, Any]] = []
        if self.state_pvc:
            volumes.append({"name": STATE_VOLUME, "persistentVolumeClaim": {"claimName": self.state_pvc}})
            mounts.append({"name": STATE_VOLUME, "mountPath": self.state_mount_path})
        if self.shm_size:
            volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": self.shm_size}})
            mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
        volumes += [dict(v) for v in self.volumes]
        mounts += [dict(m) for m in self.volume_mounts]
        return volumes, mounts

    def pod_spec(self, module: str, args: list, environment: str = "default", *, accelerate: bool = True,
                 accelerate_config: str | None = None) -> dict[str, Any]:
        """The PodSpec (camelCase dict) of the job's pod, or of each replica of a multi-node PyTorchJob."""
        machines = self.machines_for(accelerate)
        volumes, mounts = self.pod_volumes()
        container: dict[str, Any] = {
            "name": PYTORCH_CONTAINER if machines > 1 else CONTAINER_NAME,
            "image": self.image_for(environment),
            "imagePullPolicy": self.image_pull_policy,
            "command": self.command(module, args, accelerate=accelerate, environment=environment,
                                    accelerate_config=accelerate_config),
            "workingDir": self.working_dir,
            "env": self.container_env(machines),
            "resources": self.resources(environment),
            "volumeMounts": mounts,
        }
        if machines > 1:
            container["ports"] = [{"name": PYTORCH_PORT_NAME, "containerPort": self.main_process_port}]
        if self.env_secrets:
            container["envFrom"] = [{"secretRef": {"name": name}} for name in self.env_secrets]
        spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container], "volumes": volumes}
        if self.node_selector:
            spec["nodeSelector"] = dict(self.node_selector)
        tolerations = self.tolerations
        if tolerations is None:  # GPU node pools are usually tainted with it
            tolerations = [GPU_TOLERATION] if self.gpus_for(environment) else []
        if tolerations:
            spec["tolerations"] = [dict(t) for t in tolerations]
        if self.affinity:
            spec["affinity"] = dict(self.affinity)
        if self.service_account:
            spec["serviceAccountName"] = self.service_account
        if self.image_pull_secrets:
            spec["imagePullSecrets"] = [{"name": name} for name in self.image_pull_secrets]
        return spec

    def pod_meta(self, module: str, environment: str = "default", *, job_name: str | None = None,
                 run_id: str = "", extras: dict | None = None) -> dict[str, Any]:
        """Labels to find a job's pods (``kubectl get pods -l arena-pipeline/model=...``) and annotations."""
        labels = {
            f"{LABEL_PREFIX}/program": _label_value(module.rsplit(".", 1)[-1]),
            f"{LABEL_PREFIX}/environment": _label_value(environment),
        }
        if job_name:
            labels[f"{LABEL_PREFIX}/job"] = job_name
        if run_id:
            labels["dagster/run-id"] = _label_value(run_id)
        for key, value in (extras or {}).items():
            if isinstance(value, (str, int, float, bool)) and _label_value(value):
                labels[f"{LABEL_PREFIX}/{_dns_label(str(key))}"] = _label_value(value)
        labels.update(self.pod_labels)
        annotations = {f"{LABEL_PREFIX}/module": module, **self.pod_annotations}
        return {"labels": labels, "annotations": annotations}

    def pod_manifest(self, module: str, args: list, environment: str = "default", *, accelerate: bool = True,
                     job_name: str | None = None, run_id: str = "", extras: dict | None = None) -> dict[str, Any]:
        """A whole single-node Pod manifest (for reading and ``kubectl apply --dry-run``; PipesK8sClient adds the
        Pipes env at launch)."""
        name = job_name or self.job_name(run_id or "manual0", module)
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": self.job_namespace(),
                         **self.pod_meta(module, environment, job_name=name, run_id=run_id, extras=extras)},
            "spec": self.pod_spec(module, args, environment, accelerate=accelerate),
        }

    def pytorchjob_manifest(self, name: str, module: str, args: list, environment: str = "default", *,
                            run_id: str = "", extras: dict | None = None, pipes_env: dict[str, str] | None = None,
                            accelerate_config: str | None = None) -> dict[str, Any]:
        """A ``kubeflow.org/v1`` PyTorchJob running an accelerate job on ``num_machines`` pods; ``pipes_env`` (the
        Pipes session's bootstrap env) goes to the master's container only: the master reports to Dagster."""
        machines = self.machines_for(True)
        if machines < 2:
            raise ValueError(f"a PyTorchJob is for several machines; num_machines is {machines}")
        meta = self.pod_meta(module, environment, job_name=name, run_id=run_id, extras=extras)
        worker = {"metadata": meta, "spec": self.pod_spec(module, args, environment, accelerate_config=accelerate_config)}
        master = copy.deepcopy(worker)
        master["spec"]["containers"][0]["env"] += [{"name": k, "value": v} for k, v in (pipes_env or {}).items()]
        per_machine = self.processes_per_machine or self.gpus_for(environment) or 1
        return {
            "apiVersion": f"{PYTORCHJOB['group']}/{PYTORCHJOB['version']}",
            "kind": "PyTorchJob",
            "metadata": {"name": name, "namespace": self.job_namespace(), **copy.deepcopy(meta)},
            "spec": {
                "nprocPerNode": str(per_machine),
                # no restarts (a failed replica fails the job, like a failed pod); when the job ends the operator
                # deletes the replicas still running (a master stuck in a collective after a worker died) and keeps
                # the finished ones, whose logs the launcher reads before it deletes the job; and it enforces the timeout
                "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "Running",
                              "activeDeadlineSeconds": int(self.pod_wait_timeout_s)},
                "pytorchReplicaSpecs": {
                    "Master": {"replicas": 1, "restartPolicy": "Never", "template": master},
                    "Worker": {"replicas": machines - 1, "restartPolicy": "Never", "template": worker},
                },
            },
        }
