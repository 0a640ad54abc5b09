"""Launch `gpu_jobs` programs as Kubernetes pods through Dagster Pipes (dagster-k8s ``PipesK8sClient``).

The cluster counterpart of :class:`arena_pipeline.resources.launcher.JobLauncher`, with the same interface::

    launcher.run(context, "gpu_jobs.train", args, accelerate=True, environment="default", extras=None) -> JobResult

The pod runs the same command the local launcher runs (``python -m accelerate.commands.launch --config_file
<cfg> -m gpu_jobs.<program> ...``) in a job image chosen per environment (``images``: ``default`` for
training/prediction, ``generation`` for the vLLM image), so the job code is identical under both launchers.
Every path in the job's arguments comes from the storage resource, so the state folder must be mounted at
the same path in the Dagster run pod and in the job pods: ``state_pvc`` mounts one PersistentVolumeClaim
(ReadWriteMany) at ``state_mount_path`` in every job pod; ``deploy/k8s`` mounts it at the same path in the
run pods.

Pipes: the client injects the Pipes context through environment variables and reads the messages back from
the pod's log; everything else the job prints goes to the run's captured stdout. A failed pod fails the
asset with the last lines of its log; a cancelled run deletes the pod(s).

Multi-node (``num_machines > 1``, accelerate jobs only): rank 0 is the Pipes pod; ranks 1..N-1 are plain
pods created next to it with the same spec and ``--machine_rank <rank>``; a headless Service gives rank 0 a
stable DNS name (``<job>-0.<job>.<namespace>.svc.<cluster_domain>``) that every rank passes as
``--main_process_ip``. The worker pods and the Service are deleted when rank 0 ends. ``gpu_jobs/
accelerate_configs/multinode.yaml`` holds the matching accelerate settings; ``deploy/README.md`` explains
the path and its limits.

The pod specs are built by pure methods (``pod_spec``, ``pod_meta``, ``service_manifest``, ``pod_manifest``)
so they can be checked without a cluster; ``python -m arena_pipeline.resources.k8s_launcher gpu_jobs.train
ARGS...`` prints the pod manifest the settings in the environment would submit (see ``k8s_resources_from_env``).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from arena_pipeline.profile import REPO_ROOT
from arena_pipeline.resources.launcher import JobResult, _cause_hint

LABEL_PREFIX = "arena-pipeline"
STATE_VOLUME = "arena-state"
SHM_VOLUME = "dshm"
CONTAINER_NAME = "job"
ACCELERATE_CONFIGS = "gpu_jobs/accelerate_configs"
DEFAULT_STATE_PATH = "/arena-state"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
FAILURE_TAIL_CHARS = 6000
_SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _label_value(value: Any) -> str:
    """A valid Kubernetes label value: at most 63 of [A-Za-z0-9._-], starting and ending alphanumeric."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", str(value))[:63]
    return text.strip("-._")


def _dns_label(text: str, limit: int = 63) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower())[:limit].strip("-")


