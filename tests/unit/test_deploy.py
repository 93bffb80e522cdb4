"""deploy/ and docker-compose.yml: the files parse and say what they must; `docker compose config` accepts the
compose file where docker compose is installed; studio_bootstrap.sh clones, updates, installs and starts a
worker (against a local git repo and a stub virtualenv, so no network and no pip)."""
from __future__ import annotations

import configparser
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = ROOT / "deploy" / "studio_bootstrap.sh"


# ---- docker-compose.yml ----------------------------------------------------------------------------------------
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_are_wired_by_environment():
    services = compose()["services"]
    assert set(services) == {"postgres", "api", "worker"}
    pg, api, worker = services["postgres"], services["api"], services["worker"]
    db = pg["environment"]
    assert api["environment"]["DATABASE_URL"] == (
        f"postgresql://{db['POSTGRES_USER']}:${{POSTGRES_PASSWORD:-gridfleet}}@postgres:5432/{db['POSTGRES_DB']}")
    assert api["command"][:2] == ["gridfleet", "serve"] and "0.0.0.0" in api["command"]
    port = api["command"][api["command"].index("--port") + 1]
    assert f"{port}:{port}" in api["ports"]
    assert worker["command"] == ["gridfleet", "worker"]
    assert worker["environment"]["GRIDFLEET_SERVER_URL"] == f"http://api:{port}"
    assert worker["environment"]["GRIDFLEET_TOKEN"] == "${GRIDFLEET_WORKER_TOKEN:-}"
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert worker["depends_on"]["api"]["condition"] == "service_healthy"
    assert api["image"] == worker["image"] and api["build"] == worker["build"] == "."


