"""The files under infra/, checked as files: no Docker, Kubernetes, cloud or network here.

Each manifest is checked against what reads it, where that reader ships with our dependencies:
Prefect's own prefect.yaml model, flow loader and parameter validation, Prefect's base-job-template
rules and worker variable schemas, Ray's cluster-launcher JSON schema and config preparation,
MLflow's basic-auth config reader, and the pipeline's own config loader. The rest (compose,
RayCluster, Dockerfiles) is checked for the properties we rely on: loopback-only ports,
credentials only by reference, versions in step with the installed packages, non-root images.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import stat
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"

PROCESS_POOL = "diffusion-process"
KUBERNETES_POOL = "diffusion-kubernetes"
STAGING_POOL = "diffusion-staging"  # the testbed's (infra/testbed)
POOLS = {PROCESS_POOL, KUBERNETES_POOL, STAGING_POOL}
CREDENTIALS_SECRET = "diffusion-pipeline-credentials"
IMAGE_CODE_DIR = "/opt/pipeline"

# Environment variable names that hold secrets (or identify an account) by convention.
CREDENTIAL_NAME = re.compile(r"KEY|SECRET|PASSWORD|PASSWD|TOKEN|AUTH|CREDENTIAL", re.IGNORECASE)
# ${VAR:?message}: compose refuses to start while VAR is unset or empty.
REQUIRED_REF = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*:\?[^}]+\}$")


def load_yaml(rel: str) -> Any:
    return yaml.safe_load((INFRA / rel).read_text())


def infra_files(*suffixes: str) -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file() and p.name.endswith(suffixes))


def installed_version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


# --------------------------------------------------------------------------------------------
# Every file parses
# --------------------------------------------------------------------------------------------


def test_infra_has_the_expected_files():
    expected = [
        "prefect.yaml", "compose.yaml", ".env.example", "README.md",
        "kubernetes/prefect-base-job-template.json", "kubernetes/raycluster.yaml",
        "kubernetes/pipeline-env.yaml", "kubernetes/rayjob-generate.yaml", "ray/cluster.yaml",
        "docker/Dockerfile", "docker/Dockerfile.dockerignore", "docker/mlflow.Dockerfile",
        "docker/mlflow_entrypoint.py", "postgres/init-databases.sh",
        "configs/digits.yaml", "configs/cifar-s3-gpu.yaml", "configs/conditional-cfg.yaml",
    ]
    missing = [f for f in expected if not (INFRA / f).is_file()]
    assert not missing, f"missing under infra/: {missing}"


def rel(path: Path) -> str:
    return str(path.relative_to(INFRA))


@pytest.mark.parametrize("path", infra_files(".yaml", ".yml"), ids=rel)
def test_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) for d in docs), f"{path} holds no mapping"


@pytest.mark.parametrize("path", infra_files(".json"), ids=rel)
def test_json_parses(path):
    assert isinstance(json.loads(path.read_text()), dict)


# --------------------------------------------------------------------------------------------
# Prefect deployments (infra/prefect.yaml)
# --------------------------------------------------------------------------------------------


@functools.cache
def prefect_project() -> dict:
    return load_yaml("prefect.yaml")


def deployments() -> list[dict]:
    return prefect_project()["deployments"]


def deployment(name: str) -> dict:
    (found,) = [d for d in deployments() if d["name"] == name]
    return found


@functools.cache
def load_flow(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    path, _, func = entrypoint.partition(":")
    return load_flow_from_entrypoint(f"{REPO / path}:{func}")


@functools.cache
def kubernetes_job_template() -> dict:
    return json.loads((INFRA / "kubernetes/prefect-base-job-template.json").read_text())


def pull_steps(dep: dict) -> list[dict]:
    return dep["pull"] if "pull" in dep else prefect_project()["pull"]


def test_prefect_project_keys():
    project = prefect_project()
    assert project["name"] == "diffusion-pipeline"
    assert str(project["prefect-version"]).split(".")[0] == "3"
    assert {d["name"] for d in deployments()} == {
        "retrain-weekly", "retrain-weekly-k8s", "generate", "generate-k8s", "retrain-staging",
        "train-staging", "preprocess-staging", "generate-staging"}
    for dep in deployments():
        for key in ("name", "entrypoint", "parameters", "work_pool"):
            assert key in dep, f"deployment {dep.get('name')} lacks {key}"
        assert dep["work_pool"]["name"] in POOLS, dep["work_pool"]["name"]
    assert {d["work_pool"]["name"] for d in deployments()} == POOLS


def test_prefect_yaml_passes_prefects_own_model():
    models = pytest.importorskip("prefect.cli.deploy._models")
    model = models.PrefectYamlModel.model_validate(prefect_project())
    assert len(model.deployments) == len(deployments())


@pytest.mark.parametrize("name", ["retrain-weekly", "retrain-weekly-k8s", "generate",
                                  "generate-k8s", "retrain-staging", "train-staging",
                                  "preprocess-staging", "generate-staging"])
def test_deployment_entrypoint_loads_and_parameters_validate(name):
    from flows.config import PipelineConfig

    dep = deployment(name)
    path, sep, _ = dep["entrypoint"].partition(":")
    assert sep and not Path(path).is_absolute(), "entrypoints are relative to the repo root"
    assert (REPO / path).is_file(), dep["entrypoint"]
    flow = load_flow(dep["entrypoint"])
    expected_flow = name.split("-")[0]
    assert flow.name == expected_flow
    validated = flow.validate_parameters(dep["parameters"])
    assert isinstance(validated["config"], PipelineConfig)
    if expected_flow == "retrain":
        from tasks.train import check_config

        assert validated["generate"] is True
        cfg = validated["config"]
        check_config(cfg.train, cfg.diffusion)  # the retrain flow's preflight checks
        assert cfg.runtime.root.startswith("s3://")
        assert cfg.train.use_gpu == (name != "retrain-staging")
    if name.endswith("-staging") and name != "retrain-staging":  # its config, one stage alone
        assert dep["parameters"]["config"] == deployment("retrain-staging")["parameters"]["config"]


def test_deployment_parameters_reject_unknown_keys():
    from prefect.exceptions import ParameterTypeError

    flow = load_flow("flows/generate.py:generate_flow")
    with pytest.raises(ParameterTypeError):
        flow.validate_parameters({"config": {"generate": {"num_sample": 10}}})


@pytest.mark.parametrize("name", ["retrain-weekly", "generate"])
def test_a_run_time_override_changes_one_key_and_keeps_the_deployment_config(name):
    """Prefect merges run-time parameters into a deployment's by top-level name (a dict
    update), so ``overrides`` is how one run changes one key without losing the rest."""
    from flows.config import with_overrides
    from tasks.errors import ConfigError

    dep = deployment(name)
    flow = load_flow(dep["entrypoint"])
    params = {**dep["parameters"], "overrides": ["train.steps=1000", "generate.num_samples=7"]}
    validated = flow.validate_parameters(params)
    cfg = with_overrides(validated["config"], validated["overrides"])
    deployed = with_overrides(flow.validate_parameters(dep["parameters"])["config"], None)
    assert (cfg.train.steps, cfg.generate.num_samples) == (1000, 7)
    assert cfg.model_copy(update={"train": deployed.train, "generate": deployed.generate}) \
        == deployed  # nothing else changed: root, data source, model all the deployment's
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.step'"):
        with_overrides(validated["config"], ["train.step=5"])


def test_weekly_retrain_is_the_documented_gpu_config():
    from flows.config import PipelineConfig, load_config

    params = deployment("retrain-weekly")["parameters"]
    assert params == deployment("retrain-weekly-k8s")["parameters"]
    assert PipelineConfig.model_validate(params["config"]) == load_config(
        INFRA / "configs/cifar-s3-gpu.yaml")
    assert deployment("generate")["parameters"] == deployment("generate-k8s")["parameters"]


def test_schedules():
    from prefect._vendor.croniter import croniter
    from prefect.client.schemas.schedules import CronSchedule

    active = []
    for name in ("retrain-weekly", "retrain-weekly-k8s"):
        (sched,) = deployment(name)["schedules"]
        CronSchedule(cron=sched["cron"], timezone=sched["timezone"])  # Prefect's validation
        assert sched["timezone"] == "UTC"
        it = croniter(sched["cron"], datetime(2026, 1, 1, tzinfo=UTC))
        first, second = it.get_next(datetime), it.get_next(datetime)
        assert second - first == timedelta(days=7), "the retrain runs weekly"
        if sched.get("active", True):
            active.append(name)
    # both pools carry the schedule, but only one is active: `--all` must not train twice
    assert active == ["retrain-weekly"]
    for name in ("generate", "generate-k8s"):
        assert deployment(name)["schedules"] == [], "generation runs on demand"


def test_retrain_concurrency_skips_a_run_that_collides():
    """One retrain per deployment; a run that finds the slot taken is cancelled (CANCEL_NEW), not
    queued behind a training that may take days. What `prefect deploy` sends, as Prefect's
    client models read it."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    for name in ("retrain-weekly", "retrain-weekly-k8s"):
        spec = deployment(name)["concurrency_limit"]
        config = ConcurrencyLimitConfig.model_validate(spec)
        assert config.limit == 1
        assert config.collision_strategy == ConcurrencyLimitStrategy.CANCEL_NEW
        assert config.grace_period_seconds and config.grace_period_seconds >= 300
    for name in ("generate", "generate-k8s"):
        # on demand: two runs of the same config re-attach to one Ray job; others may overlap
        assert "concurrency_limit" not in deployment(name)


