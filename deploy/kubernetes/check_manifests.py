#!/usr/bin/env python3
"""Checks walship's Kubernetes manifests: against the Kubernetes schemas (kubernetes-validate,
strict: unknown fields are errors) and against what walship needs of them.

    PYTHONPATH=<kubernetes-validate install> python3 deploy/kubernetes/check_manifests.py

For each variant (active-passive/, cluster/), reading the walship.toml its ConfigMap holds:

- terminationGracePeriodSeconds > 2 x run.shutdown_timeout_ms + a margin: a stop finishes the
  transaction being read (up to the timeout), then waits up to the timeout again for Kafka's
  acknowledgements; Kubernetes' default of 30 s would kill a stop mid-flush;
- the readiness probe asks /readyz and the liveness probe /healthz, on walship's metrics port
  (metrics.listen); neither asks /active (a standby must be ready);
- a PodDisruptionBudget selects the Deployment's pods and lets one go at a time; at least two
  replicas, rolling updates that start a new pod before stopping an old one;
- resource requests from the measured footprint (memory request above the 38 MiB peak measured,
  a memory limit above it), no CPU limit;
- scrape annotations naming the metrics port and /metrics;
- secrets from Kubernetes Secrets: every password_file / secret_files path lies in a mounted
  Secret volume, no password in a URL, no secret in the environment's plain values;
- the cluster variant has [cluster] and several [[pipelines]].

Then the same checks run on broken copies of the manifests, each of which must be refused with
the problem it has: the checks would catch what they name.
"""

import copy
import ipaddress
import os
import re
import subprocess
import sys
import tomllib

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ["active-passive", "cluster"]
DEFAULT_SHUTDOWN_MS = 30_000
DEFAULT_METRICS_PORT = 10187
# Beyond twice the shutdown timeout: destroying the producer, confirming the slot, the process
# exiting.
GRACE_MARGIN_S = 10
# The highest resident set measured (tests/reliability/outages.rs: a 100,000-row transaction).
MEASURED_PEAK_MIB = 38.3


def mebibytes(quantity):
    """A Kubernetes memory quantity in MiB."""
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "K": 1000 / 1024**2, "M": 1e6 / 1024**2,
             "G": 1e9 / 1024**2}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)?", str(quantity))
    if not m:
        raise ValueError(f"memory quantity {quantity!r}")
    return float(m.group(1)) * (units[m.group(2)] if m.group(2) else 1 / 1024**2)


def metrics_port(listen):
    """The port of metrics.listen ("0.0.0.0:10187", "[::]:10187", or an address alone)."""
    try:
        ipaddress.ip_address(listen.strip("[]"))
        return DEFAULT_METRICS_PORT
    except ValueError:
        return int(listen.rsplit(":", 1)[1])


def port_number(container, port):
    """A probe's port: a number, or the name of one of the container's ports."""
    if isinstance(port, int):
        return port
    for p in container.get("ports", []):
        if p.get("name") == port:
            return p["containerPort"]
    return None


def secret_paths(config):
    """Every file path walship reads a secret from, in a (merged or not) configuration."""
    paths = []
    tables = [config] + config.get("pipelines", [])
    for t in tables:
        pg = t.get("postgres", {})
        for key in ("password_file", "sslkey"):
            if key in pg:
                paths.append(pg[key])
        paths.extend(t.get("kafka", {}).get("secret_files", {}).values())
    return paths


def urls(config):
    return [t.get("postgres", {}).get("url") for t in [config] + config.get("pipelines", [])
            if t.get("postgres", {}).get("url")]


