#!/usr/bin/env bash
# Validates deploy/kubernetes against the Kubernetes API schemas of a stated
# version with kubernetes-validate (PyPI), strictly (unknown fields are
# errors), then checks what no schema knows:
#   - the ServiceMonitor (a Prometheus Operator CRD, for which
#     kubernetes-validate has no schema): its required fields, and that it
#     selects a Service of this directory by a port that Service has;
#   - kustomization.yaml lists every manifest here, and only existing ones;
#   - the gateway's drain fits in its grace period: terminationGracePeriodSeconds
#     >= preStop sleep + SWITCHBOARD_DRAIN_TIMEOUT + 5 s, and the probes ask
#     /readyz and /healthz on the control port.
#
#   bash deploy/kubernetes/validate.sh          # K8S_VERSION=1.30.0 by default
#
# Installs kubernetes-validate (pinned, from PyPI) and PyYAML into its own
# virtualenv, ${CARGO_TARGET_DIR:-target}/k8s-venv (K8S_VENV overrides), so
# it needs only python3 with venv; renders with `kubectl kustomize` when
# kubectl is installed (else validates the files one by one, without the
# kustomization's namespace and labels).
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd ../.. && pwd)
version=${K8S_VERSION:-1.30.0}
validator_version=1.37.0
venv=${K8S_VENV:-${CARGO_TARGET_DIR:-$root/target}/k8s-venv}
if ! "$venv/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$validator_version"; then
    echo "validate.sh: installing kubernetes-validate==$validator_version into $venv"
    python3 -m venv "$venv"
    timeout 600 "$venv/bin/python" -m pip install --disable-pip-version-check -q \
        "kubernetes-validate==$validator_version" pyyaml
fi
PATH="$venv/bin:$PATH"
echo "kubernetes-validate $(kubernetes-validate --version), Kubernetes $version"

rendered=$(mktemp)
trap 'rm -f "$rendered"' EXIT
if command -v kubectl >/dev/null 2>&1; then
    kubectl kustomize . >"$rendered"
    echo "rendered with kubectl kustomize ($(grep -c '^kind:' "$rendered") resources)"
else
    for f in $(python3 -c 'import yaml; print(" ".join(yaml.safe_load(open("kustomization.yaml"))["resources"]))'); do
        cat "$f"
        echo "---"
    done >"$rendered"
    echo "kubectl not installed: validating the files without kustomize"
fi

# The schemas. kubernetes-validate only warns about kinds it has no schema
# for; the ServiceMonitor is the only one allowed to be in that case.
out=$(kubernetes-validate --strict --quiet -k "$version" "$rendered" 2>&1) || {
    echo "$out"
    exit 1
}
unknown=$(echo "$out" | grep "Couldn't find schema" | grep -v "kind ServiceMonitor " || true)
if [ -n "$unknown" ]; then
    echo "$unknown"
    echo "validate.sh: a resource has no schema to validate against" >&2
    exit 1
fi
echo "schemas: every built-in resource passed (strict)"

python3 - "$rendered" <<'EOF'
import re, sys, yaml, os

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
problems = []

def durations(text):
    m = re.fullmatch(r"(\d+)(ms|s|m)", text)
    if not m:
        problems.append(f"cannot read the duration {text!r}")
        return 0
    n, unit = int(m[1]), m[2]
    return {"ms": n / 1000, "s": n, "m": n * 60}[unit]

# kustomization.yaml names every manifest of the directory.
listed = set(yaml.safe_load(open("kustomization.yaml"))["resources"])
present = {f for f in os.listdir(".") if f.endswith(".yaml") and f != "kustomization.yaml"}
for f in sorted(present - listed):
    problems.append(f"{f} is not in kustomization.yaml")
for f in sorted(listed - present):
    problems.append(f"kustomization.yaml lists {f}, which does not exist")

services = [d for d in docs if d["kind"] == "Service"]
monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
if len(monitors) != 1:
    problems.append(f"expected one ServiceMonitor, found {len(monitors)}")
for sm in monitors:
    if sm.get("apiVersion") != "monitoring.coreos.com/v1":
        problems.append(f"ServiceMonitor apiVersion {sm.get('apiVersion')}")
    spec = sm.get("spec") or {}
    want = (spec.get("selector") or {}).get("matchLabels") or {}
    endpoints = spec.get("endpoints") or []
    if not want or not endpoints:
        problems.append("ServiceMonitor needs spec.selector.matchLabels and spec.endpoints")
    allowed = {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
               "relabelings", "metricRelabelings", "bearerTokenSecret", "authorization",
               "tlsConfig", "targetPort", "params"}
    for key in spec:
        if key not in {"selector", "endpoints", "namespaceSelector", "jobLabel",
                       "targetLabels", "podTargetLabels", "sampleLimit"}:
            problems.append(f"ServiceMonitor spec.{key} is not a ServiceMonitor field")
    matched = [s for s in services
               if all((s["metadata"].get("labels") or {}).get(k) == v for k, v in want.items())]
    if len(matched) != 1:
        problems.append(f"ServiceMonitor selects {len(matched)} Services, expected 1")
    for ep in endpoints:
        for key in ep:
            if key not in allowed:
                problems.append(f"ServiceMonitor endpoint field {key} is unknown")
        ports = {p.get("name") for s in matched for p in s["spec"]["ports"]}
        if ep.get("port") not in ports:
            problems.append(f"ServiceMonitor port {ep.get('port')!r} is not a port of the selected Service")
        if ep.get("path", "/metrics") != "/metrics":
            problems.append("ServiceMonitor must scrape /metrics")

# The drain fits in the grace period; probes are where the gateway answers.
for d in docs:
    if d["kind"] != "Deployment" or d["metadata"]["name"] != "switchboard":
        continue
    pod = d["spec"]["template"]["spec"]
    c = next(c for c in pod["containers"] if c["name"] == "switchboard")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    grace = pod.get("terminationGracePeriodSeconds", 30)
    sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = durations(env.get("SWITCHBOARD_DRAIN_TIMEOUT") or "30s")
    spread = durations(env.get("SWITCHBOARD_DRAIN_SPREAD") or "5s")
    if grace < sleep + drain + 5:
        problems.append(f"terminationGracePeriodSeconds {grace} < preStop {sleep} + drain-timeout {drain:g} + 5")
    else:
        print(f"drain: preStop {sleep} s + drain-timeout {drain:g} s + 5 s <= grace {grace} s")
    if spread >= drain:
        problems.append(f"drain-spread {spread}s must be shorter than drain-timeout {drain}s")
    control = (env.get("SWITCHBOARD_CONTROL_LISTEN") or "").rsplit(":", 1)[-1]
    ports = {p["name"]: str(p["containerPort"]) for p in c["ports"]}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c[probe]["httpGet"]
        if get["path"] != path or ports.get(get["port"], str(get["port"])) != control:
            problems.append(f"{probe} must GET {path} on the control port {control}")

if problems:
    print("\n".join("validate.sh: " + p for p in problems), file=sys.stderr)
    sys.exit(1)
print("ServiceMonitor, kustomization and drain timeline: OK")
EOF