def test_pull_steps_fit_each_pool():
    dockerfile = dockerfile_instructions("Dockerfile")
    workdirs = [args for instr, args in dockerfile if instr == "WORKDIR"]
    assert workdirs == [IMAGE_CODE_DIR]
    assert len(deployments()) == 8
    for dep in deployments():
        (step,) = pull_steps(dep)
        ((fn, kwargs),) = step.items()
        assert fn == "prefect.deployments.steps.set_working_directory"
        if dep["work_pool"]["name"] == KUBERNETES_POOL:
            assert kwargs["directory"] == IMAGE_CODE_DIR, "the code is in the image"
        else:
            assert kwargs["directory"] == "{{ $PIPELINE_DIR }}", "the worker's checkout"


def test_process_job_variables_fit_the_process_worker():
    from prefect.workers.process import ProcessWorker

    schema = ProcessWorker.get_default_base_job_template()["variables"]
    checked = []
    for dep in deployments():
        if dep["work_pool"]["name"] in (PROCESS_POOL, STAGING_POOL):
            jsonschema.validate(dep["work_pool"].get("job_variables") or {}, schema)
            checked.append(dep["name"])
    assert sorted(checked) == ["generate", "generate-staging", "preprocess-staging",
                               "retrain-staging", "retrain-weekly", "train-staging"]