class K8sJobLauncher(dg.ConfigurableResource):
    """Runs job programs as Kubernetes pods under Dagster Pipes (same ``run`` interface as ``JobLauncher``)."""

    images: dict[str, str] = Field(
        description="Job image per environment: 'default' (training, prediction) and e.g. 'generation' (vLLM)."
    )
    namespace: str = Field(default="default", description="Namespace the job pods run in.")
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
    tolerations: list[dict[str, Any]] = []
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
    num_machines: int = Field(default=1, description="Pods per accelerate job (multi-node when > 1).")
    main_process_port: int = 29500
    cluster_domain: str = "cluster.local"
    poll_interval_s: float = 10.0
    pod_wait_timeout_s: float = 7 * 24 * 3600.0
    delete_pods: bool = Field(default=True, description="Delete finished pods (False keeps them for debugging).")
    load_incluster_config: bool | None = None
    kubeconfig_file: str | None = None
    kube_context: str | None = None

    # ---- pure rendering ---------------------------------------------------------------------------------

    def has_environment(self, environment: str) -> bool:
        return environment in self.images

    def image_for(self, environment: str) -> str:
        if environment not in self.images:
            raise dg.Failure(
                f"k8s launcher has no image for environment '{environment}' (configured: {sorted(self.images)}); "
                "add it to `images` (ARENA_K8S_IMAGE / ARENA_K8S_IMAGE_GENERATION)"
            )
        return self.images[environment]

    def gpus_for(self, environment: str) -> int:
        return int(self.environment_gpus.get(environment, self.gpus))

    def machines_for(self, accelerate: bool) -> int:
        """Multi-node applies to accelerate jobs only; plain programs (generation) always run in one pod."""
        return max(1, self.num_machines) if accelerate else 1

    def job_name(self, run_id: str, module: str) -> str:
        """Name shared by a job's pods and Service: ``arena-<program>-<run id>-<random>`` (a DNS label)."""
        program = _dns_label(module.rsplit(".", 1)[-1], 16)
        return _dns_label(f"arena-{program}-{run_id[:8]}-{secrets.token_hex(3)}", 50)

    def accelerate_config_for(self, environment: str, machines: int = 1) -> str:
        """The configured accelerate config, else the one matching the pod: several machines, GPUs, or a CPU."""
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

    def main_process_host(self, job_name: str) -> str:
        return f"{job_name}-0.{job_name}.{self.namespace}.svc.{self.cluster_domain}"

    def command(
        self,
        module: str,
        args: list[str],
        *,
        accelerate: bool = True,
        environment: str = "default",
        machine_rank: int = 0,
        job_name: str | None = None,
    ) -> list[str]:
        """The container command: the local launcher's command with the in-image python and config path."""
        args = [str(a) for a in args]
        if not accelerate:
            return [self.python, "-m", module, *args]
        machines = self.machines_for(accelerate)
        per_machine = self.processes_per_machine or self.gpus_for(environment)
        dist: list[str] = []
        if per_machine:
            dist += ["--num_processes", str(per_machine * machines)]  # accelerate counts processes over all machines
        if machines > 1:
            if job_name is None:
                raise ValueError("a multi-node command needs the job name (rank 0's DNS name derives from it)")
            dist += ["--num_machines", str(machines), "--machine_rank", str(machine_rank),
                     "--main_process_ip", self.main_process_host(job_name),
                     "--main_process_port", str(self.main_process_port)]
        return [self.python, "-m", "accelerate.commands.launch", "--config_file",
                self.accelerate_config_for(environment, machines),
                *dist, "-m", module, *args]

    def container_env(self, *, machine_rank: int = 0, machines: int = 1) -> list[dict[str, str]]:
        env: dict[str, str] = {"PYTHONUNBUFFERED": "1", "TQDM_MININTERVAL": "5"}
        if self.state_pvc:  # model caches on the shared volume: converted GGUF checkpoints, hub downloads
            env["ARENA_MODEL_CACHE"] = posixpath.join(self.state_mount_path, "cache", "models")
            env["HF_HOME"] = posixpath.join(self.state_mount_path, "cache", "huggingface")
        env["ARENA_NUM_MACHINES"] = str(machines)
        env["ARENA_MACHINE_RANK"] = str(machine_rank)
        env.update(self.env_vars)
        return [{"name": k, "value": v} for k, v in env.items()]

    def resources(self, environment: str) -> dict[str, dict[str, str]]:
        requests: dict[str, str] = {}
        limits: dict[str, str] = {}
        if self.cpu_request:
            requests["cpu"] = self.cpu_request
        if self.memory_request:
            requests["memory"] = self.memory_request
        if self.cpu_limit:
            limits["cpu"] = self.cpu_limit
        if self.memory_limit:
            limits["memory"] = self.memory_limit
        gpus = self.gpus_for(environment)
        if gpus:  # extended resources: requests must equal limits
            requests[self.gpu_resource] = str(gpus)
            limits[self.gpu_resource] = str(gpus)
        out: dict[str, dict[str, str]] = {}
        if requests:
            out["requests"] = requests
        if limits:
            out["limits"] = limits
        return out

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

    def pod_spec(
        self,
        module: str,
        args: list[str],
        environment: str = "default",
        *,
        accelerate: bool = True,
        machine_rank: int = 0,
        job_name: str | None = None,
    ) -> dict[str, Any]:
        """The PodSpec (camelCase dict) of one rank; PipesK8sClient adds the Pipes env vars to its container."""
        machines = self.machines_for(accelerate)
        volumes, mounts = self.pod_volumes()
        container: dict[str, Any] = {
            "name": CONTAINER_NAME,
            "image": self.image_for(environment),
            "imagePullPolicy": self.image_pull_policy,
            "command": self.command(module, args, accelerate=accelerate, environment=environment,
                                    machine_rank=machine_rank, job_name=job_name),
            "workingDir": self.working_dir,
            "env": self.container_env(machine_rank=machine_rank, machines=machines),
            "resources": self.resources(environment),
            "volumeMounts": mounts,
        }
        if self.env_secrets:
            container["envFrom"] = [{"secretRef": {"name": name}} for name in self.env_secrets]
        spec: dict[str, Any] = {"restartPolicy": "Never", "containers": [container], "volumes": volumes}
        if self.node_selector:
            spec["nodeSelector"] = dict(self.node_selector)
        if self.tolerations:
            spec["tolerations"] = [dict(t) for t in self.tolerations]
        if self.affinity:
            spec["affinity"] = dict(self.affinity)
        if self.service_account:
            spec["serviceAccountName"] = self.service_account
        if self.image_pull_secrets:
            spec["imagePullSecrets"] = [{"name": name} for name in self.image_pull_secrets]
        if machines > 1:
            if job_name is None:
                raise ValueError("a multi-node pod spec needs the job name")
            spec["hostname"] = f"{job_name}-{machine_rank}"
            spec["subdomain"] = job_name  # with the headless Service of the same name: a DNS name per rank
        return spec

    def pod_meta(
        self,
        module: str,
        environment: str = "default",
        *,
        job_name: str | None = None,
        machine_rank: int = 0,
        run_id: str = "",
        extras: dict | None = None,
    ) -> dict[str, Any]:
        """Labels to find a job's pods (``kubectl get pods -l arena-pipeline/model=...``) and annotations."""
        labels = {
            f"{LABEL_PREFIX}/program": _label_value(module.rsplit(".", 1)[-1]),
            f"{LABEL_PREFIX}/environment": _label_value(environment),
            f"{LABEL_PREFIX}/rank": str(machine_rank),
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

    def service_manifest(self, job_name: str) -> dict[str, Any]:
        """Headless Service that gives each rank of a multi-node job a DNS name (rank 0 = main process)."""
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": job_name, "labels": {f"{LABEL_PREFIX}/job": job_name}},
            "spec": {
                "clusterIP": "None",
                "selector": {f"{LABEL_PREFIX}/job": job_name},
                "publishNotReadyAddresses": True,
                "ports": [{"name": "main-process", "port": self.main_process_port,
                           "targetPort": self.main_process_port}],
            },
        }

    def pod_manifest(
        self,
        module: str,
        args: list[str],
        environment: str = "default",
        *,
        accelerate: bool = True,
        machine_rank: int = 0,
        job_name: str | None = None,
        run_id: str = "",
        extras: dict | None = None,
    ) -> dict[str, Any]:
        """A whole Pod manifest (for reading and ``kubectl apply --dry-run``; the Pipes env is added at launch)."""
        name = job_name or self.job_name(run_id or "manual0", module)
        multi = self.machines_for(accelerate) > 1
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-{machine_rank}",
                "namespace": self.namespace,
                **self.pod_meta(module, environment, job_name=name, machine_rank=machine_rank, run_id=run_id,
                                extras=extras),
            },
            "spec": self.pod_spec(module, args, environment, accelerate=accelerate, machine_rank=machine_rank,
                                  job_name=name if multi else None),
        }

    # ---- launching --------------------------------------------------------------------------------------

    def pipes_client(self):
        from dagster_k8s import PipesK8sClient

        return PipesK8sClient(
            load_incluster_config=self.load_incluster_config,
            kubeconfig_file=self.kubeconfig_file,
            kube_context=self.kube_context,
            poll_interval=self.poll_interval_s,
        )

    def load_kube_config(self) -> None:
        """The kube config the Pipes client of rank 0 uses (in-cluster, or a kubeconfig file and context), loaded
        with the kubernetes package's public loaders for the extra ranks' Service and pods."""
        import kubernetes

        if self.load_incluster_config:
            kubernetes.config.load_incluster_config()
        else:
            kubernetes.config.load_kube_config(config_file=self.kubeconfig_file, context=self.kube_context)

    def run(
        self,
        context: dg.AssetExecutionContext,
        module: str,
        args: list[str],
        *,
        accelerate: bool = True,
        environment: str = "default",
        extras: dict | None = None,
        on_message=None,
        accelerate_config: str | None = None,
    ) -> JobResult:
        """Run one job as pod(s). ``on_message`` gets the job's Pipes custom messages (per-step metrics) once the
        pod has finished (not live, unlike the local launcher). ``accelerate_config``: a member's own config
        (a file name under gpu_jobs/accelerate_configs in the image), else the one chosen for the pod."""
        if accelerate_config and accelerate_config != self.accelerate_config:
            path = accelerate_config if "/" in accelerate_config else f"{ACCELERATE_CONFIGS}/{accelerate_config}"
            return self.model_copy(update={"accelerate_config": path}).run(
                context, module, args, accelerate=accelerate, environment=environment, extras=extras,
                on_message=on_message)
        import kubernetes
        from dagster_k8s.client import DagsterK8sError, DagsterKubernetesClient
        from dagster_k8s.pipes import build_pod_body

        args = [str(a) for a in args]
        machines = self.machines_for(accelerate)
        job = self.job_name(context.run_id, module)
        multi_job = job if machines > 1 else None

        def spec(rank: int) -> dict[str, Any]:
            return self.pod_spec(module, args, environment, accelerate=accelerate, machine_rank=rank, job_name=multi_job)

        def meta(rank: int) -> dict[str, Any]:
            return self.pod_meta(module, environment, job_name=job, machine_rank=rank, run_id=context.run_id,
                                 extras=extras)

        spec0 = spec(0)
        command = list(spec0["containers"][0]["command"])
        context.log.info(
            f"launching {machines} pod(s) '{job}' in namespace '{self.namespace}', image "
            f"{self.image_for(environment)}, {self.gpus_for(environment)} GPU(s) each: " + " ".join(command)
        )
        client = self.pipes_client()
        core = None
        workers: list[str] = []
        service = False
        start = time.time()
        try:
            if machines > 1:
                self.load_kube_config()  # the same kube config the Pipes client loads for rank 0
                core = DagsterKubernetesClient.production_client().core_api
                core.create_namespaced_service(self.namespace, self.service_manifest(job))
                service = True
                for rank in range(1, machines):
                    name = f"{job}-{rank}"
                    body = build_pod_body(pod_name=name, image=None, command=None, env_vars={},
                                          base_pod_meta=meta(rank), base_pod_spec=spec(rank))
                    core.create_namespaced_pod(self.namespace, body)
                    workers.append(name)
            invocation = client.run(
                context=context,
                extras=extras or {},
                namespace=self.namespace,
                base_pod_meta=meta(0),
                base_pod_spec=spec0,
                pod_wait_timeout=self.pod_wait_timeout_s,
                delete_pod_on_completion=self.delete_pods,
            )
        except DagsterK8sError as exc:
            wall = time.time() - start
            text = str(exc)
            raise dg.Failure(
                description=(
                    f"{module} pod(s) '{job}' in namespace '{self.namespace}' failed after {wall:.0f}s."
                    f"{_cause_hint(text.splitlines())}\n--- pod status and last log lines ---\n"
                    + text[-FAILURE_TAIL_CHARS:]
                ),
                metadata={"command": " ".join(command), "pod": job, "namespace": self.namespace},
            ) from exc
        except kubernetes.client.ApiException as exc:
            hint = ""
            if exc.status in (401, 403):
                hint = (" The run's service account may not create/list/delete pods and services or read pods/log "
                        "in this namespace (see deploy/k8s/rbac.yaml).")
            raise dg.Failure(
                description=f"the Kubernetes API refused to run {module} ({exc.status} {exc.reason}).{hint}\n"
                            f"{(exc.body or '')[:2000]}",
                metadata={"command": " ".join(command), "pod": job, "namespace": self.namespace},
            ) from exc
        finally:
            if core is not None:
                self._clean_up(context, core, workers if self.delete_pods else [], job if service else None)
        wall = time.time() - start
        for message in invocation.get_custom_messages() if on_message is not None else ():
            on_message(message)
        results = list(invocation.get_results(implicit_materializations=False))
        metadata: dict[str, Any] = {}
        for result in results:
            for key, value in (getattr(result, "metadata", None) or {}).items():
                metadata[key] = value.value if hasattr(value, "value") else value
        return JobResult(metadata=metadata, wall_s=wall, command=command, pipes_results=results)

    def _clean_up(self, context, core, workers: list[str], service: str | None) -> None:
        import kubernetes

        for name in workers:
            try:
                core.delete_namespaced_pod(name, self.namespace)
            except kubernetes.client.ApiException as exc:
                if exc.status != 404:
                    context.log.warning(f"could not delete worker pod {name}: {exc.status} {exc.reason}")
        if service:
            try:
                core.delete_namespaced_service(service, self.namespace)
            except kubernetes.client.ApiException as exc:
                if exc.status != 404:
                    context.log.warning(f"could not delete service {service}: {exc.status} {exc.reason}")


