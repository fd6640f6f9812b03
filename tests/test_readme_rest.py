"""Every REST example of the README and of docs/serving.md runs as written against a real server.

The README's "Archive and serve" and "Curl" stages show archive and ``severstal serve`` and the curl calls to
that server; docs/serving.md shows TorchServe's own ``torchserve --start`` with the project's config.properties,
its curl calls and ``torchserve --stop``, the Open Inference Protocol's curl and Python calls, and
``severstal serve --engine ray``. This test runs them in a scratch folder laid out as the README's
earlier stages leave it (``runs/small``, ``data/synthetic/train_images``), changing only the ports (8080..8085
become a free block) and adding ``-o``/``-w`` to each curl line to read its body and HTTP status. Each server
gets its own TMPDIR, LOG_LOCATION and ports, so it runs beside any other TorchServe.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_serving import check_answer

import severstal.serve
from severstal.serve import server as serve_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = (README, ROOT / "docs" / "serving.md")
"""Where the REST examples are, searched in this order."""
README_PORTS = range(8080, 8086)
"""The ports the README and config.properties name: inference, management, metrics, gRPC x2, workers."""


def bash_blocks() -> list[str]:
    return [block for page in PAGES for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)]


def block_with(words: str, curl: bool = True) -> str:
    """The first bash block of :data:`PAGES` that holds ``words`` (and a curl call when ``curl``); fails naming
    what is missing."""
    found = [b for b in bash_blocks() if words in b and (not curl or "\ncurl " in "\n" + b)]
    pages = " or ".join(str(page.relative_to(ROOT)) for page in PAGES)
    assert found, f"no bash block of {pages} holds {words!r}" + (" and a curl call" if curl else "")
    return found[0]


def with_ports(text: str, base: int) -> str:
    """The README's ports 8080..8085 moved to ``base`` .. ``base + 5``."""
    return re.sub(r"\b(80[89]\d)\b", lambda m: str(base + int(m.group(1)) - 8080)
                  if int(m.group(1)) in README_PORTS else m.group(1), text)


def run_block(block: str, cwd: Path, env: dict, base: int, timeout: float = 600) -> list[tuple[int, str]]:
    """Run a README block as one bash script (ports moved); return (HTTP status, body) of each curl line.

    Each curl line writes its body and status to files of its own (``-o``, ``-w`` added): a server started
    in the background by the block (``torchserve --start``) logs to the same terminal.
    """
    out = Path(tempfile.mkdtemp(prefix=f"curl-{base}-", dir=cwd))
    lines, count = [], 0
    for line in with_ports(block, base).splitlines():
        if line.startswith("curl "):
            command = line.partition("  #")[0].rstrip()
            line = f"{command} -o '{out}/{count}.body' -w '%{{http_code}}' > '{out}/{count}.status'"
            count += 1
        lines.append(line)
    with open(out / "console.log", "w") as console:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], cwd=cwd, env=env,
                              timeout=timeout, stdout=console, stderr=subprocess.STDOUT)
    log = (out / "console.log").read_text(errors="replace")
    assert done.returncode == 0, f"README block failed ({done.returncode}):\n{block}\n{log[-4000:]}"
    return [(int((out / f"{i}.status").read_text()), (out / f"{i}.body").read_text(errors="replace"))
            for i in range(count)]