def test_staging_retrain_fits_the_testbed(tmp_path):
    """The staging deployment is what infra/testbed deploys and its worker polls: the digits,
    a tiny model and few steps, two Ray Train workers on two different worker hosts (each has
    2 logical CPUs, the head none), everything under the testbed's bucket."""
    from flows.config import load_config
    from infra.testbed import DEPLOYMENT, POOL, ROOT

    dep = deployment("retrain-staging")
    assert f"{load_flow(dep['entrypoint']).name}/{dep['name']}" == DEPLOYMENT
    assert dep["work_pool"]["name"] == POOL == STAGING_POOL
    assert dep["schedules"] == [], "staging runs on demand"
    path = tmp_path / "staging.yaml"  # as `diffusion-pipeline config --config` loads it
    path.write_text(yaml.safe_dump(dep["parameters"]["config"]))
    cfg = load_config(path)
    assert (cfg.data.name, cfg.data.source, cfg.runtime.root) == ("digits", "digits", ROOT)
    assert cfg.train.steps <= 200 and cfg.model.base_channels <= 16
    assert cfg.train.num_workers == 2 and cfg.train.placement_strategy == "STRICT_SPREAD"
    assert cfg.train.cpus_per_worker <= 2 and not cfg.train.use_gpu
    assert cfg.evaluate.num_samples <= 128 and cfg.generate.num_samples <= 64


@pytest.mark.parametrize("name", ["retrain-weekly-k8s", "generate-k8s"])
def test_kubernetes_job_variables(name):
    from prefect.utilities.templating import apply_values

    dep_vars = deployment(name)["work_pool"]["job_variables"]
    template = kubernetes_job_template()
    jsonschema.validate(dep_vars, template["variables"])
    assert dep_vars["image"] == "{{ $PIPELINE_IMAGE }}", "the pipeline image, set at deploy time"
    for key, value in (dep_vars.get("env") or {}).items():
        assert not CREDENTIAL_NAME.search(key), f"{key} belongs in the Kubernetes Secret"
        assert "@" not in str(value), f"{key} looks like a URL with credentials"
    assert dep_vars["env"]["RAY_ADDRESS"] == ray_jobs_address_in_kubernetes()
    # Render the job as the worker does: the variables' defaults, then the deployment's values.
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    values = {**defaults, **dep_vars, "image": "registry/diffusion-pipeline:1"}
    job = apply_values(template["job_configuration"], values)
    (container,) = job["job_manifest"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry/diffusion-pipeline:1"
    secret_refs = [e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e]
    assert secret_refs == [CREDENTIALS_SECRET]
    assert job["namespace"] == "diffusion-pipeline"


def test_kubernetes_base_job_template():
    from prefect.server.schemas.actions import validate_base_job_template

    template = kubernetes_job_template()
    assert set(template) == {"job_configuration", "variables"}
    validate_base_job_template(template)  # every {{ placeholder }} is a declared variable
    manifest = template["job_configuration"]["job_manifest"]
    assert manifest["kind"] == "Job"
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # Prefect's defaults are kept: the worker fills these in
    assert container["image"] == "{{ image }}"
    assert container["env"] == "{{ env }}"
    assert container["args"] == "{{ command }}"
    assert "command" not in container, "the image's default command runs the flow-run args"
    secret_ref = [e["secretRef"] for e in container["envFrom"] if "secretRef" in e]
    assert secret_ref == [{"name": "{{ credentials_secret }}"}]
    assert "optional" not in secret_ref[0], "a missing Secret must stop the pod"
    props = template["variables"]["properties"]
    assert props["credentials_secret"]["default"] == CREDENTIALS_SECRET
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_kubernetes_base_job_template_extends_prefects_default():
    worker = pytest.importorskip("prefect_kubernetes.worker")  # not a project dependency
    default = worker.KubernetesWorker.get_default_base_job_template()
    ours = kubernetes_job_template()
    assert set(default["variables"]["properties"]) <= set(ours["variables"]["properties"])
    assert set(default["job_configuration"]) == set(ours["job_configuration"])


# --------------------------------------------------------------------------------------------
# Ray: cluster launcher config and KubeRay RayCluster
# --------------------------------------------------------------------------------------------


def test_ray_cluster_launcher_config_validates_against_rays_schema():
    import ray.autoscaler

    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = load_yaml("ray/cluster.yaml")
    jsonschema.validate(config, schema)
    # and as `ray up` prepares it: provider defaults merged, then Ray's own checks
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(config))


def test_ray_cluster_launcher_node_types():
    config = load_yaml("ray/cluster.yaml")
    assert config["provider"]["type"] == "aws"
    assert config["docker"]["image"].split("/")[-1].startswith("diffusion-pipeline")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["node_config"]["InstanceType"].startswith(("g", "p")), "a CPU head"
    gpu = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert gpu and all(v["node_config"]["InstanceType"].startswith(("g", "p"))
                       for v in gpu.values()), "GPU worker types"
    for spec in gpu.values():
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= config["max_workers"]
    assert any("--gpus" in o for o in config["docker"]["worker_run_options"])
    starts = " ".join(config["head_start_ray_commands"])
    assert "--ray-client-server-port=10001" in starts, "RAY_ADDRESS=ray://<head>:10001"
    # the Jobs API, RAY_ADDRESS=http://<head>:8265, must answer on the head's network address
    assert "--dashboard-host=0.0.0.0" in starts and "--dashboard-port=8265" in starts
    text = (INFRA / "ray/cluster.yaml").read_text()
    assert "RAY_ADDRESS=http://<head private IP>:8265" in text
    assert "RAY_AUTH_MODE=token" in text and "RAY_AUTH_TOKEN" in text


