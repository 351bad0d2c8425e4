"""deploy/: the Kubernetes manifests, the systemd unit, the AppArmor profile and
the Containerfile, validated offline by the tools that will read them.

* Kubernetes: ``kubernetes-validate --strict`` (the API's OpenAPI schemas,
  rejecting unknown fields) for the oldest version with the fields we use
  (1.30: ``appArmorProfile``) and the newest it knows; then what the schemas
  cannot say: least privilege, probes on a declared port, the Service selecting
  the DaemonSet's pods, arguments the agent accepts, a policy the agent loads.
* systemd: ``systemd-analyze verify`` with any output treated as a failure
  (it only warns, exit 0, about unknown keys), and ``systemd-analyze security``.
* AppArmor: ``apparmor_parser -Q`` (parse and compile, load nothing).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from corepeek.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
UNIT = ROOT / "deploy" / "systemd" / "corepeek-agent.service"
APPARMOR = ROOT / "deploy" / "apparmor" / "corepeek-agent"
CAPS = ["SYS_PTRACE", "DAC_READ_SEARCH", "CHECKPOINT_RESTORE"]


def manifests() -> list[Path]:
    return sorted(K8S.glob("*.yaml"))


def docs() -> dict[str, dict]:
    out = {}
    for path in manifests():
        for doc in yaml.safe_load_all(path.read_text()):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def kubernetes_validate(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("kubernetes-validate")
    cmd = [exe] if exe else [sys.executable, "-m", "kubernetes_validate"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


# -- Kubernetes ------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["1.30.0", None])
def test_manifests_validate_strictly(version: str | None) -> None:
    pytest.importorskip("kubernetes_validate")
    args = ["--strict", *(["-k", version] if version else []), *map(str, manifests())]
    res = kubernetes_validate(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "passed" in res.stdout and "ERROR" not in res.stdout + res.stderr
    assert len(manifests()) >= 5


def test_strict_validation_is_really_strict(tmp_path: Path) -> None:
    pytest.importorskip("kubernetes_validate")
    bad = tmp_path / "bad.yaml"
    bad.write_text((K8S / "daemonset.yaml").read_text().replace(
        "hostPID: true", "hostPID: true\n      hostPIDs: true"))
    res = kubernetes_validate("--strict", str(bad))
    assert res.returncode != 0 and "hostPIDs" in res.stdout + res.stderr


def _agent_container(ds: dict) -> dict:
    [c] = ds["spec"]["template"]["spec"]["containers"]
    return c


def test_daemonset_is_least_privilege() -> None:
    ds = docs()["DaemonSet/corepeek-agent"]
    pod = ds["spec"]["template"]["spec"]
    c = _agent_container(ds)
    sc = c["securityContext"]
    assert pod["hostPID"] is True and not pod.get("hostNetwork") and not pod.get("hostIPC")
    assert pod["automountServiceAccountToken"] is False
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"], "add": CAPS}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["appArmorProfile"]["type"] in ("Unconfined", "Localhost")
    assert not [v for v in pod["volumes"] if "hostPath" in v], "no host filesystem"
    limits = c["resources"]["limits"]
    assert {"cpu", "memory"} <= set(limits) and c["resources"]["requests"]
    # every added capability is explained by the comment lines above it
    text = (K8S / "daemonset.yaml").read_text().splitlines()
    for cap in CAPS:
        i = next(n for n, line in enumerate(text) if line.strip() == f"- {cap}")
        assert text[i - 1].strip().startswith("#"), f"{cap} has no comment saying why"


def test_daemonset_wiring_matches_the_agents_command_line() -> None:
    d = docs()
    ds = d["DaemonSet/corepeek-agent"]
    c = _agent_container(ds)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    args = build_parser().parse_args(c["args"])          # the agent accepts its arguments
    assert args.command == "agent" and args.log_format == "json"
    assert int(args.listen.rsplit(":", 1)[1]) == ports["grpc"]
    assert int(args.health_address.rsplit(":", 1)[1]) == ports["health"]
    assert int(args.metrics_address.rsplit(":", 1)[1]) == ports["metrics"]
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["grpc"]["port"] == ports["health"], probe
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert mounts["tls"]["readOnly"] and vols["tls"]["secret"]["secretName"]
    for path in (args.tls_cert, args.tls_key, args.tls_ca):
        assert path.startswith(mounts["tls"]["mountPath"] + "/")
    assert args.policy.startswith(mounts["policy"]["mountPath"] + "/")
    cm = d[f"ConfigMap/{vols['policy']['configMap']['name']}"]
    assert Path(args.policy).name in cm["data"]
    # the Service: headless, selecting exactly the DaemonSet's pods, on its named ports
    svc = d["Service/corepeek-agent"]
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= labels.items()
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    # collect --kubernetes finds these pods with its default selector, in this namespace
    from corepeek.collect import DEFAULT_K8S_NAMESPACE, DEFAULT_K8S_SELECTOR
    key, value = DEFAULT_K8S_SELECTOR.split("=")
    assert labels[key] == value and ds["metadata"]["namespace"] == DEFAULT_K8S_NAMESPACE
    np = d["NetworkPolicy/corepeek-agent"]
    assert np["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    role = d["Role/corepeek-collector"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}]


def test_the_configmap_policy_loads_in_the_agent(tmp_path: Path) -> None:
    from corepeek_agent.policy import load_policy

    cm = docs()["ConfigMap/corepeek-policy"]
    path = tmp_path / "policy.yaml"
    path.write_text(cm["data"]["policy.yaml"])
    policy = load_policy(str(path))
    assert [r.name for r in policy.rules] == ["fleet-collector"]


# -- systemd ---------------------------------------------------------------------------------------

def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("SKIPPED LOUDLY: systemd-analyze is not installed (apt-get install systemd); "
                    "the systemd unit was NOT verified")
    return exe


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this machine's `corepeek` (verify checks
    that the binary exists and is executable)."""
    corepeek = shutil.which("corepeek")
    assert corepeek, "the corepeek entry point is not installed (pip install -e .)"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/corepeek", corepeek))
    return unit