# ---- selecting the launcher from the environment ------------------------------------------------------------


def _mapping(name: str, value: str) -> dict[str, str]:
    """``{"k": "v"}`` (JSON) or ``k=v,k2=v2``."""
    value = value.strip()
    if not value:
        return {}
    if value.startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON ({exc}): {value!r}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"{name} must be a JSON object, got {value!r}")
        return {str(k): str(v) for k, v in parsed.items()}
    out = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{name} must be JSON or 'key=value,key2=value2'; bad item {item!r}")
        out[key.strip()] = val.strip()
    return out


def _json_list(name: str, value: str) -> list[dict[str, Any]]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON ({exc}): {value!r}") from None
    if not isinstance(parsed, list) or not all(isinstance(item, dict) for item in parsed):
        raise ValueError(f"{name} must be a JSON list of objects, got {value!r}")
    return parsed


def _int(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if number < 0:
        raise ValueError(f"{name} must be >= 0, got {number}")
    return number


def _current_namespace() -> str:
    path = Path(_SA_NAMESPACE_FILE)
    return path.read_text().strip() if path.exists() else "default"


def _under(path: str, folder: str) -> bool:
    path, folder = posixpath.normpath(path), posixpath.normpath(folder)
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def k8s_launcher_from_env(env: dict[str, str] | None = None) -> K8sJobLauncher:
    """A ``K8sJobLauncher`` from ``ARENA_K8S_*`` environment variables (see deploy/README.md for the list)."""
    env = dict(os.environ if env is None else env)
    get = lambda key, default="": env.get(key, default).strip()  # noqa: E731

    image = get("ARENA_K8S_IMAGE")
    images = _mapping("ARENA_K8S_IMAGES", get("ARENA_K8S_IMAGES"))
    if image:
        images["default"] = image
    if get("ARENA_K8S_IMAGE_GENERATION"):
        images["generation"] = get("ARENA_K8S_IMAGE_GENERATION")
    if "default" not in images:
        raise ValueError("ARENA_LAUNCHER=k8s needs the job image: set ARENA_K8S_IMAGE (e.g. registry/arena-pipeline:TAG)")

    gpus = _int("ARENA_K8S_GPUS", get("ARENA_K8S_GPUS", "1"))
    machines = _int("ARENA_K8S_NUM_MACHINES", get("ARENA_K8S_NUM_MACHINES", "1")) or 1
    settings: dict[str, Any] = {
        "images": images,
        "namespace": get("ARENA_K8S_NAMESPACE") or _current_namespace(),
        "gpus": gpus,
        "num_machines": machines,
        "accelerate_config": get("ARENA_K8S_ACCELERATE_CONFIG") or None,
        "node_selector": _mapping("ARENA_K8S_NODE_SELECTOR", get("ARENA_K8S_NODE_SELECTOR")),
        "env_vars": _mapping("ARENA_K8S_ENV", get("ARENA_K8S_ENV")),
        "env_secrets": [s.strip() for s in get("ARENA_K8S_ENV_SECRETS").split(",") if s.strip()],
        "image_pull_secrets": [s.strip() for s in get("ARENA_K8S_IMAGE_PULL_SECRETS").split(",") if s.strip()],
    }
    if get("ARENA_K8S_TOLERATIONS"):
        settings["tolerations"] = _json_list("ARENA_K8S_TOLERATIONS", get("ARENA_K8S_TOLERATIONS"))
    elif gpus:
        settings["tolerations"] = [dict(GPU_TOLERATION)]  # GPU node pools are usually tainted with it
    if get("ARENA_K8S_ENVIRONMENT_GPUS"):
        settings["environment_gpus"] = {k: _int("ARENA_K8S_ENVIRONMENT_GPUS", v) for k, v in
                                        _mapping("ARENA_K8S_ENVIRONMENT_GPUS", get("ARENA_K8S_ENVIRONMENT_GPUS")).items()}
    for key, field in (("ARENA_K8S_CPU", "cpu_request"), ("ARENA_K8S_MEMORY", "memory_request"),
                       ("ARENA_K8S_CPU_LIMIT", "cpu_limit"), ("ARENA_K8S_MEMORY_LIMIT", "memory_limit"),
                       ("ARENA_K8S_SHM_SIZE", "shm_size"), ("ARENA_K8S_SERVICE_ACCOUNT", "service_account"),
                       ("ARENA_K8S_IMAGE_PULL_POLICY", "image_pull_policy"), ("ARENA_K8S_WORKDIR", "working_dir"),
                       ("ARENA_K8S_PYTHON", "python")):
        if get(key):
            settings[field] = get(key)
    if get("ARENA_K8S_VOLUMES"):
        settings["volumes"] = _json_list("ARENA_K8S_VOLUMES", get("ARENA_K8S_VOLUMES"))
    if get("ARENA_K8S_VOLUME_MOUNTS"):
        settings["volume_mounts"] = _json_list("ARENA_K8S_VOLUME_MOUNTS", get("ARENA_K8S_VOLUME_MOUNTS"))
    if get("ARENA_K8S_KEEP_PODS").lower() in ("1", "true", "yes"):
        settings["delete_pods"] = False

    pvc = get("ARENA_K8S_PVC")
    if pvc:
        mount = get("ARENA_K8S_STATE_PATH") or DEFAULT_STATE_PATH
        storage_root = get("ARENA_STORAGE_HOME") or posixpath.join(
            get("DAGSTER_HOME") or str(REPO_ROOT / ".dagster_home"), "arena")  # ArenaStorage's default root
        if not _under(storage_root, mount):
            raise ValueError(
                f"the job pods mount the state volume '{pvc}' at {mount}, but the storage resource writes under "
                f"{storage_root}: set ARENA_STORAGE_HOME to a folder under {mount} (e.g. {mount}/arena) or "
                "ARENA_K8S_STATE_PATH to the folder the storage uses, so both sides see the same paths"
            )
        settings["state_pvc"] = pvc
        settings["state_mount_path"] = mount
    return K8sJobLauncher(**settings)


def k8s_resources_from_env() -> dict | None:
    """``{"launcher": K8sJobLauncher(...)}`` when ``ARENA_LAUNCHER=k8s``, else None (keep the local launcher)."""
    choice = os.environ.get("ARENA_LAUNCHER", "").strip().lower()
    if choice in ("", "local", "subprocess"):
        return None
    if choice != "k8s":
        raise ValueError(f"ARENA_LAUNCHER must be 'local' or 'k8s', got {choice!r}")
    return {"launcher": k8s_launcher_from_env()}


def main(argv: list[str] | None = None) -> None:
    """Print the Pod manifest the environment's settings would submit for one job (no cluster needed).

    python -m arena_pipeline.resources.k8s_launcher [--no-accelerate] [--environment NAME] MODULE [ARGS...]
    """
    import argparse

    import yaml

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--no-accelerate", action="store_true", help="plain `python -m` (like generation)")
    parser.add_argument("--environment", default="default")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("module")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    launcher = k8s_launcher_from_env()
    manifest = launcher.pod_manifest(ns.module, ns.args, ns.environment, accelerate=not ns.no_accelerate,
                                     machine_rank=ns.rank, job_name="arena-example")
    yaml.safe_dump(manifest, sys.stdout, sort_keys=False, width=120)


if __name__ == "__main__":
    main()