@functools.cache
def raycluster() -> dict:
    return load_yaml("kubernetes/raycluster.yaml")


def ray_pods() -> list[tuple[str, dict]]:
    spec = raycluster()["spec"]
    pods = [("head", spec["headGroupSpec"]["template"]["spec"])]
    pods += [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]
    return pods


def test_raycluster_shape_and_version():
    # the Ray every install takes (requirements.lock), so clients and cluster agree; the
    # installed one is the lock's except at pyproject's floors (make test-min)
    (locked,) = re.findall(r"^ray==(\S+)$", (REPO / "requirements.lock").read_text(), re.M)
    rc = raycluster()
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["spec"]["rayVersion"] == locked
    assert dockerfile_args("Dockerfile")["RAY_VERSION"] == locked
    head = rc["spec"]["headGroupSpec"]
    (head_container,) = head["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head_container["ports"]}
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}
    params = head["rayStartParams"]
    assert params["dashboard-host"] == "0.0.0.0", "the Jobs API must answer on the pod's address"
    assert int(params.get("dashboard-port", 8265)) == ports["dashboard"]
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {})
    groups = rc["spec"]["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_raycluster_credentials_only_by_reference():
    pods = ray_pods()
    assert len(pods) >= 2, "the head and at least one worker group"
    for group, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["containers"], group
        for container in pod["containers"]:
            assert container["image"].split("/")[-1].startswith("diffusion-pipeline"), group
            # the credentials come in whole from the Secret ...
            refs = [e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e]
            assert refs == [CREDENTIALS_SECRET], group
            # ... and no single variable with a credential's name holds a literal value
            literal = [e["name"] for e in container.get("env", []) if CREDENTIAL_NAME.search(
                e["name"]) and ("value" in e or "secretKeyRef" not in e.get("valueFrom", {}))]
            assert not literal, f"{group}: {literal} set literally, not from a secretKeyRef"


def head_service_ports(rc: dict) -> dict[str, int]:
    """The ports of the Service `<name>-head-svc` as KubeRay builds it (getServicePorts in
    ray-operator/controllers/ray/common/service.go): the Ray container's ports (an unnamed one is
    called `<port>-port`), KubeRay's defaults only when it has none, plus `metrics` (8080)."""
    container = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    ports = {p.get("name") or f"{p['containerPort']}-port": p["containerPort"]
             for p in container.get("ports", [])}
    if not ports:
        ports = {"client": 10001, "gcs-server": 6379, "dashboard": 8265}
    return ports | ({} if "metrics" in ports else {"metrics": 8080})


def ray_jobs_address_in_kubernetes() -> str:
    rc = raycluster()
    meta = rc["metadata"]
    port = head_service_ports(rc)["dashboard"]
    return f"http://{meta['name']}-head-svc.{meta['namespace']}.svc.cluster.local:{port}"


def test_head_service_exposes_the_ray_jobs_api():
    """Flow-run pods submit each stage to the Jobs API through the head Service; KubeRay's RayJob
    finds it by the port name `dashboard`."""
    from tasks.jobs import is_jobs_address

    rc = raycluster()
    ports = head_service_ports(rc)
    assert ports["dashboard"] == 8265 and ports["client"] == 10001
    address = ray_jobs_address_in_kubernetes()
    assert address == ("http://diffusion-pipeline-head-svc.diffusion-pipeline.svc.cluster.local"
                       ":8265")
    assert is_jobs_address(address)
    for name in ("retrain-weekly-k8s", "generate-k8s"):
        assert deployment(name)["work_pool"]["job_variables"]["env"]["RAY_ADDRESS"] == address
    text = (INFRA / "kubernetes/raycluster.yaml").read_text()
    assert f"RAY_ADDRESS={address}" in text, "the manifest says how the pipeline connects"


def test_raycluster_token_auth_comes_from_the_credentials_secret():
    """KubeRay (1.6+) sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (key auth_token of
    authOptions.secretName) on every Ray container, the autoscaler and RayJob submitters."""
    spec = raycluster()["spec"]
    assert spec["authOptions"] == {"mode": "token", "secretName": CREDENTIALS_SECRET}
    major, minor, _ = (int(x) for x in spec["rayVersion"].split("."))
    assert (major, minor) >= (2, 52), "Ray token authentication needs Ray 2.52 or newer"
    for group, pod in ray_pods():
        for container in pod["containers"]:
            names = [e["name"] for e in container.get("env", [])]
            assert "RAY_AUTH_TOKEN" not in names, f"{group}: KubeRay sets it from the Secret"


# --------------------------------------------------------------------------------------------
# KubeRay RayJob (one batch generation without Prefect)
# --------------------------------------------------------------------------------------------

# RayJobSpec's fields (ray-operator/apis/ray/v1/rayjob_types.go, KubeRay 1.6-1.7): a typo in a
# key would be dropped silently by the API server's pruning.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "preRunningDeadlineSeconds", "shutdownAfterJobFinishes", "suspend",
}


@functools.cache
def rayjob() -> dict:
    return load_yaml("kubernetes/rayjob-generate.yaml")


