"""The deployment artifacts in deploy/, checked by the tools their platforms use (or their schemas),
and against the metrics a real proxy exports."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import BIN_DIR, MISSING_CHECKER

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent


def tool(name):
    """A checker on PATH or in the venv; CI (KSP_REQUIRE_ALL_TOOLS=1) must have every one.
    A local run skips without it, and conftest's terminal summary lists every such skip."""
    path = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    if path is None:
        if os.environ.get("KSP_REQUIRE_ALL_TOOLS") == "1":
            pytest.fail(f"{name} is not installed")
        pytest.skip(f"{MISSING_CHECKER}{name} is not installed (.ci/run installs it)")
    return path


def run(*args, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, **kw)
    assert r.returncode == 0, f"{args[0]} failed:\n{r.stdout}\n{r.stderr}"
    return r


def test_dockerfile_lints_clean():
    run(tool("hadolint"), "--failure-threshold", "info", DEPLOY / "Dockerfile")
    text = (DEPLOY / "Dockerfile").read_text()
    assert "distroless" in text and re.search(r"^USER 65532", text, re.M)
    assert "EXPOSE 9042 9464" in text and "HEALTHCHECK" in text
    # Settings as ENV would beat a mounted config file: the image's are a --defaults file.
    assert not re.search(r"^ENV\b.*KEYSPACES_PROXY_", text, re.M)
    assert "COPY deploy/image-defaults.toml /etc/keyspaces-proxy/defaults.toml" in text
    assert re.search(r'^ENTRYPOINT \[.*"--defaults", "/etc/keyspaces-proxy/defaults.toml"\]', text, re.M)


def test_the_images_defaults_lose_to_the_operators_settings(tmp_path, aws_env):
    """--print-config with the image's defaults file: a config file and the environment win."""
    defaults = DEPLOY / "image-defaults.toml"

    def effective(*args, env=None):
        out = run(BIN_DIR / "keyspaces-proxy", "--defaults", defaults, *args, "--print-config",
                  env=env or aws_env)
        import tomllib
        return tomllib.loads(out.stdout)

    image = effective()
    assert (image["listen"], image["metrics-listen"], image["log-format"]) == \
        ("127.0.0.1:9042", "0.0.0.0:9464", "json")
    config = tmp_path / "proxy.toml"
    config.write_text('metrics-listen = "127.0.0.5:9464"\nlog-format = "text"\n')
    mine = effective("--config", config)
    assert (mine["metrics-listen"], mine["log-format"], mine["listen"]) == \
        ("127.0.0.5:9464", "text", "127.0.0.1:9042")
    env = dict(aws_env, KEYSPACES_PROXY_LOG_FORMAT="json")
    assert effective("--config", config, env=env)["log-format"] == "json"


