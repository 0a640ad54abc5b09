"""Launch `gpu_jobs` programs on Kubernetes under Dagster Pipes: the cluster backend of ``Launcher``.

- **One pod** (one machine, and every plain program such as generation): dagster-k8s' ``PipesK8sClient``
  creates the pod rendered by :meth:`K8sJobSettings.pod_spec`, injects the Pipes context through env vars,
  reads the messages back from the pod's log and waits for the pod; the job's custom messages reach
  ``on_message`` once the pod has finished.
- **Several machines** (accelerate jobs, ``num_machines > 1``): a Kubeflow ``PyTorchJob`` (rendered by
  :meth:`K8sJobSettings.pytorchjob_manifest`) created through ``kubernetes.client.CustomObjectsApi``. The
  launcher opens the Pipes session itself (``dg.open_pipes_session`` with the env context injector and
  dagster-k8s' ``PipesK8sPodLogsMessageReader`` on the master pod's log, the reader ``PipesK8sClient`` uses),
  polls the job's ``Succeeded``/``Failed`` condition, relays custom messages while it runs, and deletes the
  job (the operator deletes its pods) when it is done, has failed, or the run is cancelled.

A failed job fails the asset with the likely cause and the last lines of the failed pod's log. The Kubernetes
settings are the resource's config (:mod:`arena_pipeline.resources.k8s_manifests`; ``definitions.py`` sets them
from ``ARENA_K8S_*``). ``python -m arena_pipeline.resources.k8s_launcher MODULE ARGS...`` prints the manifest the
environment's settings would submit, without a cluster.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Callable

import dagster as dg

from arena_pipeline.resources.k8s_manifests import LABEL_PREFIX, PYTORCHJOB, K8sJobSettings
from arena_pipeline.resources.launching import JobResult, MessageRelay, cause_hint, job_result

FAILURE_TAIL_CHARS = 6000
FAILURE_TAIL_LINES = 40
LOG_DRAIN_TIMEOUT_S = 120.0
# a container that cannot start: the job would wait for it until its deadline
_STUCK_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError"}


def _condition(job: dict) -> dict | None:
    """The PyTorchJob's final condition (type Succeeded or Failed), None while it runs."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Succeeded", "Failed") and condition.get("status") == "True":
            return condition
    return None