def test_rayjob_runs_on_the_pipeline_cluster():
    from tasks.runtime import StageTimeouts

    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["namespace"] == raycluster()["metadata"]["namespace"]
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    assert spec["clusterSelector"] == {"ray.io/cluster": raycluster()["metadata"]["name"]}
    assert "rayClusterSpec" not in spec
    # KubeRay's validation (controllers/ray/utils/validation.go): with clusterSelector no
    # backoffLimit > 0; ttlSecondsAfterFinished only with shutdownAfterJobFinishes; and a shared
    # cluster is never shut down after the job.
    assert spec.get("backoffLimit", 0) == 0
    assert spec.get("shutdownAfterJobFinishes", False) is False
    assert not spec.get("ttlSecondsAfterFinished")
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode")
    assert spec["activeDeadlineSeconds"] > StageTimeouts().generate, (
        "the RayJob's deadline must not cut generation short of its own timeout")


def cli_arguments(entrypoint: str) -> tuple[str, str, dict]:
    """(program, sub-command, its parsed options) of a `diffusion-pipeline ...` command line,
    parsed by the CLI's own (click) parser."""
    import shlex

    import typer

    from flows.cli import app

    argv = shlex.split(entrypoint)
    group = typer.main.get_command(app)
    ctx = group.make_context(argv[0], argv[1:], resilient_parsing=True)
    sub = group.get_command(ctx, argv[1])
    assert sub is not None, f"no sub-command {argv[1]!r}"
    return argv[0], argv[1], sub.make_context(argv[1], argv[2:]).params


def test_rayjob_entrypoint_is_the_cli_with_the_generate_deployments_config():
    import tomllib

    from flows.config import load_config

    program, command, params = cli_arguments(rayjob()["spec"]["entrypoint"])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert program in scripts, "the console script the image installs"
    assert command == "generate"
    assert params["config"] is None, "the image holds no config files: --set and --root only"
    cfg = load_config(None, params["set_"] or [], params["root"])
    dep = deployment("generate")
    deployed = load_flow(dep["entrypoint"]).validate_parameters(dep["parameters"])["config"]
    assert cfg == deployed, "keep rayjob-generate.yaml and the generate deployment in step"
    assert cfg.runtime.root.startswith("s3://") and cfg.generate.gpus_per_actor > 0


def test_rayjob_holds_no_credentials():
    spec = rayjob()["spec"]
    entrypoint = spec["entrypoint"]
    assert not CREDENTIAL_NAME.search(entrypoint), "credentials come from the Ray pods' Secret"
    assert not re.search(r"://[^/@\s]*@", entrypoint)
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    for key in (runtime_env.get("env_vars") or {}):
        assert not CREDENTIAL_NAME.search(key), f"{key} would show in the Ray dashboard"
    assert "submitterPodTemplate" not in spec, "KubeRay's submitter gets the cluster's token"


def test_stage_jobs_run_the_images_console_script():
    """Every stage's Ray job runs `diffusion-pipeline job-run <request>` on the cluster: the
    image installs that script and the CLI has that (hidden) command."""
    import tomllib

    from tasks.jobs import ENTRYPOINT

    program = ENTRYPOINT.split()[0]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[program] == "flows.cli:main"
    _, command, params = cli_arguments(f"{ENTRYPOINT} s3://bucket/jobs/train-x/request.json")
    assert command == "job-run"
    assert params["request"] == "s3://bucket/jobs/train-x/request.json"
    runs = " ".join(a for i, a in dockerfile_instructions("Dockerfile") if i == "RUN")
    assert f"{ENTRYPOINT} --help" in runs, "the image build checks the jobs' entrypoint"


def test_pipeline_env_configmap_holds_no_credentials():
    cm = load_yaml("kubernetes/pipeline-env.yaml")
    assert cm["kind"] == "ConfigMap" and cm["data"], "the ConfigMap holds the pipeline's settings"
    for key, value in cm["data"].items():
        assert not CREDENTIAL_NAME.search(key), f"{key} belongs in the Secret"
        assert "@" not in value
    assert "RAY_ADDRESS" not in cm["data"], "Ray sets it for each job's driver on the Ray pods"


# --------------------------------------------------------------------------------------------
# Compose stack
# --------------------------------------------------------------------------------------------


@functools.cache
def compose() -> dict:
    return load_yaml("compose.yaml")


def service_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def service_command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def test_compose_services():
    services = compose()["services"]
    assert {"postgres", "s3", "create-buckets", "mlflow", "prefect"} <= set(services)
    assert services["s3"]["image"].startswith("chrislusf/seaweedfs:")
    assert not services["s3"]["image"].endswith(":latest")
    deps = services["mlflow"]["depends_on"]
    assert deps["create-buckets"]["condition"] == "service_completed_successfully"
    assert deps["postgres"]["condition"] == "service_healthy"


def test_compose_ports_bind_to_loopback_only():
    published = 0
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                assert port.get("host_ip") == "127.0.0.1", f"{name}: {port}"
            else:
                assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is not loopback-only"
        assert "network_mode" not in service, name
    assert published >= 3
    assert "ports" not in compose()["services"]["postgres"]


def test_compose_credentials_are_required_references():
    checked = 0
    for name, service in compose()["services"].items():
        for key, value in service_env(service).items():
            if CREDENTIAL_NAME.search(key):
                checked += 1
                assert REQUIRED_REF.match(value), (
                    f"{name}.{key} must be a ${{VAR:?message}} reference, got {value!r}")
    assert checked >= 10


def compose_text() -> str:
    """compose.yaml without its comment lines."""
    lines = (INFRA / "compose.yaml").read_text().splitlines()
    return "\n".join(ln for ln in lines if not ln.lstrip().startswith("#"))


