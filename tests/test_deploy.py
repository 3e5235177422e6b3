"""Deploy files: systemd unit verified and scored, compose structure, Kubernetes manifests
validated against schemas, PrometheusRule identical to the rule files."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import load_script, unavailable

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SCHEMAS = Path(__file__).parent / "fixtures" / "schemas"
UNIT = DEPLOY / "systemd" / "netstat-exporter.service"


def systemd_analyze():
    path = shutil.which("systemd-analyze")
    if path is None:
        unavailable("systemd-analyze is not installed (Debian package systemd)")
    return path


def unit_with_real_binary(tmp_path) -> Path:
    # verify insists that ExecStart exists: point it at this checkout's console script
    binary = Path(sys.executable).with_name("netstat-exporter")
    unit = tmp_path / "netstat-exporter.service"
    unit.write_text(UNIT.read_text().replace("/opt/netstat-exporter/bin/netstat-exporter", str(binary)))
    return unit


def test_systemd_verify_is_clean(tmp_path):
    done = subprocess.run([systemd_analyze(), "verify", str(unit_with_real_binary(tmp_path))],
                          capture_output=True, text=True)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stderr


def test_systemd_security_exposure(tmp_path):
    done = subprocess.run([systemd_analyze(), "security", "--offline=true", "--no-pager",
                           str(unit_with_real_binary(tmp_path))], capture_output=True, text=True)
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout).group(1))
    assert score <= 2.0, done.stdout


def test_systemd_hardening_choices():
    text = UNIT.read_text()
    directives = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "SystemCallArchitectures": "native",
                       "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
                       "CapabilityBoundingSet": "", "AmbientCapabilities": "",
                       "User": "netstat-exporter"}.items():
        assert directives.get(key) == value, key
    for hidden in ("PrivateNetwork", "ProtectProc", "ProcSubset"):
        assert hidden not in directives, f"{hidden} would hide what we measure"
        assert f"#   {hidden}=" in text  # and the unit says why


def test_compose_structure():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"netstat-exporter", "prometheus", "grafana"}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
    exporter = services["netstat-exporter"]
    assert exporter["network_mode"] == "host"
    assert exporter["environment"]["NETSTAT_EXPORTER_PATH_PROCFS"] == "/host/proc"
    assert "/proc:/host/proc:ro" in exporter["volumes"]
    exporter_port = exporter["environment"]["NETSTAT_EXPORTER_WEB_LISTEN_ADDRESS"].rsplit(":", 1)[1]
    assert exporter["build"]["dockerfile"] == "Dockerfile" and (DEPLOY / exporter["build"]["context"] / "Dockerfile").exists()
    prom_config = yaml.safe_load((DEPLOY / "prometheus" / "compose-prometheus.yml").read_text())
    targets = [t for job in prom_config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"host.docker.internal:{exporter_port}"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    for rule_file in prom_config["rule_files"]:
        assert rule_file in mounted and (DEPLOY / mounted[rule_file]).exists()
    assert "9090:9090" in services["prometheus"]["ports"]
    datasource = yaml.safe_load((ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((ROOT / "grafana" / "provisioning" / "dashboards" / "netstat-exporter.yml").read_text())
    dashboard_dir = provider["providers"][0]["options"]["path"]
    grafana_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"]}
    assert (DEPLOY / grafana_mounts[dashboard_dir] / "netstat-overview.json").exists()
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboard_dir + "/")


def manifests():
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for document in yaml.safe_load_all(path.read_text()):
                yield path.name, document


@pytest.mark.parametrize("name, document", list(manifests()), ids=lambda v: v if isinstance(v, str) else "")
def test_manifest_validates(name, document):
    kind = document["kind"]
    schema = SCHEMAS / f"{kind.lower()}.json"
    if schema.exists():  # CRDs: our schema written from prometheus-operator's CRD
        jsonschema.validate(document, json.loads(schema.read_text()))
    else:
        kubernetes_validate.validate(document, "1.30.0", strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_daemonset_choices():
    ds = yaml.safe_load((K8S / "daemonset.yaml").read_text())
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"operator": "Exists"} in pod["tolerations"]
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    mount = container["volumeMounts"][0]
    assert mount["mountPath"] == "/host/proc" and mount["readOnly"] is True
    assert "--path.procfs=/host/proc" in container["args"]


def test_prometheusrule_is_the_rule_files():
    render = load_script(DEPLOY / "prometheus" / "render.py", "rules_render_k8s")
    alerts = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    recording = (DEPLOY / "prometheus" / "recording.yml").read_text()
    assert (K8S / "prometheusrule.yaml").read_text() == render.prometheus_rule(alerts, recording)
    rule = yaml.safe_load((K8S / "prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == yaml.safe_load(alerts)["groups"] + yaml.safe_load(recording)["groups"]


SECURE = K8S / "secure"


def merged(base: dict, patch: dict) -> dict:
    """A strategic merge patch as kubectl applies ours: maps merge, lists of named items merge
    by name, a null deletes."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        elif isinstance(value, list) and isinstance(out.get(key), list) and all(
                isinstance(v, dict) and ("name" in v or "port" in v) for v in value + out[key]):
            by_name = {v.get("name", v.get("port")): v for v in out[key]}
            for item in value:
                name = item.get("name", item.get("port"))
                by_name[name] = merged(by_name[name], item) if name in by_name else item
            out[key] = list(by_name.values())
        else:
            out[key] = value
    return out