def test_systemd_unit_verifies_without_any_warning(tmp_path: Path) -> None:
    exe = _systemd_analyze()
    unit = _unit_for_this_machine(tmp_path)
    res = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stderr.strip() == "" and res.stdout.strip() == "", \
        f"rc={res.returncode}\n{res.stdout}{res.stderr}"
    # the check is real: an unknown key is reported (as a warning, exit status 0)
    bad = tmp_path / "bad-corepeek.service"
    bad.write_text(unit.read_text().replace("LockPersonality=yes", "LockPersonality=yes\nBogus=1"))
    res = subprocess.run([exe, "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "Bogus" in res.stderr


def test_systemd_unit_is_hardened(tmp_path: Path) -> None:
    exe = _systemd_analyze()
    text = UNIT.read_text()
    settings: dict[str, list[str]] = {}
    for line in re.sub(r"\\\n\s*", " ", text).splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            k, _, v = line.partition("=")
            settings.setdefault(k.strip(), []).append(v.strip())
    caps = " ".join(f"CAP_{c}" for c in CAPS)
    assert settings["CapabilityBoundingSet"] == [caps] == settings["AmbientCapabilities"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
                       "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
                       "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
                       "RestrictNamespaces": "yes", "RestrictSUIDSGID": "yes",
                       "SystemCallArchitectures": "native", "LimitCORE": "0"}.items():
        assert settings[key] == [value], key
    assert settings["User"] != ["root"]
    assert "ptrace" in settings["SystemCallFilter"][0]
    # ProtectProc=invisible / ProcSubset=pid / PrivateUsers would hide the processes to capture
    assert settings.get("ProtectProc") in (None, ["default"])
    assert "ProcSubset" not in settings and "PrivateUsers" not in settings
    # ExecStart is a command line the agent accepts
    argv = settings["ExecStart"][0].split()
    assert Path(argv[0]).name == "corepeek"
    assert build_parser().parse_args(argv[1:]).command == "agent"
    res = subprocess.run([exe, "security", "--offline=yes", str(_unit_for_this_machine(tmp_path))],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    assert float(m.group(1)) <= 3.0, res.stdout


# -- AppArmor, Containerfile -------------------------------------------------------------------------

def test_apparmor_profile_compiles() -> None:
    exe = shutil.which("apparmor_parser")
    if exe is None:
        pytest.skip("SKIPPED LOUDLY: apparmor_parser is not installed (apt-get install "
                    "apparmor); the AppArmor profile was NOT checked")
    res = subprocess.run([exe, "-Q", "-K", str(APPARMOR)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    text = APPARMOR.read_text()
    assert "ptrace (trace, read) peer=**," in text
    for cap in CAPS:
        assert f"capability {cap.lower()}," in text


def test_containerfile_installs_the_package_and_runs_the_agent() -> None:
    text = (ROOT / "deploy" / "Containerfile").read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(froms) == 2 and all(":" in f for f in froms), "pinned base images"
    assert 'ENTRYPOINT ["corepeek"]' in text and "pip install" in text
    assert "PYTHONDONTWRITEBYTECODE=1" in text           # read-only root filesystem
    for port in ("7443", "7444", "9464"):
        assert port in re.search(r"^EXPOSE (.*)$", text, re.M).group(1)