def test_compose_interpolations_are_well_formed():
    text = compose_text().replace("$$", "")  # escaped dollars for the container's shell
    refs = [match.group(0) for match in re.finditer(r"\$(\{[^}]*\}|\w+)?", text)]
    assert len(refs) >= 10, "compose.yaml takes its settings from the environment"
    for ref in refs:
        assert re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:[-?][^}]*)?\}", ref), (
            f"unexpected interpolation {ref!r} in compose.yaml")


def test_mlflow_service():
    import mlflow

    service = compose()["services"]["mlflow"]
    cmd = " ".join(service_command(service))
    assert re.search(r"--app-name[= ]basic-auth", cmd)
    assert "--serve-artifacts" in cmd
    assert re.search(r"--artifacts-destination[= ]s3://", cmd)
    assert "--allowed-hosts" in cmd
    env = service_env(service)
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_DB_PASSWORD",
                "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert REQUIRED_REF.match(env[key]), key
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://s3:8333"
    assert any(t.startswith("/run/mlflow") for t in service["tmpfs"]), "auth ini off disk"
    build = service["build"]
    dockerfile = INFRA / build["context"] / build["dockerfile"]
    assert dockerfile.resolve() == (INFRA / "docker/mlflow.Dockerfile").resolve()
    args = dockerfile_args("mlflow.Dockerfile")
    (base,) = [a for i, a in dockerfile_instructions("mlflow.Dockerfile") if i == "FROM"]
    assert resolve(base, args).startswith("ghcr.io/mlflow/mlflow:v")
    assert args["MLFLOW_VERSION"].split(".")[0] == mlflow.__version__.split(".")[0]


def test_prefect_service():
    service = compose()["services"]["prefect"]
    env = service_env(service)
    assert REQUIRED_REF.match(env["PREFECT_SERVER_API_AUTH_STRING"])
    assert REQUIRED_REF.match(env["PREFECT_SERVER_DATABASE_PASSWORD"])
    assert env["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    server_version = service["image"].split(":")[1].split("-")[0]
    assert server_version.split(".")[0] == installed_version("prefect").split(".")[0]
    assert service_command(service)[:3] == ["prefect", "server", "start"]


def env_example() -> dict[str, str]:
    values = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"not NAME=VALUE: {line!r}"
            values[key] = value
    return values


def test_env_example_lists_every_required_variable_without_values():
    example = env_example()
    required = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", compose_text()))
    assert required <= set(example), f"not in .env.example: {required - set(example)}"
    for key in required:
        assert example[key] == "", f"{key} must be empty in the example"
    assert "openssl rand" in (INFRA / ".env.example").read_text()
    assert ".env" in (INFRA / ".gitignore").read_text().split()


# --------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------


def dockerfile_instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of infra/docker/<name>, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (INFRA / "docker" / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, args = line.partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def dockerfile_args(name: str) -> dict[str, str]:
    args = {}
    for instr, rest in dockerfile_instructions(name):
        if instr == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value
    return args


def resolve(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), ""), text)


def env_and_arg_names(name: str) -> list[str]:
    names = []
    for instr, rest in dockerfile_instructions(name):
        if instr == "ARG":
            names.append(rest.split("=", 1)[0])
        elif instr == "ENV":
            names += re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", rest)
    return names