def test_secure_overlay_patches_validate_and_its_web_config_loads(tmp_path):
    import trustme
    from exporter import webconfig
    kustomization = yaml.safe_load((SECURE / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["..", "web-config-secret.yaml"]
    secret = yaml.safe_load((SECURE / "web-config-secret.yaml").read_text())
    kubernetes_validate.validate(secret, "1.30.0", strict=True)
    for entry in kustomization["patches"]:
        patch = yaml.safe_load((SECURE / entry["path"]).read_text())
        base_name = {"DaemonSet": "daemonset.yaml", "ServiceMonitor": "servicemonitor.yaml"}[patch["kind"]]
        document = merged(yaml.safe_load((K8S / base_name).read_text()), patch)
        if patch["kind"] == "ServiceMonitor":
            jsonschema.validate(document, json.loads((SCHEMAS / "servicemonitor.json").read_text()))
            assert document["spec"]["endpoints"][0]["scheme"] == "https"
        else:
            kubernetes_validate.validate(document, "1.30.0", strict=True)
            (container,) = document["spec"]["template"]["spec"]["containers"]
            env = {e["name"]: e.get("value") for e in container["env"]}
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert env["NETSTAT_EXPORTER_WEB_CONFIG_FILE"] == mounts["web-config"] + "/web.yml"
            assert "httpGet" not in container["livenessProbe"]
            assert container["livenessProbe"]["exec"]["command"][-1] == "healthcheck"
    # the Secret's web.yml works with the files cert-manager writes beside it
    ca = trustme.CA()
    server = ca.issue_cert("node.example.org")
    server.cert_chain_pems[0].write_to_path(tmp_path / "tls.crt")
    server.private_key_pem.write_to_path(tmp_path / "tls.key")
    ca.cert_pem.write_to_path(tmp_path / "ca.crt")
    (tmp_path / "web.yml").write_text(secret["stringData"]["web.yml"])
    config = webconfig.load(str(tmp_path / "web.yml"))
    assert config.tls is not None and set(config.users) == {"prometheus"}
    example = DEPLOY / "web" / "web-config.example.yml"
    (tmp_path / "web.yml").write_text(example.read_text())
    assert webconfig.load(str(tmp_path / "web.yml")).tls is not None


def test_systemd_limits_fit_the_connection_cap():
    from exporter.config import Config
    from exporter.server import RESERVED_DESCRIPTORS
    unit = UNIT.read_text()
    nofile = int(re.search(r"^LimitNOFILE=(\d+)$", unit, re.M).group(1))
    tasks = int(re.search(r"^TasksMax=(\d+)$", unit, re.M).group(1))
    assert nofile >= Config().max_connections + 2 * RESERVED_DESCRIPTORS
    assert 8 <= tasks <= 64  # threads do not grow with connections
