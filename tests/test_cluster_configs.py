"""configs/cluster/: the KubeRay RayJob and the AWS cluster-launcher config run jobs/cifar10.py with flags its own
parser accepts on s3:// URIs, hold no secret, pin what pyproject.toml pins, and give every node the environment
README.md's "Running on a cluster" asks for. Reads files only: no Ray, no cluster, no network."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from ray_dal.storage import location

REPO = Path(__file__).parents[1]
CLUSTER = REPO / "configs" / "cluster"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
LAUNCHER = CLUSTER / "aws-cluster-launcher.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")
# RayJobSpec and RayClusterSpec fields of KubeRay's ray.io/v1 API reference (docs/reference/api.md, v1.7):
# a misspelt field would be dropped by the API server without a word.
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata", "clusterSelector",
    "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode",
    "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "preRunningDeadlineSeconds", "shutdownAfterJobFinishes", "suspend",
}
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "historyServerOptions", "networkPolicy", "tlsOptions",
    "headGroupSpec", "rayVersion", "workerGroupSpecs",
}


def rayjob() -> dict:
    (job,) = [doc for doc in yaml.safe_load_all(RAYJOB.read_text()) if doc and doc.get("kind") == "RayJob"]
    return job


def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def ray_containers(job: dict) -> dict[str, dict]:
    """The Ray container (the first) of the head and of each worker group, by group."""
    cluster = job["spec"]["rayClusterSpec"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({group["groupName"]: group for group in cluster["workerGroupSpecs"]})
    return {name: group["template"]["spec"]["containers"][0] for name, group in groups.items()}


def entrypoint(which: str) -> list[str]:
    """The command that starts the job: the RayJob's ``spec.entrypoint``, or the ``ray job submit`` line of the
    launcher config's ``# entrypoint:`` comment (the launcher has no field for it)."""
    if which == "kuberay":
        return shlex.split(rayjob()["spec"]["entrypoint"])
    (line,) = [line for line in LAUNCHER.read_text().splitlines() if line.startswith("# entrypoint:")]
    return shlex.split(line.removeprefix("# entrypoint:"))