def problems(docs, variant):
    """What is wrong with one variant's documents (empty when nothing is)."""
    out = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    for kind in ("ConfigMap", "Deployment", "PodDisruptionBudget"):
        if len(by_kind.get(kind, [])) != 1:
            out.append(f"{variant}: expected one {kind}, found {len(by_kind.get(kind, []))}")
    if out:
        return out
    cm, deploy, pdb = by_kind["ConfigMap"][0], by_kind["Deployment"][0], by_kind["PodDisruptionBudget"][0]
    try:
        config = tomllib.loads(cm["data"]["walship.toml"])
    except (KeyError, tomllib.TOMLDecodeError) as e:
        return [f"{variant}: the ConfigMap holds no valid walship.toml: {e}"]
    shutdown_ms = config.get("run", {}).get("shutdown_timeout_ms", DEFAULT_SHUTDOWN_MS)
    listen = config.get("metrics", {}).get("listen")
    if not listen:
        return [f"{variant}: metrics.listen is not set: no probes, no metrics"]
    port = metrics_port(listen)

    spec = deploy["spec"]
    pod = spec["template"]["spec"]
    grace = pod.get("terminationGracePeriodSeconds", 30)
    needed = 2 * shutdown_ms / 1000 + GRACE_MARGIN_S
    if grace <= needed:
        out.append(f"{variant}: terminationGracePeriodSeconds {grace} is not above 2 x "
                   f"run.shutdown_timeout_ms ({shutdown_ms} ms) + {GRACE_MARGIN_S} s = {needed:g} s")
    if spec.get("replicas", 1) < 2:
        out.append(f"{variant}: {spec.get('replicas', 1)} replica(s); a standby or a second "
                   "member needs 2")
    rolling = spec.get("strategy", {}).get("rollingUpdate", {})
    if spec.get("strategy", {}).get("type", "RollingUpdate") != "RollingUpdate" \
            or rolling.get("maxUnavailable", "25%") not in (0, "0", "0%"):
        out.append(f"{variant}: rolling updates must start a new pod before stopping an old one "
                   "(RollingUpdate, maxUnavailable: 0)")

    containers = [c for c in pod["containers"] if c["name"] == "walship"]
    if len(containers) != 1:
        return out + [f"{variant}: no container named walship"]
    c = containers[0]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = c.get(probe, {}).get("httpGet")
        if not get:
            out.append(f"{variant}: no {probe} with httpGet")
            continue
        if get.get("path") != path:
            out.append(f"{variant}: {probe} asks {get.get('path')}, not {path}")
        if port_number(c, get.get("port")) != port:
            out.append(f"{variant}: {probe} asks port {get.get('port')}, walship listens on {port}")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if c.get(probe, {}).get("httpGet", {}).get("path", "").startswith("/active"):
            out.append(f"{variant}: {probe} asks /active: a standby would never be ready")
    if not any(p.get("containerPort") == port for p in c.get("ports", [])):
        out.append(f"{variant}: the container does not declare port {port}")

    resources = c.get("resources", {})
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    if "cpu" not in requests or "memory" not in requests:
        out.append(f"{variant}: resource requests need cpu and memory")
    elif mebibytes(requests["memory"]) <= MEASURED_PEAK_MIB:
        out.append(f"{variant}: memory request {requests['memory']} is not above the measured "
                   f"peak of {MEASURED_PEAK_MIB} MiB")
    if "memory" not in limits or ("memory" in requests
                                  and mebibytes(limits["memory"]) < mebibytes(requests["memory"])):
        out.append(f"{variant}: a memory limit at least the request is needed")
    if "cpu" in limits:
        out.append(f"{variant}: a CPU limit throttles walship while the walsender waits on it")

    annotations = spec["template"]["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") != "true" \
            or annotations.get("prometheus.io/port") != str(port) \
            or annotations.get("prometheus.io/path", "/metrics") != "/metrics":
        out.append(f"{variant}: scrape annotations must name port {port} and /metrics: {annotations}")

    # The PodDisruptionBudget covers these pods and lets one go at a time.
    pod_labels = spec["template"]["metadata"].get("labels", {})
    selector = pdb["spec"].get("selector", {}).get("matchLabels", {})
    if not selector or any(pod_labels.get(k) != v for k, v in selector.items()):
        out.append(f"{variant}: the PodDisruptionBudget's selector {selector} does not select the "
                   f"pods ({pod_labels})")
    budget = pdb["spec"]
    if budget.get("maxUnavailable") != 1 and budget.get("minAvailable") != spec.get("replicas", 1) - 1:
        out.append(f"{variant}: the PodDisruptionBudget should let exactly one pod go at a time")
    # With the default IfHealthyBudget, a drain during a database outage (every pod unready)
    # could evict none of them and would hang until the database returned.
    if budget.get("unhealthyPodEvictionPolicy") != "AlwaysAllow":
        out.append(f"{variant}: the PodDisruptionBudget needs unhealthyPodEvictionPolicy: "
                   "AlwaysAllow, or a drain hangs while every pod is unready")

    # Secrets come from Secrets.
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    secret_mounts = [m["mountPath"] for m in c.get("volumeMounts", [])
                     if "secret" in volumes.get(m["name"], {})]
    for path in secret_paths(config):
        if not any(path.startswith(m.rstrip("/") + "/") for m in secret_mounts):
            out.append(f"{variant}: {path} is read by walship but is not in a mounted Secret")
    for url in urls(config):
        if re.search(r"://[^/@]*:[^/@]*@", url) or "password=" in url:
            out.append(f"{variant}: a password in postgres.url {url}")
    for env in c.get("env", []):
        if re.search(r"PASSWORD|SECRET|TOKEN|KEY", env["name"]) and "value" in env:
            out.append(f"{variant}: {env['name']} is a plain value; take it from a Secret")
    config_volume = [v for v in volumes.values() if "configMap" in v]
    if not any(v["configMap"]["name"] == cm["metadata"]["name"] for v in config_volume):
        out.append(f"{variant}: no volume mounts the ConfigMap {cm['metadata']['name']}")

    if variant == "cluster" and ("cluster" not in config or len(config.get("pipelines", [])) < 2):
        out.append(f"{variant}: the cluster variant needs [cluster] and several [[pipelines]]")
    return out


