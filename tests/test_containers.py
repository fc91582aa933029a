"""What can be checked of the Dockerfile, .dockerignore and compose files without a Docker engine."""

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi import FastAPI

from tests.conftest import REPO_ROOT
from tests.live_server import LiveServer, live_server, unused_port_url

COMPOSE_FILES = ("docker-compose.yml", "docker-compose.gpu.yml")
HEALTHCHECK_URL = re.compile(r"http://127\.0\.0\.1:(\d+)(/[\w./-]*)")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    instructions, pending = [], ""
    for line in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") and not pending.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        text = (pending + line).strip()
        pending = ""
        if text:
            keyword, _, arguments = text.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def arguments_of(keyword: str) -> list[str]:
    return [arguments for name, arguments in dockerfile_instructions() if name == keyword]


def dockerignore_patterns() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def excluded_from_build_context(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parents = [str(Path(*Path(path).parts[: i + 1])) for i in range(len(Path(path).parts))]
    excluded = False
    for pattern in dockerignore_patterns():
        exception = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        if any(fnmatch.fnmatchcase(candidate, pattern) for candidate in parents):
            excluded = not exception
    return excluded


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((REPO_ROOT / name).read_text())


def served_service(config: dict) -> tuple[str, dict]:
    """The compose service built from this repository."""
    [(name, service)] = [(n, s) for n, s in config["services"].items() if "build" in s]
    return name, service


def get_routes(app: FastAPI) -> set[str]:
    return {path for path, methods in app.openapi()["paths"].items() if "get" in methods}


@pytest.fixture(scope="module")
def app() -> FastAPI:
    from app.main import app

    return app


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_files_parse(name: str) -> None:
    config = compose(name)
    assert isinstance(config["services"], dict) and config["services"]


def test_copied_paths_exist_and_reach_the_build_context() -> None:
    sources = [shlex.split(arguments)[:-1] for arguments in arguments_of("COPY")]
    sources = [source for group in sources for source in group]
    assert {"pyproject.toml", "app/", "models/"} <= set(sources)
    for source in sources:
        path = REPO_ROOT / source
        assert path.exists(), f"COPY {source}: no such path in the repository"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        files = [file for file in files if "__pycache__" not in file.parts]
        assert files, f"COPY {source} copies nothing"
        for file in files:
            relative = str(file.relative_to(REPO_ROOT))
            assert not excluded_from_build_context(relative), f"{relative} is COPY'd but .dockerignore drops it"


KEPT_OUT = [".venv/bin/python", "runs/x/best.pt", ".cache/x.npz", "tests/conftest.py", ".git/HEAD", "training/train.py"]


@pytest.mark.parametrize("path", KEPT_OUT)
def test_dockerignore_keeps_heavy_and_private_files_out(path: str) -> None:
    assert excluded_from_build_context(path)


def test_model_files_named_by_the_card_are_copied() -> None:
    card = json.loads((REPO_ROOT / "models" / "model_card.json").read_text())
    for model in card["models"].values():
        assert not excluded_from_build_context(f"models/{model['file']}")
        assert (REPO_ROOT / "models" / model["file"]).is_file()


def test_cmd_starts_the_fastapi_app_on_all_interfaces(app: FastAPI) -> None:
    [cmd] = arguments_of("CMD")
    command = json.loads(cmd)  # exec form, so uvicorn gets the container's signals
    assert command[0] == "uvicorn"
    module, _, attribute = command[1].partition(":")
    assert (REPO_ROOT / Path(*module.split("."))).with_suffix(".py").is_file()
    assert (module, attribute) == ("app.main", "app") and isinstance(app, FastAPI)
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert arguments_of("EXPOSE") == [command[command.index("--port") + 1]]


def test_the_app_imports_without_what_the_image_leaves_out() -> None:
    """training/ and tests/ stay out of the build context, torch out of the install: app/ must not need them."""
    blocked = "import sys; sys.modules.update(dict.fromkeys(('training', 'tests', 'torch', 'torchvision')))"
    code = f"{blocked}; import app.main, app.cli, app.client"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_image_runs_as_a_non_root_user() -> None:
    [user] = arguments_of("USER")
    assert user.split(":")[0] not in ("0", "root")


def test_variant_build_arg_selects_a_defined_base_stage() -> None:
    stages = {arguments.split()[-1] for arguments in arguments_of("FROM") if " AS " in arguments.upper()}
    assert {"base-cpu", "base-gpu"} <= stages
    assert "VARIANT=cpu" in arguments_of("ARG")
    assert arguments_of("FROM")[-1].startswith("base-${VARIANT}")


def test_image_installs_the_serving_dependencies_without_torch() -> None:
    """Runs the Dockerfile's own requirements one-liner on pyproject.toml."""
    [install] = [arguments for arguments in arguments_of("RUN") if "tomllib" in arguments]
    code = re.search(r'python -c "(.*?)" >', install).group(1)
    output = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    requirements = output.stdout.split()
    dependencies = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert requirements == [d for d in dependencies if not d.startswith("onnxruntime")]
    assert "fastapi" in " ".join(requirements)
    assert not [d for d in dependencies if re.match(r"(torch|torchvision|onnx)\b", d)]


def test_healthchecks_probe_routes_of_the_app(app: FastAPI) -> None:
    """The image checks liveness; compose checks readiness, which is what services started after it wait for."""
    routes = get_routes(app)
    for command, expected_path in zip(healthcheck_commands(), ("/healthz", "/readyz"), strict=True):
        port, path = HEALTHCHECK_URL.search(command[2]).groups()
        assert path == expected_path and path in routes
        assert port == "8000"


def test_compose_mounts_exist_and_the_service_publishes_its_port() -> None:
    config = compose()
    for service in config["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO_ROOT / source).exists(), f"{source} is mounted but missing"
    _, service = served_service(config)
    assert "8000:8000" in service["ports"]
    assert service["build"]["context"] == "."


def test_compose_environment_names_real_settings() -> None:
    from app.core.config import Settings

    _, service = served_service(compose())
    prefix = Settings.model_config["env_prefix"]
    for variable in service["environment"]:
        assert variable.startswith(prefix) and variable.removeprefix(prefix).lower() in Settings.model_fields


def test_prometheus_scrapes_the_service_metrics(app: FastAPI) -> None:
    config = compose()
    name, service = served_service(config)
    prometheus = config["services"]["prometheus"]
    assert prometheus["image"].startswith("prom/prometheus:")
    [mount] = [v for v in prometheus["volumes"] if v.split(":")[1] == "/etc/prometheus/prometheus.yml"]
    scrape = yaml.safe_load((REPO_ROOT / mount.split(":")[0]).read_text())
    [job] = scrape["scrape_configs"]
    container_port = service["ports"][0].split(":")[-1]
    assert job["static_configs"][0]["targets"] == [f"{name}:{container_port}"]
    assert job["metrics_path"] in get_routes(app)


def healthcheck_commands() -> list[list[str]]:
    """The Dockerfile's and the compose file's healthcheck commands, as argument lists."""
    [dockerfile_check] = arguments_of("HEALTHCHECK")
    _, service = served_service(compose())
    compose_check = service["healthcheck"]["test"]
    assert compose_check[0] == "CMD"
    return [json.loads(dockerfile_check.split(" CMD ", 1)[1]), compose_check[1:]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("containers"), warmup_runs=0) as server:
        yield server


def test_healthcheck_commands_pass_on_a_ready_service_and_fail_without_one(server: LiveServer) -> None:
    for command in healthcheck_commands():
        assert command[:2] == ["python", "-c"]
        for url, expected_success in ((server.url, True), (unused_port_url(), False)):
            code = command[2].replace("http://127.0.0.1:8000", url)
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
            assert (done.returncode == 0) == expected_success, done.stderr