def test_kubernetes_manifests_validate():
    run(tool("kubernetes-validate"), "--strict", *sorted((DEPLOY / "kubernetes").glob("*.yaml")))
    docs = [d for f in (DEPLOY / "kubernetes").glob("*.yaml") for d in yaml.safe_load_all(f.read_text())]
    # No usable password ships: Secrets are the operator's to create.
    assert not [d for d in docs if d["kind"] == "Secret"], "a manifest ships a Secret"
    # The shared Deployment is reachable only through its NetworkPolicy.
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    shared = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "keyspaces-proxy"]
    assert shared and policies
    selected = policies[0]["spec"]["podSelector"]["matchLabels"]
    assert selected.items() <= shared[0]["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["port"] for rule in policies[0]["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {9042, 9464} and all(rule.get("from") for rule in policies[0]["spec"]["ingress"])
    accounts = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert all("eks.amazonaws.com/role-arn" in a["metadata"]["annotations"] for a in accounts)
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        pod = d["spec"]["template"]["spec"]
        proxies = [c for c in pod.get("containers", []) + pod.get("initContainers", [])
                   if c["name"] == "keyspaces-proxy"]
        assert len(proxies) == 1
        p = proxies[0]
        # Liveness and startup follow the process; upstream trouble never restarts the proxy.
        assert p["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert p.get("startupProbe", {}).get("httpGet", {}).get("path", "/livez") == "/livez"
        if p in pod.get("initContainers", []):
            # A native sidecar's readiness is its pod's: no upstream in it.
            assert "readinessProbe" not in p
        else:
            # The Service stops routing before the listener closes, and the drain fits after.
            wait = p["lifecycle"]["preStop"]["sleep"]["seconds"]
            assert wait >= 5 and pod["terminationGracePeriodSeconds"] >= wait + 20
            assert p["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert p["readinessProbe"]["failureThreshold"] * p["readinessProbe"]["periodSeconds"] >= 30
        assert p["resources"]["requests"]


def test_helm_chart_values_match_its_schema():
    import jsonschema

    chart = DEPLOY / "helm" / "keyspaces-proxy"
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["name"] == "keyspaces-proxy"
    schema = json.loads((chart / "values.schema.json").read_text())
    values = yaml.safe_load((chart / "values.yaml").read_text())
    validator = jsonschema.Draft7Validator(schema)
    # Shared mode needs a users Secret; sidecar mode does not.
    assert list(validator.iter_errors(values)), "shared mode without clientAuth.existingSecret"
    shared = {**values, "clientAuth": {"existingSecret": "users"}}
    assert not list(validator.iter_errors(shared))
    sidecar = {**values, "mode": "sidecar"}
    assert not list(validator.iter_errors(sidecar))
    assert list(validator.iter_errors({**shared, "region": "US East"}))
    assert list(validator.iter_errors({**shared, "extraArgs": ["--pool-max-connections 32"]})), \
        "a flag and its value in one argument"
    assert not list(validator.iter_errors({**shared, "extraArgs": ["--kmsauth-context=env: prod"]}))
    # Mutual TLS needs the proxy's certificate and the client CA, not a users Secret.
    mtls = {**values, "clientAuth": {"mode": "mtls"}}
    assert list(validator.iter_errors(mtls)), "mtls without certificates"
    mtls["clientTls"] = {"existingSecret": "proxy-tls", "clientCaSecret": ""}
    assert list(validator.iter_errors(mtls)), "mtls without a client CA"
    mtls["clientTls"] = {"existingSecret": "proxy-tls", "clientCaSecret": "client-ca"}
    assert not list(validator.iter_errors(mtls))
    assert list(validator.iter_errors({**shared, "clientTls": {"clientCaSecret": "ca"}})), \
        "a client CA without the proxy's own certificate"
    assert not list(validator.iter_errors({**shared, "clientTls": {"existingSecret": "proxy-tls"}}))


def helm_template(chart, *sets, check=True):
    args = [tool("helm"), "template", "t", chart] + [a for kv in sets for a in ("--set", kv)]
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def rendered(r):
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def proxy_container(docs, kind="Deployment"):
    pod = next(d for d in docs if d["kind"] == kind)["spec"]["template"]["spec"]
    return next(c for c in pod.get("containers", []) + pod.get("initContainers", [])
                if c["name"] == "keyspaces-proxy")


def test_helm_chart_renders_both_modes(tmp_path):
    chart = DEPLOY / "helm" / "keyspaces-proxy"
    # Shared: readiness on the upstream (after 30 s), liveness on the process, a NetworkPolicy,
    # extra arguments quoted whatever they hold.
    r = helm_template(chart, "clientAuth.existingSecret=users", "extraArgs[0]=--kmsauth-context=env: prod")
    docs = rendered(r)
    out = tmp_path / "shared.yaml"
    out.write_text(r.stdout)
    run(tool("kubernetes-validate"), "--strict", out)
    c = proxy_container(docs)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["failureThreshold"] * c["readinessProbe"]["periodSeconds"] >= 30
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez" and "startupProbe" not in c
    assert "--kmsauth-context=env: prod" in c["args"] and "--worker-threads=2" in c["args"]
    assert c["image"].endswith(":0.1.0")
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] >= 5
    grace = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert grace["terminationGracePeriodSeconds"] >= c["lifecycle"]["preStop"]["sleep"]["seconds"] + 20
    # extraArgs may repeat a flag the chart sets: the proxy takes the last (it used to refuse
    # to start), and files they name can be mounted.
    r = helm_template(chart, "clientAuth.existingSecret=users", "workerThreads=0",
                      "extraArgs[0]=--worker-threads=4", "extraVolumes[0].name=roles",
                      "extraVolumes[0].configMap.name=roles", "extraVolumeMounts[0].name=roles",
                      "extraVolumeMounts[0].mountPath=/etc/keyspaces-proxy/roles")
    out.write_text(r.stdout)
    run(tool("kubernetes-validate"), "--strict", out)
    c = proxy_container(rendered(r))
    assert "--worker-threads=0" in c["args"], "0 (one thread per core) is a value, not a default"
    assert {"name": "roles", "mountPath": "/etc/keyspaces-proxy/roles"} in c["volumeMounts"]
    effective = run(BIN_DIR / "keyspaces-proxy", *c["args"], "--print-config")
    assert "worker-threads = 4" in effective.stdout
    v6 = proxy_container(rendered(helm_template(chart, "clientAuth.existingSecret=users", "bindAddress=[::]")))
    assert {"--listen=[::]:9042", "--metrics-listen=[::]:9464"} <= set(v6["args"])
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {9042, 9464}
    # Mutual TLS: the certificate Secrets mounted, no users Secret needed.
    docs = rendered(helm_template(chart, "clientAuth.mode=mtls", "clientTls.existingSecret=tls",
                                  "clientTls.clientCaSecret=ca"))
    c = proxy_container(docs)
    assert {"--client-auth=mtls", "--client-tls-cert=/etc/keyspaces-proxy/tls/tls.crt",
            "--client-ca=/etc/keyspaces-proxy/client-ca/ca.crt"} <= set(c["args"])
    assert not helm_template(chart, check=False).returncode == 0, "shared mode needs a users Secret"

    # Sidecar: included from an application's chart, whose appVersion must not become the
    # proxy's image tag; probes on the process only; one worker thread.
    app = tmp_path / "app"
    (app / "templates").mkdir(parents=True)
    (app / "charts").mkdir()
    shutil.copytree(chart, app / "charts" / "keyspaces-proxy")
    (app / "Chart.yaml").write_text("apiVersion: v2\nname: app\nversion: 1.0.0\nappVersion: \"9.9.9\"\n"
                                    "dependencies:\n  - name: keyspaces-proxy\n    version: 0.1.0\n")
    (app / "values.yaml").write_text("keyspaces-proxy:\n  mode: sidecar\n")
    (app / "templates" / "deployment.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\nspec:\n"
        "  selector: {matchLabels: {app: app}}\n  template:\n    metadata: {labels: {app: app}}\n"
        "    spec:\n      containers: [{name: app, image: app:9.9.9}]\n      initContainers:\n"
        "        {{- include \"keyspaces-proxy.sidecar\" (dict \"Values\" (index .Values \"keyspaces-proxy\")"
        " \"Chart\" .Chart \"Release\" .Release) | nindent 8 }}\n")
    r = helm_template(app, check=False)
    assert r.returncode != 0 and "image.tag is required in sidecar mode" in r.stderr, r.stderr
    docs = rendered(helm_template(app, "keyspaces-proxy.image.tag=0.1.0"))
    c = proxy_container(docs)
    assert c["image"].endswith(":0.1.0") and c["restartPolicy"] == "Always"
    assert "readinessProbe" not in c
    assert c["startupProbe"]["httpGet"]["path"] == "/livez" == c["livenessProbe"]["httpGet"]["path"]
    assert "--worker-threads=1" in c["args"] and not any(a.startswith("--listen") for a in c["args"])


def test_systemd_unit_verifies(tmp_path):
    analyze = tool("systemd-analyze")
    unit = (DEPLOY / "systemd" / "keyspaces-proxy.service").read_text()
    for key in ["DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=",
                "RestartPreventExitStatus=2", "AssertPathExists=/etc/keyspaces-proxy/proxy.toml"]:
        assert key in unit
    # Settings in Environment= would beat proxy.toml; secrets belong in LoadCredential= files.
    assert not re.search(r"^(Environment=KEYSPACES_PROXY_|EnvironmentFile=)", unit, re.M)
    # A configuration that cannot work exits 2, which the unit does not restart.
    bad = subprocess.run([str(BIN_DIR / "keyspaces-proxy"), "--config", "/nonexistent/proxy.toml"],
                         capture_output=True, timeout=30)
    assert bad.returncode == 2, bad
    bad = subprocess.run([str(BIN_DIR / "keyspaces-proxy"), "--region", "us-east-1", "--client-auth",
                          "password", "--metrics-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"],
                         capture_output=True, timeout=30)
    assert bad.returncode == 2 and b"needs users" in bad.stderr, bad
    local = tmp_path / "keyspaces-proxy.service"
    local.write_text(unit.replace("/usr/local/bin/keyspaces-proxy", str(BIN_DIR / "keyspaces-proxy")))
    run(analyze, "verify", local)


def test_prometheus_rules_and_scrape_config(tmp_path):
    promtool = tool("promtool")
    run(promtool, "check", "rules", DEPLOY / "prometheus" / "alerts.yml")
    # Every alert is unit-tested: a series that fires it, and one that must not.
    run(promtool, "test", "rules", DEPLOY / "prometheus" / "alerts.test.yml")
    alerts = {r["alert"] for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
              for r in g["rules"]}
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts.test.yml").read_text())["tests"]
    for alert in alerts:
        cases = [(t, a) for t in tests for a in t["alert_rule_test"] if a["alertname"] == alert]
        fired = {e["exp_labels"]["instance"] for _, a in cases for e in a["exp_alerts"]}
        inputs = {re.search(r'instance="([^"]+)"', i["series"]).group(1)
                  for t, _ in cases for i in t["input_series"] if "instance=" in i["series"]}
        assert fired, f"{alert}: no test fires it"
        assert inputs - fired, f"{alert}: no series that must not fire it"
    # Debian builds Prometheus without Kubernetes discovery: check the other jobs with promtool
    # and the Kubernetes one's shape here.
    config = yaml.safe_load((DEPLOY / "prometheus" / "scrape.yml").read_text())
    k8s = [j for j in config["scrape_configs"] if "kubernetes_sd_configs" in j]
    assert k8s and all(j["kubernetes_sd_configs"] == [{"role": "pod"}] for j in k8s)
    # Only the proxy's own container and port: `up` under the job is the proxy's alone.
    for job in k8s:
        keep = job["relabel_configs"][0]
        assert keep["action"] == "keep" and keep["regex"] == "keyspaces-proxy;metrics", keep
    rest = {"scrape_configs": [j for j in config["scrape_configs"] if j not in k8s]}
    scrape = tmp_path / "scrape.yml"
    scrape.write_text(yaml.safe_dump(rest))
    run(promtool, "check", "config", "--syntax-only", scrape)


def test_ecs_task_definition_matches_the_ecs_api():
    import botocore.session
    from botocore.validate import ParamValidator

    task = json.loads((DEPLOY / "ecs" / "task-definition.json").read_text())
    model = botocore.session.get_session().get_service_model("ecs")
    shape = model.operation_model("RegisterTaskDefinition").input_shape
    report = ParamValidator().validate(task, shape)
    assert not report.has_errors(), report.generate_report()
    proxy = next(c for c in task["containerDefinitions"] if c["name"] == "keyspaces-proxy")
    # An essential container's health check that followed Keyspaces would have ECS replace
    # every task, the application with it, during an AWS outage.
    assert proxy["healthCheck"]["command"][1:] == ["/usr/local/bin/keyspaces-proxy", "--defaults",
                                                   "/etc/keyspaces-proxy/defaults.toml", "probe",
                                                   "--path", "/livez"]
    # A log group that does not exist yet fails the task at start unless it is created.
    assert all(c["logConfiguration"]["options"].get("awslogs-create-group") == "true"
               for c in task["containerDefinitions"])
    app = next(c for c in task["containerDefinitions"] if c["name"] == "app")
    assert app["dependsOn"] == [{"containerName": "keyspaces-proxy", "condition": "HEALTHY"}]
    assert task["taskRoleArn"].startswith("arn:aws:iam::")


def test_dashboard_and_alerts_use_only_metrics_the_proxy_exports(start_emulator, start_proxy):
    import urllib.request

    emu = start_emulator(listen_on_peers=False)
    proxy = start_proxy(emu)
    text = urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/metrics", timeout=10).read().decode()
    exported = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            exported.add(name)
            if kind == "counter":
                exported.add(name + "_total")
            if kind == "histogram":
                exported.update({name + "_bucket", name + "_sum", name + "_count"})
    used = set()
    dashboard = (DEPLOY / "grafana" / "keyspaces-proxy.json").read_text()
    # A rate is shown per second, whatever else its panel shows (a refresh rate once showed
    # as seconds beside the credentials' expiry).
    per_second = {"reqps", "ops", "Bps", "binBps", "cps", "rps", "short"}
    for panel in json.loads(dashboard)["panels"]:
        config = panel.get("fieldConfig", {})
        for t in panel.get("targets", []):
            if "rate(" not in t["expr"] or "histogram_quantile" in t["expr"]:
                continue
            unit = config.get("defaults", {}).get("unit")
            for o in config.get("overrides", []):
                if o["matcher"] == {"id": "byFrameRefID", "options": t["refId"]}:
                    unit = next((p["value"] for p in o["properties"] if p["id"] == "unit"), unit)
            assert unit in per_second, f"{panel['title']}: {t['expr']} shown in {unit}"
    for source in [dashboard, (DEPLOY / "prometheus" / "alerts.yml").read_text()]:
        used |= set(re.findall(r"keyspaces_proxy_[a-z_]+", source))
    assert used and used <= exported, sorted(used - exported)