def test_compose_worker_reserves_an_nvidia_gpu():
    devices = compose()["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name in ("postgres", "api"):
        assert "deploy" not in compose()["services"][name]


def test_dockerfile_pins_torch_before_installing_gridfleet():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    torch = next(i for i, line in enumerate(lines) if "pip install" in line and "torch==2.13.0" in line)
    package = next(i for i, line in enumerate(lines) if line.strip() == "RUN pip install --no-cache-dir .")
    assert torch < package
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git"} <= set(ignored)


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker") or ("/usr/local/bin/docker" if Path("/usr/local/bin/docker").exists() else None)
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_config_accepts_the_file(tmp_path):
    command = _compose_command()
    if command is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI must check docker-compose.yml: .ci/run installs docker-compose")
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRIDFLEET_", "POSTGRES_", "HF_"))}
    # The project directory is a copy without .env: a developer's .env must not change the result.
    for name in ("docker-compose.yml", "Dockerfile", ".dockerignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    result = subprocess.run([*command, "-f", str(tmp_path / "docker-compose.yml"), "config", "-q"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- systemd and Ray ------------------------------------------------------------------------------------------
def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((ROOT / "deploy" / name).read_text())
    return parser


def test_worker_unit_preempts_on_stop_and_restarts_on_failure():
    service = unit("gridfleet-worker.service")["Service"]
    assert service["ExecStart"] == "/bin/bash /opt/gridfleet/deploy/studio_bootstrap.sh"
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > 30  # more than the agent's default --grace
    assert service["Restart"] == "on-failure"
    assert unit("gridfleet-worker.service")["Install"]["WantedBy"] == "multi-user.target"


def test_api_unit_serves():
    service = unit("gridfleet-api.service")["Service"]
    assert service["ExecStart"].startswith("/opt/gridfleet/.venv/bin/gridfleet serve")
    assert "postgresql.service" in unit("gridfleet-api.service")["Unit"]["After"]


def test_ray_cluster_example_installs_gridfleet_on_every_node():
    cluster = yaml.safe_load((ROOT / "deploy" / "ray-cluster.yaml").read_text())
    assert cluster["provider"]["type"] == "local" and cluster["provider"]["worker_ips"]
    setup = "\n".join(cluster["setup_commands"])
    assert "GRIDFLEET_BOOTSTRAP_ONLY=1 bash ~/gridfleet/deploy/studio_bootstrap.sh" in setup
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cluster["worker_start_ray_commands"])


# ---- studio_bootstrap.sh -------------------------------------------------------------------------------------
def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout.strip()


def _stub_venv(path: Path, record: Path) -> None:
    """A virtualenv whose pip and gridfleet only record how they were called."""
    (path / "bin").mkdir(parents=True)
    scripts = {
        "python": "#!/bin/sh\nexit 0\n",
        "pip": f'#!/bin/sh\necho "pip $*" >> {record}\n',
        "gridfleet": f'#!/bin/sh\necho "gridfleet $* | server=$GRIDFLEET_SERVER_URL '
                     f'token=${{#GRIDFLEET_TOKEN}}" >> {record}\n',
    }
    for name, text in scripts.items():
        (path / "bin" / name).write_text(text)
        (path / "bin" / name).chmod(stat.S_IRWXU)


def test_bootstrap_clones_installs_once_updates_and_starts_the_worker(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    _git(remote, "init", "-q", "-b", "main")
    (remote / "pyproject.toml").write_text('[project]\nname = "gridfleet"\n')
    _git(remote, "add", "-A")
    _git(remote, "commit", "-q", "-m", "first")
    record, checkout, venv = tmp_path / "calls.txt", tmp_path / "checkout", tmp_path / "venv"
    _stub_venv(venv, record)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GRIDFLEET_", "HF_"))}
    base.update(GRIDFLEET_DIR=str(checkout), GRIDFLEET_REPO_URL=str(remote), GRIDFLEET_VENV=str(venv),
                GIT_CONFIG_GLOBAL="/dev/null")

    def bootstrap(**env: str) -> str:
        record.write_text("")
        result = subprocess.run(["bash", str(BOOTSTRAP)], env={**base, **env}, capture_output=True, text=True,
                                check=False, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "gf_secret" not in result.stdout + result.stderr
        return record.read_text()

    calls = bootstrap(GRIDFLEET_WORKER_NAME="studio-a", GRIDFLEET_MAX_RUN_TIME="600")
    assert (checkout / ".git").is_dir()
    assert calls.splitlines() == [
        "pip install -q --upgrade pip",
        "pip install -q torch==2.13.0",  # pinned, before the package
        "pip install -q -e .",
        "gridfleet worker --name studio-a --max-run-time 600 | server= token=0",
    ]

    # The checkout's .env is read; the environment wins over it; a new commit is fast-forwarded to;
    # pyproject.toml did not change, so nothing is reinstalled.
    (checkout / ".env").write_text('# settings\nGRIDFLEET_SERVER_URL="http://api.example:8000"\n'
                                   "GRIDFLEET_TOKEN=gf_secret_token   # a worker token\nexport GRIDFLEET_WORKER_NAME = from-dotenv\n"
                                   "GRIDFLEET_WORKER_ARGS=--grace 5 --trainers sleep\n")
    (remote / "NEW").write_text("x")
    _git(remote, "add", "-A")
    _git(remote, "commit", "-q", "-m", "second")
    assert bootstrap(GRIDFLEET_WORKER_NAME="studio-b").splitlines() == [
        "gridfleet worker --name studio-b --grace 5 --trainers sleep | server=http://api.example:8000 token=15"]
    assert (checkout / "NEW").exists()
    assert bootstrap().splitlines()[-1].startswith("gridfleet worker --name from-dotenv ")

    # A changed pyproject.toml reinstalls; GRIDFLEET_BOOTSTRAP_ONLY=1 does not start a worker.
    (remote / "pyproject.toml").write_text('[project]\nname = "gridfleet"\nversion = "2"\n')
    _git(remote, "commit", "-q", "-am", "deps")
    calls = bootstrap(GRIDFLEET_BOOTSTRAP_ONLY="1").splitlines()
    assert calls == ["pip install -q --upgrade pip", "pip install -q torch==2.13.0", "pip install -q -e ."]


def test_bootstrap_without_checkout_or_repo_url_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDFLEET_")}
    env["GRIDFLEET_DIR"] = str(tmp_path / "none")
    result = subprocess.run(["bash", str(BOOTSTRAP)], env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "no GRIDFLEET_REPO_URL to clone" in result.stderr