def check_answers(calls: list[tuple[int, str]], block: str) -> None:
    """Every curl call answered 200: ``/ping`` Healthy, ``/v2/health/ready`` ready, predictions in the REST
    contract at 1600x256 (an ``infer`` answer holds it: :func:`severstal.serve.oip.record_from_response`)."""
    from severstal.serve.oip import record_from_response

    curls = [line for line in block.splitlines() if line.startswith("curl ")]
    assert len(calls) == len(curls), (calls, curls)
    for line, (status, body) in zip(curls, calls):
        assert status == 200, (line, status, body[:500])
        answer = json.loads(body)
        if "/ping" in line:
            assert answer == {"status": "Healthy"}, line
        elif "/v2/health/ready" in line:
            assert answer == {"ready": True}, line
        elif "/infer" in line:
            check_answer(record_from_response(answer), 256, 1600)
        else:
            check_answer(answer, 256, 1600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, scratch_run, real_data) -> Path:
    """A folder as the README's earlier stages leave it: runs/small and data/synthetic/train_images."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "runs").mkdir()
    (folder / "runs" / "small").symlink_to(scratch_run, target_is_directory=True)
    images = folder / "data" / "synthetic" / "train_images"
    images.mkdir(parents=True)
    for path in sorted((real_data / "train_images").glob("*.jpg"))[:2]:
        shutil.copy(path, images / path.name)
    return folder


@pytest.fixture(scope="module")
def env() -> dict:
    """The environment of a user who ran ``source .venv/bin/activate``."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def archived(workdir, env) -> Path:
    """The README's archive line, run as written."""
    block = block_with("severstal archive", curl=False)
    [line] = [line for line in block.splitlines() if line.startswith("severstal archive")]
    subprocess.run(["bash", "-c", line], cwd=workdir, env=env, check=True, capture_output=True, timeout=300)
    assert (workdir / "model_store" / "severstal.mar").is_file()
    return workdir / "model_store"


SERVE_LINES = {"torchserve": "severstal serve --model-store", "ray": "severstal serve --engine ray"}
"""How the README's line that starts each server begins."""


@pytest.mark.parametrize("engine", list(SERVE_LINES))
def test_the_readme_curl_and_python_calls_work_against_severstal_serve(workdir, env, archived, engine):
    """The native block (curl) and the Open Inference Protocol's block (curl and Python) against each server."""
    base = serve_server.free_port_block(6)
    [line] = [line for block in bash_blocks() for line in block.splitlines() if line.startswith(SERVE_LINES[engine])]
    run_dir = workdir / f"serve-run-{engine}"
    process = subprocess.Popen(["bash", "-c", f"exec {with_ports(line, base)} --run-dir {run_dir}"], cwd=workdir,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        seen = []
        deadline = time.monotonic() + 300
        for out in process.stdout:
            seen.append(out)
            if "Ctrl-C or SIGTERM stops the server" in out:
                break
            assert time.monotonic() < deadline, "".join(seen)
        else:
            pytest.fail(f"severstal serve ended before it was ready:\n{''.join(seen)}")
        for words in ("/ping", "/v2/models/severstal/infer"):
            block = block_with(words, curl=True)
            check_answers(run_block(block, workdir, env, base), block)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, "".join(seen)


def test_the_readme_curl_calls_work_against_plain_torchserve(workdir, env, archived):
    base = serve_server.free_port_block(6)
    # The project's config.properties where the README expects it, with this test's ports.
    (workdir / "torchserve").mkdir(exist_ok=True)
    text = severstal.serve.PROPERTIES_FILE.read_text()
    (workdir / "torchserve" / "config.properties").write_text(with_ports(text, base))
    for name in ("ts-tmp", "ts-logs"):
        (workdir / name).mkdir(exist_ok=True)
    own = {**env, "TMPDIR": str(workdir / "ts-tmp"), "LOG_LOCATION": str(workdir / "ts-logs"),
           "METRICS_LOCATION": str(workdir / "ts-logs")}
    block = block_with("torchserve --start", curl=True)
    assert "torchserve --stop" in block, "the README's torchserve block should end with torchserve --stop"
    try:
        check_answers(run_block(block, workdir, own, base), block)
    finally:
        pid_file = workdir / "ts-tmp" / ".model_server.pid"
        if pid_file.is_file():  # the block failed before its own torchserve --stop
            subprocess.run([str(Path(sys.executable).parent / "torchserve"), "--stop"], env=own, cwd=workdir,
                           capture_output=True, timeout=120)
