"""Which agents a collection talks to: address lists and Kubernetes discovery.

Owns :class:`Endpoint` (one agent to dial), the parsing of ``--agents`` and
``--agents-file``, and turning the pods of the agent DaemonSet into endpoints
(:func:`discover_kubernetes`; the ``kubernetes`` package is imported only
there).  Pure except for that one API call.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import CaptureError

DEFAULT_PORT = 7443                  # the agent's TCP port in deploy/
DEFAULT_K8S_NAMESPACE = "corepeek"
DEFAULT_K8S_SELECTOR = "app.kubernetes.io/name=corepeek-agent"


@dataclass(frozen=True)
class Endpoint:
    """One agent to collect from.

    ``address`` is what :func:`corepeek.channel.open_channel` dials; ``label``
    names it for people (``node/pod``, or the address).  ``host``, when set,
    is the host name the manifest uses instead of the hostname the agent
    reports: a DaemonSet pod's hostname is the pod's name, its node is the
    host.  An endpoint with ``error`` set is not dialled: it is reported in the
    manifest as it is (a pod without an IP, say).
    """

    address: str
    label: str = ""
    error: str = ""
    host: str = ""

    @property
    def name(self) -> str:
        return self.label or self.address


def parse_agent_list(values: Iterable[str]) -> list[str]:
    """``--agents a,b --agents c`` -> ``[a, b, c]``: split on commas and whitespace,
    drop empties and duplicates, keep the order."""
    out: list[str] = []
    for value in values:
        for item in re.split(r"[,\s]+", value):
            if item and item not in out:
                out.append(item)
    return out


def read_agents_file(text: str) -> list[str]:
    """An agents file: addresses separated by newlines or commas; ``#`` starts a comment."""
    return parse_agent_list(line.split("#", 1)[0] for line in text.splitlines())


def format_host_port(host: str, port: int) -> str:
    """``10.0.0.1:7443``, ``[fd00::1]:7443``."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


# -- Kubernetes pods -> endpoints ------------------------------------------------------

def pod_endpoint(pod: Any, port: int | None = None, port_name: str = "grpc") -> Endpoint | None:
    """The agent endpoint of one pod (a ``kubernetes.client.V1Pod``).

    ``port``: explicit, else the container port named ``port_name``, else
    :data:`DEFAULT_PORT`.  Pods being deleted, and pods that finished
    (Succeeded/Failed), are skipped (None); a pod without an IP yet (Pending) is
    an endpoint with ``error`` set, so the manifest shows its node has no agent.
    """
    meta, spec, status = pod.metadata, pod.spec, pod.status
    if meta is not None and meta.deletion_timestamp is not None:
        return None
    phase = getattr(status, "phase", None) or "Unknown"
    if phase in ("Succeeded", "Failed"):
        return None
    name = meta.name if meta is not None else "?"
    node = getattr(spec, "node_name", None) or ""
    label = f"{node}/{name}" if node else name
    if port is None:
        port = DEFAULT_PORT
        for c in (getattr(spec, "containers", None) or []):
            for p in (c.ports or []):
                if p.name == port_name:
                    port = int(p.container_port)
    ip = getattr(status, "pod_ip", None)
    if not ip:
        return Endpoint(address=f"pod/{name}", label=label, host=node or name,
                        error=f"pod {name} on node {node or '(unscheduled)'} is {phase} "
                              "and has no IP yet")
    return Endpoint(address=format_host_port(ip, port), label=label, host=node or name)


class PodLister(Protocol):
    def list_namespaced_pod(self, namespace: str, **kwargs: Any) -> Any: ...


def discover_kubernetes(namespace: str = DEFAULT_K8S_NAMESPACE,
                        selector: str = DEFAULT_K8S_SELECTOR, *, port: int | None = None,
                        api: PodLister | None = None) -> list[Endpoint]:
    """The agent pods of the DaemonSet: ``list_namespaced_pod(namespace,
    label_selector=selector)`` through the official client's ``CoreV1Api``.

    Without ``api``, the ``kubernetes`` package (the ``[kubernetes]`` extra) is
    imported here, and the configuration is the in-cluster service account or,
    outside a cluster, the kubeconfig.  The collector's service account needs
    ``list`` on ``pods`` in the namespace (deploy/kubernetes/collector-rbac.yaml).
    """
    if api is None:
        try:
            from kubernetes import client, config
        except ImportError:
            raise CaptureError("--kubernetes needs the kubernetes package: "
                               "pip install 'corepeek[kubernetes]'") from None
        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config()
            except Exception as exc:  # noqa: BLE001 - any config failure is one line
                raise CaptureError(f"no Kubernetes configuration: {exc}") from None
        api = client.CoreV1Api()
    try:
        pods = api.list_namespaced_pod(namespace, label_selector=selector)
    except Exception as exc:  # noqa: BLE001 - ApiException, urllib3 errors
        reason = getattr(exc, "reason", None) or exc
        raise CaptureError(f"cannot list pods in namespace {namespace!r} with selector "
                           f"{selector!r}: {reason}") from None
    out = [e for e in (pod_endpoint(p, port) for p in pods.items) if e is not None]
    return sorted(out, key=lambda e: e.label)
