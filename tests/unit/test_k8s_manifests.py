"""deploy/k8s, checked offline: every manifest against the Kubernetes API schemas
(kubernetes-validate, strict), and the relations between them that a cluster would only
reveal at the worst moment (a probe on a path forkd does not serve, a grace period shorter
than the drain, an HPA or a PDB that selects nothing, more Redis connections than Redis
accepts)."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml

from forkd.cli import start as start_command
from forkd.config import OPTIONS, option_flag
from sample_app import settings as sample_settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
# The oldest Kubernetes release these manifests are written for, and the newest schema the
# validator ships: both must accept them.
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
# Connections kept free in Redis for operators (redis-cli), monitoring and replication.
REDIS_RESERVED_CONNECTIONS = 32
# Options the manifests use that other issues are adding to forkd right now. Each marked case
# fails (strict xfail) as soon as the option exists, so the mark is removed then.
PENDING_OPTIONS: dict[str, str] = {}  # (none now: --metrics and --drain-delay have landed)


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def _find(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in _documents()
             if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in deploy/k8s, found {len(found)}"
    return found[0]


def _web() -> dict[str, Any]:
    return _find("Deployment", "sample-app")


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _start_params() -> dict[str, click.Parameter]:
    """Every spelling `forkd start` accepts, to its click parameter: the real parser."""
    params: dict[str, click.Parameter] = {}
    for param in start_command.params:
        if isinstance(param, click.Option):
            for spelling in (*param.opts, *param.secondary_opts):
                params[spelling] = param
    return params


def _forkd_options(container: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(option, value) pairs of the container's `forkd start APP ...` arguments."""
    args = [str(a) for a in container["args"]]
    assert args[:1] == ["start"], f"the container must run `forkd start`, not {args[:1]}"
    assert not args[1].startswith("-"), "the app (module:attr) comes right after `start`"
    rest, pairs = args[2:], []
    params = _start_params()
    i = 0
    while i < len(rest):
        option = rest[i]
        assert option.startswith("-"), f"stray argument {option!r} in the forkd args"
        param = params.get(option)
        takes_value = option in PENDING_OPTIONS or (
            param is not None and not getattr(param, "is_flag", False))
        if takes_value:
            assert i + 1 < len(rest), f"{option} lacks its value"
            pairs.append((option, rest[i + 1]))
            i += 2
        else:
            pairs.append((option, None))
            i += 1
    return pairs


def _option_value(container: dict[str, Any], option: str) -> str:
    values = [v for o, v in _forkd_options(container) if o == option]
    assert len(values) == 1 and values[0] is not None, f"{option} must be given once"
    return values[0]


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert named, f"no container port named {port!r}"
    return int(named[0])


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


# --- schemas ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name_and_doc", _documents(),
                         ids=lambda d: f"{d[0]}:{d[1]['kind']}/{d[1]['metadata']['name']}")
def test_every_manifest_passes_the_kubernetes_schema(
    name_and_doc: tuple[str, dict[str, Any]], version: str
) -> None:
    _, doc = name_and_doc
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message}")