def test_pipeline_dockerfile():
    instructions = dockerfile_instructions("Dockerfile")
    args = dockerfile_args("Dockerfile")
    (base,) = [resolve(a, args) for i, a in instructions if i == "FROM"]
    assert "cuda" in base and base.startswith("pytorch/pytorch:")
    torch_version = base.split(":")[1].split("-")[0]
    tested = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert tested and tested.group(1) == torch_version, "the torch release CI tests (Makefile)"
    users = [resolve(a, args) for i, a in instructions if i == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    runs = " ".join(a for i, a in instructions if i == "RUN")
    assert re.search(r"pip install \.(\s|$)", runs), "installs the package from the context"
    (extras,) = re.findall(r'"ray\[([a-z,]+)\]==\$\{RAY_VERSION\}"', runs)
    # default: dashboard, Jobs server and JobSubmissionClient; client: Ray Client's server
    assert {"default", "client", "train", "data"} <= set(extras.split(","))
    assert "diffusion-pipeline --help" in runs, "the console script is on PATH"
    assert not [i for i, _ in instructions if i == "ENTRYPOINT"], (
        "an ENTRYPOINT would swallow Prefect's and Ray's container commands")
    (cmd,) = [json.loads(a) for i, a in instructions if i == "CMD"]
    assert cmd[0] == "diffusion-pipeline"
    copies = [a for i, a in instructions if i == "COPY"]
    assert all(".env" not in c and ".venv" not in c for c in copies)


@pytest.mark.parametrize("name", ["Dockerfile", "mlflow.Dockerfile"])
def test_dockerfiles_take_no_credentials(name):
    bad = [n for n in env_and_arg_names(name) if CREDENTIAL_NAME.search(n)]
    assert not bad, f"{name} sets credential-like ENV/ARG {bad}"
    users = [a for i, a in dockerfile_instructions(name) if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_dockerignore_keeps_local_state_out():
    lines = {ln.strip() for ln in (INFRA / "docker/Dockerfile.dockerignore").read_text()
             .splitlines() if ln.strip() and not ln.startswith("#")}
    for pattern in (".venv", ".git", "pipeline-data", ".env"):
        assert pattern in lines, pattern


# --------------------------------------------------------------------------------------------
# MLflow entrypoint: the basic-auth config from environment variables
# --------------------------------------------------------------------------------------------


@functools.cache
def mlflow_entrypoint():
    spec = importlib.util.spec_from_file_location(
        "mlflow_entrypoint", INFRA / "docker/mlflow_entrypoint.py")
    module = importlib.util.module_from_spec(spec)
    before, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no __pycache__ in infra/
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = before
    return module


def entrypoint_env(tmp_path) -> dict[str, str]:
    return {
        "MLFLOW_DB_HOST": "postgres", "MLFLOW_DB_USER": "mlflow",
        "MLFLOW_DB_PASSWORD": "p@ss/w:rd%x",  # characters that must be quoted in a URI
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin-user",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long%enough-password",
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-key",
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "run" / "basic_auth.ini"),
    }


def test_mlflow_entrypoint_writes_an_auth_config_mlflow_reads(tmp_path, monkeypatch):
    from sqlalchemy.engine import make_url

    ep = mlflow_entrypoint()
    env = entrypoint_env(tmp_path)
    child = ep.prepare(env)
    ini = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600
    assert stat.S_IMODE(ini.parent.stat().st_mode) == 0o700
    backend = make_url(child["MLFLOW_BACKEND_STORE_URI"])
    assert (backend.username, backend.password, backend.host, backend.port, backend.database) \
        == ("mlflow", "p@ss/w:rd%x", "postgres", 5432, "mlflow")
    # MLflow's own reader, with no MLFLOW_AUTH_ADMIN_* overrides: the file alone must suffice
    for var in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    from mlflow.server.auth.config import read_auth_config

    auth = read_auth_config()
    assert (auth.admin_username, auth.admin_password) == ("admin-user", "a-long%enough-password")
    assert make_url(auth.database_uri).database == "mlflow_auth"
    assert make_url(auth.database_uri).password == "p@ss/w:rd%x"
    assert auth.default_permission == "READ"
    assert auth.auth_cache_ttl_seconds == 60  # not a hash check per request


def test_mlflow_entrypoint_refuses_missing_or_weak_credentials(tmp_path):
    ep = mlflow_entrypoint()
    env = entrypoint_env(tmp_path)
    del env["MLFLOW_AUTH_ADMIN_PASSWORD"], env["MLFLOW_FLASK_SERVER_SECRET_KEY"]
    with pytest.raises(ep.SetupError, match=r"MLFLOW_AUTH_ADMIN_PASSWORD.*SECRET_KEY"):
        ep.prepare(env)
    env = {**entrypoint_env(tmp_path), "MLFLOW_AUTH_ADMIN_PASSWORD": "short"}
    with pytest.raises(ep.SetupError, match="at least 12"):
        ep.prepare(env)
    assert not Path(env["MLFLOW_AUTH_CONFIG_PATH"]).exists()


# --------------------------------------------------------------------------------------------
# Example pipeline configs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "cifar-s3-gpu", "conditional-cfg"])
def test_example_config_loads(name):
    from flows.config import load_config
    from tasks.train import check_config

    cfg = load_config(INFRA / "configs" / f"{name}.yaml")
    check_config(cfg.train, cfg.diffusion)
    assert cfg.model.resolution == cfg.data.resolution
    assert cfg.model.in_channels == cfg.data.channels
    for uri in (cfg.runtime.root, cfg.runtime.mlflow_uri, cfg.data.source):
        assert not re.search(r"://[^/@]*@", uri or ""), f"credentials in {uri}"


def test_digits_example_is_the_embedded_default():
    from flows.config import PipelineConfig, load_config

    assert load_config(INFRA / "configs/digits.yaml") == PipelineConfig()


def test_cifar_example():
    from flows.config import load_config

    cfg = load_config(INFRA / "configs/cifar-s3-gpu.yaml")
    assert (cfg.data.resolution, cfg.data.channels) == (32, 3)
    assert cfg.data.source.startswith("s3://") and cfg.runtime.root.startswith("s3://")
    assert cfg.train.use_gpu and cfg.train.num_workers > 1
    assert cfg.model.base_channels > 32 and cfg.generate.gpus_per_actor > 0


def test_conditional_example():
    from flows.config import load_config

    cfg = load_config(INFRA / "configs/conditional-cfg.yaml")
    assert cfg.model.num_classes and cfg.model.num_classes > 1
    assert 0 < cfg.train.label_dropout < 1
    assert cfg.evaluate.guidance_scale > 1 and cfg.generate.guidance_scale > 1


# --------------------------------------------------------------------------------------------
# Generic secret scan and documentation
# --------------------------------------------------------------------------------------------

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),
    "URL with a literal password": re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:@{}$]+:[^\s/@{}$<]+@"),
}
# NAME: value / NAME=value lines whose name says secret and whose value is a literal
LITERAL_SECRET = re.compile(
    r"""^\s*(?:export\s+|-\s+)?["']?(?P<key>[\w.-]*(?:password|passwd|secret|token|auth_string|
    access_key)[\w.-]*)["']?\s*[:=]\s*(?P<value>.*)$""", re.IGNORECASE | re.VERBOSE)
ALLOWED_VALUE = re.compile(r"""^(["']?)(\$|\{\{|<|\1$|$|\{$|\[|\||>)""")
# keys whose value names a Kubernetes Secret rather than holding one (KubeRay's
# authOptions.secretName)
SECRET_REFERENCE_KEY = re.compile(r"^secret_?name$", re.IGNORECASE)


def scanned_files() -> list[Path]:
    return [p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts]


