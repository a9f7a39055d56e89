"""The README's "Running on a Ray cluster" recipe, run as written on a local two-node cluster.

The bash blocks of that section are read from the README (so it cannot drift from what is tested) and run
in order, each with the first block's exports in front, on a head node and a second node (both on
127.0.0.1, 4 logical CPUs each, token authentication on as the recipe sets it) and a real `mlflow server`.
Substitutions, the ones the README names: the first block's values (a temporary DATA, this checkout as
PROJECT, this Python's folder as the venv, HEAD_IP=127.0.0.1, a 1-epoch cpu-small SIZE); free ports for
Ray (GCS, dashboard), MLflow and Serve; on each `ray start`, a private --temp-dir, the node's own free
agent ports, `--num-cpus 4` and the node address, and the dashboard on 127.0.0.1 (other Ray instances
share this machine); a temporary HOME (the token is written there, not to the user's ~/.ray); the
cluster's processes find this checkout through PYTHONPATH (the recipe's `pip install -e .`); and Serve
deploys a copy of serve/config.yaml with its slide root, work folder, tracking server, port and
`proxy_location: HeadOnly` (both "nodes" share one machine's ports).

Each step's outcome is checked: the token exists, the second node joined, the Train workers ran on both
nodes, the search ran 2 trials, the evaluation wrote metrics, the cohort job a Parquet row per slide, and
the scored request answered 200 with a score. Every command's wall time is printed (run with -s).

The cluster is stopped by killing exactly the processes whose command line names its temp folder or the
test's DATA folder (`ray stop` would stop every Ray instance on the machine, other people's included).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
README = (PROJECT_ROOT / "README.md").read_text()

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2700)]

NODE_START_S = 240  # each block that starts a node or the tracking server; generous for a loaded machine
JOB_S = 1200  # one `ray job submit` (training and the search run whole Ray Train runs)
SERVE_S = 600
SIZE = "--preset cpu-small --epochs 1 --set train.steps_per_epoch=2"


def _cluster_section() -> str:
    return README.split("## Running on a Ray cluster", 1)[1].split("\n## ", 1)[0]


def _blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", _cluster_section(), re.S)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_naming(marker: str) -> list[int]:
    """Processes whose command line contains ``marker`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


def _kill_naming(markers: list[str]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 0.0)):
        for marker in markers:
            for pid in _pids_naming(marker):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while any(_pids_naming(m) for m in markers) and time.monotonic() < deadline:
            time.sleep(0.5)


@dataclass
class Recipe:
    """The README's blocks with the test's substitutions, and a shell to run them in."""

    data: Path
    home: Path
    temp_root: str
    ports: dict[str, int]
    env: dict[str, str]
    exports: str = ""
    times: list[tuple[str, float]] = field(default_factory=list)

    def substitute(self, text: str) -> str:
        for default, name in (("6379", "gcs"), ("8265", "dashboard"), ("5000", "mlflow"), ("8000", "serve")):
            text = re.sub(rf"\b{default}\b", str(self.ports[name]), text)
        return text

    def node_flags(self, node: str) -> str:
        agent = {name: _free_port() for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                 "runtime-env-agent-port", "metrics-export-port")}
        flags = [f"--temp-dir {self.temp_root}/{node}", "--num-cpus 4", "--node-ip-address 127.0.0.1",
                 "--disable-usage-stats", *(f"--{name} {port}" for name, port in agent.items())]
        if node == "head":
            flags.append(f"--ray-client-server-port {_free_port()}")
        return " ".join(flags)

    def run(self, command: str, timeout_s: float, label: str | None = None) -> subprocess.CompletedProcess[str]:
        """``command`` after the first block's exports, in a bash of its own (new session: a timeout kills
        whatever it started in the foreground); its wall time is recorded under ``label``."""
        script = f"set -euo pipefail\n{self.exports}\n{command}\n"
        started = time.monotonic()
        process = subprocess.Popen(["bash", "-c", script], cwd=PROJECT_ROOT, env=self.env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            out, _ = process.communicate()
            pytest.fail(f"{label or command!r} still running after {timeout_s:.0f} s; output:\n{out[-6000:]}")
        seconds = time.monotonic() - started
        self.times.append((label or command.strip().splitlines()[-1][:100], seconds))
        print(f"[recipe] {seconds:7.1f} s  {label or command.strip()[:140]}", flush=True)
        return subprocess.CompletedProcess(command, process.returncode, out, "")

    def run_ok(self, command: str, timeout_s: float, label: str | None = None) -> str:
        done = self.run(command, timeout_s, label)
        assert done.returncode == 0, f"{label or command} exited {done.returncode}:\n{done.stdout[-8000:]}"
        return done.stdout


def _exports_block(block: str, values: dict[str, str]) -> str:
    """The first block with the values of ``values``' names replaced; its other lines as written."""
    lines = []
    for line in block.splitlines():
        match = re.match(r"export (\w+)=", line)
        if match and match.group(1) in values:
            lines.append(f"export {match.group(1)}={values.pop(match.group(1))}")
        else:
            lines.append(line)
    assert not values, f"the README's first cluster block no longer exports {sorted(values)}"
    return "\n".join(lines)


@pytest.fixture()
def recipe(tmp_path: Path) -> Iterator[Recipe]:
    temp_root = tempfile.mkdtemp(prefix="rcl", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    data = tmp_path / "data"
    home = tmp_path / "home"
    data.mkdir()
    home.mkdir()
    ports = {name: _free_port() for name in ("gcs", "dashboard", "mlflow", "serve")}
    env = {k: v for k, v in os.environ.items()
           if k not in {"RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI", "PYTHONPATH"}}
    env |= {"HOME": str(home), "PYTHONPATH": str(PROJECT_ROOT), "PYTHONUNBUFFERED": "1",
            "RAY_gcs_server_port_wait_time_s": "120"}  # a loaded machine starts the GCS slowly
    made = Recipe(data=data, home=home, temp_root=temp_root, ports=ports, env=env)
    try:
        yield made
    finally:
        _kill_naming([temp_root, str(data)])
        shutil.rmtree(temp_root, ignore_errors=True)


def _alive_nodes(recipe: Recipe) -> int:
    out = recipe.run("ray list nodes --address $DASHBOARD --filter state=ALIVE --format json", 120,
                     label="(test) ray list nodes").stdout
    start = out.find("[")
    return len(json.loads(out[start:])) if start >= 0 else 0


def test_the_readme_cluster_recipe_runs_as_written(recipe: Recipe) -> None:
    blocks = _blocks()
    assert len(blocks) == 7, f"expected 7 bash blocks in the README's cluster section, found {len(blocks)}"
    exports, head, second_node, runtime_env, cohort, jobs, serving = blocks
    recipe.exports = recipe.substitute(_exports_block(exports, {
        "PROJECT": str(PROJECT_ROOT), "DATA": str(recipe.data), "HEAD_IP": "127.0.0.1",
        "SIZE": shlex.quote(SIZE), "PATH": f"{Path(sys.executable).parent}:$PATH"}))
    assert "export RAY_AUTH_MODE=token" in recipe.exports  # the recipe keeps Ray's token authentication on

    # the head node and the tracking server
    head = recipe.substitute(head).replace("--dashboard-host 0.0.0.0", "--dashboard-host 127.0.0.1")
    head = re.sub(r"^(ray start --head .*)$", lambda m: f"{m.group(1)} {recipe.node_flags('head')}", head, flags=re.M)
    for line in head.strip().splitlines():
        recipe.run_ok(line, NODE_START_S)
    token = recipe.home / ".ray" / "auth_token"
    assert token.is_file() and token.read_text().strip(), "no token in ~/.ray/auth_token"

    # the second node joins with the token
    second = re.sub(r"^(ray start --address .*)$", lambda m: f"{m.group(1)} {recipe.node_flags('second')}",
                    recipe.substitute(second_node), flags=re.M)
    recipe.run_ok(second.strip(), NODE_START_S)
    deadline = time.monotonic() + 120
    while (alive := _alive_nodes(recipe)) < 2:
        assert time.monotonic() < deadline, f"{alive} node(s) alive 120 s after the second `ray start`"
        time.sleep(3)
    # a client that sends no token is refused: authentication is really on
    refused = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list", "--address",
                              f"http://127.0.0.1:{recipe.ports['dashboard']}"],
                             env=dict(recipe.env, HOME=str(recipe.data), RAY_AUTH_MODE="disabled"),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0, refused.stdout[-2000:]

    recipe.run_ok(recipe.substitute(runtime_env).strip(), 60)
    assert "MLFLOW_TRACKING_URI" in (recipe.data / "runtime_env.yaml").read_text()
    recipe.run_ok(cohort.strip(), 600)
    import pyarrow.parquet as pq

    n_slides = pq.read_table(recipe.data / "cohort" / "manifest.parquet").num_rows
    assert n_slides == 8

    # the jobs, one `ray job submit` at a time
    jobs_lines = [line for line in recipe.substitute(jobs).strip().splitlines() if line.strip()]
    assert jobs_lines[0] == "cd $PROJECT"
    submits = {re.search(r"python -m ([\w.]+)", line).group(1): line for line in jobs_lines[1:]}
    assert list(submits) == ["jobs.preprocess", "jobs.train", "tune.search", "jobs.evaluate", "jobs.score_cohort"]
    logs = {}
    for module, line in submits.items():
        logs[module] = recipe.run_ok(f"cd $PROJECT\n{line}", JOB_S, label=module)

    assert any((recipe.data / "cache").rglob("*")), "preprocess wrote no cache"
    nodes = set(re.findall(r"\[train\] worker \d/2 on node ([0-9a-f]+)", logs["jobs.train"]))
    assert len(nodes) == 2, f"the 2 Train workers ran on {len(nodes)} node(s):\n{logs['jobs.train'][-4000:]}"
    assert (recipe.data / "runs" / "her2-train" / "report.json").is_file()  # --run-dir on shared storage
    assert "Found multiple active Ray instances" not in logs["jobs.train"]
    from mlflow import MlflowClient

    tracking = f"http://127.0.0.1:{recipe.ports['mlflow']}"
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    assert client.get_model_version_by_alias("dual-attention-her2", "candidate") is not None
    assert client.get_model_version_by_alias("dual-attention-her2", "best-search") is not None
    tune_report = json.loads((recipe.data / "tune" / "her2-search" / "results" / "report.json").read_text())
    assert tune_report["trials"] == 2 and tune_report["errored"] == 0, tune_report
    metrics = json.loads((recipe.data / "eval" / "metrics.json").read_text())
    assert metrics["n_slides"] == 4 and 0.0 <= metrics["accuracy"] <= 1.0, metrics
    from jobs.score_cohort import read_scores

    scores = read_scores(recipe.data / "scores")
    assert len(scores) == n_slides and {r["status"] for r in scores} == {"ok"}, scores

    # Serve: a copy of serve/config.yaml with the test's paths and ports
    config = yaml.safe_load((PROJECT_ROOT / "serve" / "config.yaml").read_text())
    assert config["applications"][0]["args"]["model"] == "models:/dual-attention-her2@candidate"
    config["proxy_location"] = "HeadOnly"
    config["http_options"]["port"] = recipe.ports["serve"]
    config["applications"][0]["args"] |= {"slide_root": str(recipe.data / "cohort"),
                                          "work_dir": str(recipe.data / "serve"), "tracking_uri": tracking}
    copy = recipe.data / "serve-config.yaml"
    copy.write_text(yaml.safe_dump(config))
    serve_lines = [line for line in recipe.substitute(serving).strip().splitlines() if line.strip()]
    assert serve_lines[0] == "cd $PROJECT" and "serve/config.yaml" in serve_lines[1]
    serve_lines[1] = serve_lines[1].replace("serve/config.yaml", str(copy))
    recipe.run_ok(f"cd $PROJECT\n{serve_lines[1]}", SERVE_S)
    recipe.run_ok(serve_lines[2], SERVE_S)
    answer = json.loads(recipe.run_ok(serve_lines[3], SERVE_S))  # curl -f: HTTP 200, or the step fails
    assert answer["predicted_label"] in answer["model"]["class_names"] and answer["model"]["version"], answer
    assert answer["model"]["name"] == "dual-attention-her2" and answer["model"]["alias"] == "candidate"

    print("[recipe] wall times:\n" + "\n".join(f"  {s:7.1f} s  {name}" for name, s in recipe.times), flush=True)