def test_the_validator_rejects_a_broken_manifest() -> None:
    # The check above is only worth something if the offline schemas catch a typo.
    broken = yaml.safe_load((K8S / "hpa.yaml").read_text())
    broken["spec"]["maxReplica"] = broken["spec"].pop("maxReplicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in _manifest_files()]


# --- forkd's arguments ------------------------------------------------------------------


def _option_cases() -> list[Any]:
    cases = []
    for option, _ in _forkd_options(_container(_web())):
        marks = ()
        if option in PENDING_OPTIONS:
            marks = (pytest.mark.xfail(strict=True, reason=PENDING_OPTIONS[option]),)
        cases.append(pytest.param(option, marks=marks, id=option))
    return cases


@pytest.mark.parametrize("option", _option_cases())
def test_each_forkd_option_in_the_deployment_is_a_real_start_option(option: str) -> None:
    params = _start_params()
    assert option in params, f"`forkd start` has no option {option}"


def test_the_values_given_to_known_options_are_valid() -> None:
    by_flag = {option_flag(o.name): o for o in OPTIONS}
    checked = 0
    for option, value in _forkd_options(_container(_web())):
        if option in by_flag and value is not None:
            by_flag[option].parse(value)  # raises ValueError on a value forkd would refuse
            checked += 1
    assert checked >= 3  # --bind, --graceful-timeout, --max-memory at least


def test_workers_follow_the_cpu_limit() -> None:
    container = _container(_web())
    options = {o for o, _ in _forkd_options(container)}
    assert not options & {"-w", "--workers"}, "workers come from the cgroup CPU quota"
    cores = _cpu_cores(str(container["resources"]["limits"]["cpu"]))
    # forkd rounds a fractional quota up: 1500m would start 2 workers on 1.5 cores.
    assert cores == int(cores) and cores >= 1


def test_probes_use_the_health_path_forkd_serves_on_the_http_listener() -> None:
    container = _container(_web())
    health_path = _option_value(container, "--health-path")
    bind_port = int(_option_value(container, "--bind").rpartition(":")[2])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == health_path, probe
        assert _port_number(container, get["port"]) == bind_port, probe


def test_the_grace_period_covers_drain_delay_and_graceful_timeout() -> None:
    deployment = _web()
    container = _container(deployment)
    drain = float(_option_value(container, "--drain-delay"))
    graceful = float(_option_value(container, "--graceful-timeout"))
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert drain > 0
    assert grace > drain + graceful
    # forkd's own drain replaces a preStop sleep; a hook would add to the clock unseen here.
    assert "lifecycle" not in container


def test_liveness_does_not_kill_a_pod_that_is_draining_on_purpose() -> None:
    container = _container(_web())
    drain = float(_option_value(container, "--drain-delay"))
    liveness = container["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > drain
    readiness = container["readinessProbe"]
    # The pod must leave the endpoints well within the drain delay.
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < drain


def test_prometheus_scrapes_the_metrics_listener() -> None:
    deployment = _web()
    container = _container(deployment)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    metrics_port = int(_option_value(container, "--metrics").rpartition(":")[2])
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == metrics_port
    assert metrics_port in {p["containerPort"] for p in container["ports"]}
    bind_port = int(_option_value(container, "--bind").rpartition(":")[2])
    assert metrics_port != bind_port, "metrics stay off the public listener"


# --- selectors and targets --------------------------------------------------------------


def test_the_deployment_selects_its_own_pods() -> None:
    spec = _web()["spec"]
    assert _matches(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])


def test_the_service_selects_the_web_pods_and_only_them() -> None:
    service = _find("Service", "sample-app")
    web, redis = _web(), _find("Deployment", "redis")
    selector = service["spec"]["selector"]
    assert _matches(selector, web["spec"]["template"]["metadata"]["labels"])
    assert not _matches(selector, redis["spec"]["template"]["metadata"]["labels"])
    container = _container(web)
    target = service["spec"]["ports"][0]["targetPort"]
    bind_port = int(_option_value(container, "--bind").rpartition(":")[2])
    assert _port_number(container, target) == bind_port


def test_the_hpa_scales_the_deployment_on_cpu_at_60_percent() -> None:
    hpa = _find("HorizontalPodAutoscaler", "sample-app")
    web = _web()
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == (
        web["apiVersion"], web["kind"], web["metadata"]["name"])
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 60}
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60
    # Utilisation is measured against the request: without one the HPA cannot compute it.
    assert "cpu" in _container(web)["resources"]["requests"]
    # A replica count in the Deployment would fight the HPA on every apply.
    assert "replicas" not in web["spec"]


def test_the_pdb_covers_the_web_pods_and_allows_a_drain() -> None:
    pdb = _find("PodDisruptionBudget", "sample-app")
    hpa = _find("HorizontalPodAutoscaler", "sample-app")
    labels = _web()["spec"]["template"]["metadata"]["labels"]
    assert _matches(pdb["spec"]["selector"]["matchLabels"], labels)
    # With maxUnavailable 1 and at least 2 replicas, a node drain always makes progress
    # while one pod keeps serving.
    assert pdb["spec"]["maxUnavailable"] == 1
    assert hpa["spec"]["minReplicas"] >= 2