class K8sJobLauncher(K8sJobSettings):
    """Runs job programs as Kubernetes pods (one pod, or a PyTorchJob over several) under Dagster Pipes."""

    def run(
        self,
        context: dg.AssetExecutionContext,
        module: str,
        args: list,
        *,
        accelerate: bool = True,
        environment: str = "default",
        extras: dict | None = None,
        on_message: Callable[[Any], None] | None = None,
        accelerate_config: str | None = None,
    ) -> JobResult:
        args = [str(a) for a in args]
        name = self.job_name(context.run_id, module)
        if self.machines_for(accelerate) > 1:
            return self._run_pytorchjob(context, name, module, args, environment, extras, on_message,
                                        accelerate_config)
        return self._run_pod(context, name, module, args, accelerate, environment, extras, on_message,
                             accelerate_config)

    # ---- one pod: PipesK8sClient -----------------------------------------------------------------------------

    def _run_pod(self, context, name, module, args, accelerate, environment, extras, on_message,
                 accelerate_config) -> JobResult:
        from dagster_k8s import PipesK8sClient
        from dagster_k8s.client import DagsterK8sError

        namespace = self.job_namespace()
        spec = self.pod_spec(module, args, environment, accelerate=accelerate, accelerate_config=accelerate_config)
        command = list(spec["containers"][0]["command"])
        context.log.info(f"launching a pod labelled {LABEL_PREFIX}/job={name} in namespace '{namespace}', image "
                         f"{self.image_for(environment)}, "
                         f"{self.gpus_for(environment)} GPU(s): " + " ".join(command))
        client = PipesK8sClient(load_incluster_config=self.load_incluster_config, kubeconfig_file=self.kubeconfig_file,
                                kube_context=self.kube_context, poll_interval=self.poll_interval_s)
        start = time.time()
        with self._api_errors(module, command, name, namespace):
            try:
                invocation = client.run(
                    context=context, extras=extras or {}, namespace=namespace,
                    base_pod_meta=self.pod_meta(module, environment, job_name=name, run_id=context.run_id,
                                                extras=extras),
                    base_pod_spec=spec, pod_wait_timeout=self.pod_wait_timeout_s,
                    delete_pod_on_completion=self.delete_pods,
                )
            except DagsterK8sError as exc:  # the client's failure: pod status and the end of its log
                raise self._failure(f"{module} pod(s) '{name}' in namespace '{namespace}'", start,
                                    str(exc), "pod status and last log lines", command, name, namespace) from exc
        MessageRelay(invocation, on_message, context).drain()
        return job_result(invocation, time.time() - start, command)

    # ---- several machines: a PyTorchJob ---------------------------------------------------------------------

    def _run_pytorchjob(self, context, name, module, args, environment, extras, on_message,
                        accelerate_config) -> JobResult:
        from dagster_k8s import PipesK8sPodLogsMessageReader

        namespace = self.job_namespace()
        core, custom = self.kubernetes_apis()
        reader = PipesK8sPodLogsMessageReader()
        start = time.time()
        with dg.open_pipes_session(context=context, context_injector=dg.PipesEnvContextInjector(),
                                   message_reader=reader, extras=extras or {}) as session:
            manifest = self.pytorchjob_manifest(name, module, args, environment, run_id=context.run_id,
                                                extras=extras, pipes_env=session.get_bootstrap_env_vars(),
                                                accelerate_config=accelerate_config)
            command = list(manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
                           ["command"])
            context.log.info(f"launching PyTorchJob '{name}' in namespace '{namespace}': {self.num_machines} pods, "
                             f"image {self.image_for(environment)}, {self.gpus_for(environment)} GPU(s) each: "
                             + " ".join(command))
            relay = MessageRelay(session, on_message, context)
            finished = False
            with self._api_errors(module, command, name, namespace):
                custom.create_namespaced_custom_object(body=manifest, namespace=namespace, **PYTORCHJOB)
                try:
                    relay.start()
                    condition = self._follow(context, core, custom, reader, name, namespace)
                    finished = True
                    if condition["type"] == "Failed":
                        raise self._failure(f"{module} PyTorchJob '{name}' in namespace '{namespace}'", start,
                                            *self._failed_logs(core, name, namespace, condition), command, name,
                                            namespace)
                finally:
                    relay.stop()
                    if self.delete_pods or not finished:  # cancelled, timed out, or refused: free the GPUs
                        self._delete(context, custom, name, namespace)
        relay.drain()  # the messages the reader got while the session closed
        return job_result(session, time.time() - start, command)

    def _follow(self, context, core, custom, reader, name: str, namespace: str) -> dict:
        """Stream the master pod's log into the Pipes session (once it has started) while polling the job;
        returns the job's final condition."""
        master = f"{name}-master-0"  # the operator's name for replica 0 of Master
        logs: threading.Thread | None = None
        deadline = time.time() + self.pod_wait_timeout_s
        while True:
            condition = _condition(custom.get_namespaced_custom_object(name=name, namespace=namespace, **PYTORCHJOB))
            if logs is None and self._started(core, master, namespace):
                logs = threading.Thread(target=self._consume_logs, args=(context, reader, core, master, namespace),
                                        daemon=True)
                logs.start()
            if condition:
                break
            if time.time() > deadline:
                raise dg.Failure(f"PyTorchJob '{name}' did not finish within {self.pod_wait_timeout_s:.0f}s")
            time.sleep(self.poll_interval_s)
        if logs is not None:
            logs.join(timeout=LOG_DRAIN_TIMEOUT_S)
        return condition

    @staticmethod
    def _started(core, pod: str, namespace: str) -> bool:
        """Whether the pod's log can be read; raises when its container cannot start (e.g. a wrong image)."""
        import kubernetes

        try:
            status = core.read_namespaced_pod(pod, namespace).status
        except kubernetes.client.ApiException as exc:
            if exc.status == 404:  # not created yet
                return False
            raise
        for container in status.container_statuses or []:
            waiting = container.state.waiting if container.state else None
            if waiting is not None and waiting.reason in _STUCK_REASONS:
                raise dg.Failure(f"pod {pod} cannot start: {waiting.reason}: {waiting.message}")
        return status.phase in ("Running", "Succeeded", "Failed")

    @staticmethod
    def _consume_logs(context, reader, core, pod: str, namespace: str) -> None:
        try:
            reader.consume_pod_logs(context=context, core_api=core, pod_name=pod, namespace=namespace)
        except Exception as exc:  # noqa: BLE001 - the job's condition decides the outcome, not the log stream
            context.log.warning(f"stopped reading the log of {pod}: {type(exc).__name__}: {exc}")

    def _failed_logs(self, core, name: str, namespace: str, condition: dict) -> tuple[str, str]:
        """The failure's text (the job's condition and the end of a failed pod's log) and its heading."""
        import kubernetes

        pods = core.list_namespaced_pod(namespace, label_selector=f"{LABEL_PREFIX}/job={name}").items
        failed = [pod.metadata.name for pod in pods if pod.status.phase == "Failed"] or [f"{name}-master-0"]
        text = f"{condition.get('reason', 'Failed')}: {condition.get('message', '')}"
        try:
            tail = core.read_namespaced_pod_log(failed[0], namespace, tail_lines=FAILURE_TAIL_LINES)
        except kubernetes.client.ApiException as exc:
            tail = f"(log of {failed[0]} not readable: {exc.status} {exc.reason})"
        return f"{text}\n{tail}", f"job condition and last log lines of {failed[0]}"

    def _delete(self, context, custom, name: str, namespace: str) -> None:
        import kubernetes

        try:
            custom.delete_namespaced_custom_object(name=name, namespace=namespace, propagation_policy="Background",
                                                   **PYTORCHJOB)
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                context.log.warning(f"could not delete PyTorchJob {name}: {exc.status} {exc.reason}")

    # ---- shared -------------------------------------------------------------------------------------------------

    def kubernetes_apis(self):
        """(CoreV1Api, CustomObjectsApi) with the kube config PipesK8sClient would load: in-cluster when asked or
        when running in a pod (KUBERNETES_SERVICE_HOST) with nothing else set, else a kubeconfig file/context."""
        import kubernetes

        in_cluster = self.load_incluster_config
        if in_cluster is None and not (self.kubeconfig_file or self.kube_context):
            in_cluster = bool(os.getenv("KUBERNETES_SERVICE_HOST"))
        if in_cluster:
            kubernetes.config.load_incluster_config()
        else:
            kubernetes.config.load_kube_config(config_file=self.kubeconfig_file, context=self.kube_context)
        return kubernetes.client.CoreV1Api(), kubernetes.client.CustomObjectsApi()

    @staticmethod
    def _failure(what: str, start: float, text: str, heading: str, command: list[str], name: str,
                 namespace: str) -> dg.Failure:
        return dg.Failure(
            description=(f"{what} failed after {time.time() - start:.0f}s.{cause_hint(text.splitlines())}\n"
                         f"--- {heading} ---\n" + text[-FAILURE_TAIL_CHARS:]),
            metadata={"command": " ".join(command), "pod": name, "namespace": namespace},
        )

    @staticmethod
    @contextlib.contextmanager
    def _api_errors(module: str, command: list[str], name: str, namespace: str):
        """A refusal of the Kubernetes API as a dg.Failure that says what the run's account may lack."""
        import kubernetes

        try:
            yield
        except kubernetes.client.ApiException as exc:
            hint = ""
            if exc.status in (401, 403):
                hint = (" The run's service account may not create/get/delete pods or pytorchjobs, or read pods/log, "
                        "in this namespace (see deploy/k8s/rbac.yaml).")
            elif exc.status == 404 and "pytorchjobs" in str(exc.body or ""):
                hint = " Is the Kubeflow training operator installed (kubectl get crd pytorchjobs.kubeflow.org)?"
            raise dg.Failure(
                description=f"the Kubernetes API refused to run {module} ({exc.status} {exc.reason}).{hint}\n"
                            f"{(exc.body or '')[:2000]}",
                metadata={"command": " ".join(command), "pod": name, "namespace": namespace},
            ) from exc


def main(argv: list[str] | None = None) -> None:
    """Print the manifest the environment's settings would submit for one job (no cluster needed): a Pod, or a
    PyTorchJob when ARENA_K8S_NUM_MACHINES > 1.

    python -m arena_pipeline.resources.k8s_launcher [--no-accelerate] [--environment NAME] MODULE [ARGS...]
    """
    import argparse

    import yaml

    from arena_pipeline.definitions import k8s_launcher

    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("--no-accelerate", action="store_true", help="plain `python -m` (like generation)")
    parser.add_argument("--environment", default="default")
    parser.add_argument("module")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    launcher = k8s_launcher().process_config_and_initialize()  # resolves the dg.EnvVar settings
    if launcher.machines_for(not ns.no_accelerate) > 1:
        manifest = launcher.pytorchjob_manifest("arena-example", ns.module, ns.args, ns.environment)
    else:
        manifest = launcher.pod_manifest(ns.module, ns.args, ns.environment, accelerate=not ns.no_accelerate,
                                         job_name="arena-example")
    yaml.safe_dump(manifest, sys.stdout, sort_keys=False, width=120)


if __name__ == "__main__":
    main()