def test_no_secrets_in_infra():
    found = []
    assert len(scanned_files()) >= 16, "every file under infra/ is scanned"
    for path in scanned_files():
        text = path.read_text()
        for what, pattern in SECRET_PATTERNS.items():
            found += [f"{path.relative_to(REPO)}: {what}: {m.group(0)}"
                      for m in pattern.finditer(text)]
        if path.suffix == ".py":
            continue
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            m = LITERAL_SECRET.match(line)
            if m and not ALLOWED_VALUE.match(m.group("value").strip()) and not (
                    SECRET_REFERENCE_KEY.match(m.group("key"))):
                found.append(f"{path.relative_to(REPO)}: literal {m.group('key')}: {line.strip()}")
    assert not found, "\n".join(found)


def test_secret_scan_catches_secrets():
    assert SECRET_PATTERNS["AWS access key id"].search("key AKIA" + "ABCDEFGHIJKLMNOP")
    assert SECRET_PATTERNS["URL with a literal password"].search("postgresql://u:hunter2@db/x")
    assert not SECRET_PATTERNS["URL with a literal password"].search("postgresql://{u}:{p}@db")
    for line in ("password: hunter2", "MLFLOW_TRACKING_PASSWORD=hunter2",
                 '  "db_password": "hunter2"', "export AWS_SECRET_ACCESS_KEY=abc"):
        m = LITERAL_SECRET.match(line)
        assert m and not ALLOWED_VALUE.match(m.group("value").strip()), line
    for line in ("secret: hunter2", "auth_token=abc", "RAY_AUTH_TOKEN=abc"):
        m = LITERAL_SECRET.match(line)
        assert m and not SECRET_REFERENCE_KEY.match(m.group("key")), line
    assert SECRET_REFERENCE_KEY.match(LITERAL_SECRET.match("  secretName: creds").group("key"))
    for line in ("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}", "S3_SECRET_ACCESS_KEY=",
                 'MLFLOW_TRACKING_PASSWORD="$MLFLOW_ADMIN_PASSWORD"',
                 "export PREFECT_API_AUTH_STRING=<user:password>"):
        m = LITERAL_SECRET.match(line)
        assert m and ALLOWED_VALUE.match(m.group("value").strip()), line


def test_readme_documents_the_pieces():
    readme = (INFRA / "README.md").read_text()
    for needle in (
        "docker build -f infra/docker/Dockerfile -t diffusion-pipeline .",
        "docker compose -f infra/compose.yaml --env-file infra/.env up",
        f"prefect work-pool create {PROCESS_POOL} --type process",
        f"prefect work-pool create {KUBERNETES_POOL} --type kubernetes",
        "--base-job-template infra/kubernetes/prefect-base-job-template.json",
        "prefect deploy --prefect-file infra/prefect.yaml --all",
        "ray up infra/ray/cluster.yaml",
        "kubectl apply",
        "kubectl -n diffusion-pipeline apply -f infra/kubernetes/rayjob-generate.yaml",
        "RAY_ADDRESS=http://diffusion-pipeline-head-svc.diffusion-pipeline.svc.cluster.local:8265",
        "SeaweedFS",
    ):
        assert needle in readme, needle
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_URL", "PREFECT_API_AUTH_STRING",
                "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "PIPELINE_DIR", "PIPELINE_IMAGE", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):
        assert f"`{var}`" in readme, var


def test_postgres_init_takes_passwords_from_the_environment():
    path = INFRA / "postgres/init-databases.sh"
    script = path.read_text()
    assert script.startswith("#!/bin/sh") and "ON_ERROR_STOP=1" in script
    # executable: the postgres entrypoint runs it as its own process (a non-executable .sh is
    # sourced into the entrypoint's shell, where its `set -u` would leak)
    assert path.stat().st_mode & stat.S_IXUSR
    assert "PASSWORD :'mlflow_pw'" in script and "PASSWORD :'prefect_pw'" in script
    mounts = compose()["services"]["postgres"]["volumes"]
    assert any(m.startswith("./postgres/init-databases.sh:/docker-entrypoint-initdb.d/")
               for m in mounts)
    env = service_env(compose()["services"]["postgres"])
    passwords = re.findall(r'"\$(\w+_PASSWORD)"', script)
    assert sorted(passwords) == ["MLFLOW_DB_PASSWORD", "PREFECT_DB_PASSWORD"]
    for var in passwords:
        assert REQUIRED_REF.match(env[var]), var


def _images(node: Any) -> list[str]:
    """Every ``image`` value (a string) in a loaded manifest."""
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + [
            i for v in node.values() for i in _images(v)]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def test_images_are_referenced_by_an_immutable_tag():
    """A cluster runs the code its image holds (issue 25 item 11): `:latest` (or no tag) with
    IfNotPresent leaves each node on whichever build it pulled first. The pipeline's image is
    tagged with this release's version, the version job-run's code check names."""
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    found = []
    for path in [*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")]:
        if "testbed" in path.parts:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            for image in _images(doc):
                if "{{" in image:  # set at deploy time ($PIPELINE_IMAGE): the docs pin it
                    continue
                found.append((path.relative_to(INFRA), image))
                name, _, tag = image.rpartition("/")[2].partition(":")
                assert (tag and tag != "latest") or "@sha256:" in image, (path, image)
                if name == "diffusion-pipeline":
                    assert tag == version, f"{path}: {image} is not this release's {version}"
    assert sum(i.rpartition("/")[2].startswith("diffusion-pipeline:") for _, i in found) >= 3