def job_command(which: str) -> tuple[Path, list[str]]:
    """(the job script as a file of this repository, its arguments) of ``entrypoint(which)``."""
    tokens = entrypoint(which)
    if which == "launcher":
        split = tokens.index("--")
        submit, tokens = tokens[:split], tokens[split + 1:]
        assert submit[:3] == ["ray", "job", "submit"], submit
        working_dir = Path(submit[submit.index("--working-dir") + 1])
        assert working_dir == Path("."), "the submit command must send the repository it is run from"
        script = REPO / working_dir / tokens[1]
    else:  # a path in the image: configs/cluster/Dockerfile copies the repository to its WORKDIR
        (workdir,) = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), flags=re.M)
        script = REPO / Path(tokens[1]).relative_to(workdir)
    assert tokens[0] == "python", tokens
    return script, tokens[2:]


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Running on a cluster\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def readme_env_vars() -> list[str]:
    """The variables the README's table tells the user to set: the names in the first column of the table whose
    header is ``| variable |`` (alternatives are named in the second column)."""
    rows = readme_section().split("\n| variable |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    names = [name for row in rows for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1])]
    assert names, "no variables found in the README's table"
    return names


@pytest.mark.parametrize("which", ["kuberay", "launcher"])
def test_each_entrypoint_runs_the_cifar10_job_with_flags_its_own_parser_accepts(which):
    from ray_dal.config import load_config
    from ray_dal.job import FLAGS, build_parser, config_overrides

    script, argv = job_command(which)
    assert script.relative_to(REPO) == Path("jobs/cifar10.py") and script.is_file()
    parser = build_parser(REPO / "configs" / "cifar10.yaml")
    try:
        args = vars(parser.parse_args(argv))
    except SystemExit:
        pytest.fail(f"jobs/cifar10.py refuses the {which} entrypoint's arguments {argv} (argparse's message above)")
    cfg = load_config(args["config"], {"data.dataset": "cifar10", **config_overrides(args, FLAGS)})
    assert cfg.data.data_dir.startswith("s3://") and cfg.loop.out.startswith("s3://"), "no shared disk: use a bucket"
    assert (cfg.train.num_workers, cfg.scoring.num_scorers) == (2, 2)  # one per GPU worker


def test_every_s3_uri_parses():
    texts = [RAYJOB.read_text(), LAUNCHER.read_text(), readme_section()]
    uris = sorted({uri for text in texts for uri in re.findall(r"s3://[^\s'\"`)]+", text)})
    assert len(uris) >= 2
    for uri in uris:
        where = location(uri)
        assert (where.store.scheme, where.uri) == ("s3", uri.rstrip("/"))


def test_no_secret_is_in_the_files():
    for path in sorted(CLUSTER.iterdir()):
        text = path.read_text()
        assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", text), f"{path.name} holds an AWS access key id"
        assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*[\"']?[A-Za-z0-9/+]{16,}", text), \
            f"{path.name} holds an AWS secret key"
    for group, container in ray_containers(rayjob()).items():
        for var in container.get("env", []):
            if var["name"] in CREDENTIALS:
                assert "value" not in var and "secretKeyRef" in var["valueFrom"], (group, var)
    spec = rayjob()["spec"]
    assert not any(name in spec.get("runtimeEnvYAML", "") for name in CREDENTIALS), \
        "Ray logs runtime_env values in plain text"
    for which in ("kuberay", "launcher"):
        command = " ".join(entrypoint(which))
        assert "--runtime-env" not in command and not re.search(r"\bAWS_\w+=", command), command
    cfg = launcher()
    commands = [c for key, value in cfg.items() if key.endswith("_commands") for c in value]
    assert not any(name in c for name in CREDENTIALS for c in commands)
    for node_type in cfg["available_node_types"].values():  # bucket access by instance role, not keys
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_every_node_gets_the_environment_the_readme_asks_for():
    wanted = readme_env_vars()
    assert {"AWS_REGION", "RAY_DAL_S3_MAX_ATTEMPTS", "AWS_SECRET_ACCESS_KEY"} <= set(wanted)
    containers = ray_containers(rayjob())
    assert len(containers) >= 2
    for group, container in containers.items():
        names = {var["name"] for var in container.get("env", [])}
        assert not set(wanted) - names, f"RayJob group {group!r} lacks {sorted(set(wanted) - names)}"
    # On EC2 the instance profiles stand in for the keys and AWS S3 needs no endpoint; the rest is exported on
    # every node before Ray starts.
    exported = " ".join(launcher()["initialization_commands"])
    for name in set(wanted) - set(CREDENTIALS) - {"AWS_ENDPOINT_URL"}:
        assert re.search(rf"\b{name}=\S", exported), f"the launcher does not export {name}"


def test_both_turn_on_ray_token_authentication():
    assert rayjob()["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    cfg = launcher()
    assert "RAY_AUTH_MODE=token" in " ".join(cfg["initialization_commands"])
    mounts = cfg["file_mounts"]
    assert mounts["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert mounts["/home/ubuntu/ray_dal"] == "."


def test_the_launcher_config_is_valid_for_this_ray():
    # Ray's own cluster-config schema (what `ray up` checks), found without importing Ray.
    schema = Path(importlib.util.find_spec("ray").origin).parent / "autoscaler" / "ray-schema.json"
    jsonschema.validate(launcher(), json.loads(schema.read_text()))


def test_the_rayjob_uses_ray_io_v1_fields_and_gpu_workers():
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert not set(spec) - RAYJOB_SPEC_FIELDS, sorted(set(spec) - RAYJOB_SPEC_FIELDS)
    cluster = spec["rayClusterSpec"]
    assert not set(cluster) - RAYCLUSTER_SPEC_FIELDS, sorted(set(cluster) - RAYCLUSTER_SPEC_FIELDS)
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert cluster["rayVersion"] == importlib.metadata.version("ray")
    containers = ray_containers(job)
    assert len({c["image"] for c in containers.values()}) == 1, "head and workers must run the same image"
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, group["groupName"]
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"]


def test_image_and_launcher_pin_what_pyproject_pins():
    pyproject = (REPO / "pyproject.toml").read_text()
    pins = re.findall(r'"((?:torch|torchvision)==[\w.]+)"', pyproject)
    assert len(pins) == 2
    (ray_pin,) = re.findall(r'"ray\[[\w,]+\]==([\w.]+)"', pyproject)
    dockerfile = DOCKERFILE.read_text()
    setup = " ".join(launcher()["setup_commands"])
    for pin in pins:
        assert pin in dockerfile and pin in setup, pin
    assert re.search(rf"^FROM rayproject/ray:{re.escape(ray_pin)}-py3\d+-gpu$", dockerfile, flags=re.M)
    assert "pip install -q -e ~/ray_dal" in setup  # the repo, with its ray pin