def load(variant):
    docs = []
    directory = os.path.join(HERE, variant)
    for name in sorted(os.listdir(directory)):
        if name.endswith((".yaml", ".yml")):
            with open(os.path.join(directory, name)) as f:
                docs.extend(d for d in yaml.safe_load_all(f) if d)
    return docs


def broken_copies(docs):
    """Copies of a variant's documents, each with one thing wrong, and what must be said."""

    def copy_with(change):
        d = copy.deepcopy(docs)
        change({x["kind"]: x for x in d})
        return d

    def pod(k):
        return k["Deployment"]["spec"]["template"]["spec"]

    def walship(k):
        return pod(k)["containers"][0]

    yield "the default grace period", "terminationGracePeriodSeconds 30", copy_with(
        lambda k: pod(k).pop("terminationGracePeriodSeconds"))
    yield "a longer shutdown timeout", "is not above 2 x run.shutdown_timeout_ms", copy_with(
        lambda k: k["ConfigMap"]["data"].update(
            {"walship.toml": k["ConfigMap"]["data"]["walship.toml"].replace(
                "shutdown_timeout_ms = 20000", "shutdown_timeout_ms = 30000")}))
    yield "readiness on /active", "asks /active", copy_with(
        lambda k: walship(k)["readinessProbe"]["httpGet"].update({"path": "/active"}))
    yield "liveness on another port", "livenessProbe asks port", copy_with(
        lambda k: walship(k)["livenessProbe"]["httpGet"].update({"port": 9187}))
    yield "no PodDisruptionBudget", "expected one PodDisruptionBudget", [
        d for d in copy.deepcopy(docs) if d["kind"] != "PodDisruptionBudget"]
    yield "a PodDisruptionBudget for other pods", "does not select the pods", copy_with(
        lambda k: k["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].update(
            {"app.kubernetes.io/name": "other"}))
    yield "unready pods kept from eviction", "unhealthyPodEvictionPolicy", copy_with(
        lambda k: k["PodDisruptionBudget"]["spec"].pop("unhealthyPodEvictionPolicy"))
    yield "no resource requests", "resource requests need", copy_with(
        lambda k: walship(k).pop("resources"))
    yield "scraping the wrong port", "scrape annotations", copy_with(
        lambda k: k["Deployment"]["spec"]["template"]["metadata"]["annotations"].update(
            {"prometheus.io/port": "9187"}))
    yield "a password in the environment", "is a plain value", copy_with(
        lambda k: walship(k).setdefault("env", []).append(
            {"name": "WALSHIP_PG_PASSWORD", "value": "hunter2"}))
    yield "the secret not mounted", "is not in a mounted Secret", copy_with(
        lambda k: walship(k).update(
            {"volumeMounts": [m for m in walship(k)["volumeMounts"] if m["name"] != "secrets"]}))
    yield "one replica", "replica(s)", copy_with(
        lambda k: k["Deployment"]["spec"].update({"replicas": 1}))


def main():
    files = [os.path.join(HERE, v, n) for v in VARIANTS for n in sorted(os.listdir(os.path.join(HERE, v)))
             if n.endswith((".yaml", ".yml"))]
    files.append(os.path.join(HERE, "secret.example.yaml"))
    schema = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", *files],
                            capture_output=True, text=True)
    print(schema.stdout + schema.stderr, end="")
    failures = []
    if schema.returncode != 0:
        failures.append("kubernetes-validate refused the manifests (above)")
    else:
        print(f"ok: kubernetes-validate --strict: {len(files)} files")
    for variant in VARIANTS:
        docs = load(variant)
        found = problems(docs, variant)
        failures.extend(found)
        if not found:
            print(f"ok: {variant}: grace period, probes, disruption budget, resources, scrape "
                  "annotations, secrets")
        for what, expected, broken in broken_copies(docs):
            said = problems(broken, variant)
            if not any(expected in p for p in said):
                failures.append(f"{variant} with {what}: expected a problem mentioning "
                                f"{expected!r}, got {said}")
    for f in failures:
        print(f"FAILED: {f}", file=sys.stderr)
    print(f"manifests: {'FAILED' if failures else 'ok'} ({len(files)} files, "
          f"{len(VARIANTS)} variants, {sum(1 for _ in broken_copies(load(VARIANTS[0])))} "
          "broken copies each refused)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