# --- security and filesystem ------------------------------------------------------------


def test_the_pod_runs_as_non_root_on_a_read_only_root_filesystem() -> None:
    spec = _web()["spec"]["template"]["spec"]
    container = _container(_web())
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    # What must be writable is on emptyDir volumes: forkd's home (control socket) and /tmp.
    env = {e["name"]: e["value"] for e in container["env"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert env["TMPDIR"] in mounts and "emptyDir" in volumes[mounts[env["TMPDIR"]]]
    # forkd refuses a FORKD_HOME owned by another uid, and a volume's root belongs to root:
    # the home must be a directory forkd creates below the mount.
    home = PurePosixPath(env["FORKD_HOME"])
    parents = [m for m in mounts if PurePosixPath(m) in home.parents]
    assert parents, f"FORKD_HOME {home} is not below a mounted volume"
    assert "emptyDir" in volumes[mounts[parents[0]]]


def test_the_image_user_is_the_pods_user_and_exposes_its_ports() -> None:
    text = (K8S / "Containerfile").read_text()
    container = _container(_web())
    run_as = _web()["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    user = re.findall(r"^USER\s+(\d+)(?::(\d+))?\s*$", text, re.MULTILINE)
    assert user and int(user[-1][0]) == run_as, "USER must be the numeric uid of runAsUser"
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", text, re.MULTILINE)
               for p in line.split()}
    assert {p["containerPort"] for p in container["ports"]} <= exposed
    assert re.search(r'^ENTRYPOINT\s+\["forkd"\]', text, re.MULTILINE)
    env = {e["name"]: e["value"] for e in container["env"]}
    assert f"FORKD_HOME={env['FORKD_HOME']}" in text, "image and pod agree on FORKD_HOME"
    # Every source the build copies exists in the repository.
    for line in re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.MULTILINE):
        for source in line.split()[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"


# --- the Redis connection budget --------------------------------------------------------


def test_the_largest_fleet_stays_inside_redis_maxclients() -> None:
    """(HPA max + rollout surge) pods x each pod's connections <= maxclients - reserve.

    Each pod's connections are what the sample app really opens: its per-worker pool
    (settings.redis_pool_size, from the pod's budget and its worker count) times the workers
    forkd starts for the CPU limit."""
    web, hpa = _web(), _find("HorizontalPodAutoscaler", "sample-app")
    container = _container(web)
    env = {e["name"]: e["value"] for e in container["env"]}
    workers = int(_cpu_cores(str(container["resources"]["limits"]["cpu"])))
    app = sample_settings.load({**env, "FORKD_WORKERS": str(workers)}, Path("/nonexistent"))
    per_pod = app.redis_pool_size * workers
    assert per_pod <= app.redis_connections
    surge = web["spec"]["strategy"]["rollingUpdate"]["maxSurge"]
    assert isinstance(surge, int), "a percentage surge makes the budget depend on the size"
    pods = hpa["spec"]["maxReplicas"] + surge
    redis = _container(_find("Deployment", "redis"))
    maxclients = int(redis["args"][redis["args"].index("--maxclients") + 1])
    assert pods * per_pod <= maxclients - REDIS_RESERVED_CONNECTIONS, (
        f"{pods} pods x {per_pod} connections exceed maxclients {maxclients}")


def test_the_app_reaches_the_demo_redis_service() -> None:
    env = {e["name"]: e["value"] for e in _container(_web())["env"]}
    service = _find("Service", "redis")
    redis_labels = _find("Deployment", "redis")["spec"]["template"]["metadata"]["labels"]
    assert _matches(service["spec"]["selector"], redis_labels)
    url = env["REDIS_URL"]
    assert sample_settings.redis_location(url) == (
        f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}")
    for doc in (service, _find("Deployment", "redis")):
        assert doc["metadata"]["annotations"]["forkd.example/demo-only"] == "true"
