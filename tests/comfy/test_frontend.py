"""The workflow converter gives what ComfyUI's own frontend gives (graphToPrompt in headless Chromium).

Needs Debian's chromium, node and npm's playwright-core (scripts/dev_setup.sh installs them); skips
with the reason when any is missing. Starts a real ComfyUI server on loopback with EraseKit in its
custom_nodes folder.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from harness import PACK_FOLDER_NAME, PACK_ROOT, find_comfyui
from erasekit.headless.workflow import workflow_to_prompt

HERE = Path(__file__).resolve().parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NODE = shutil.which("node")
NODE_MODULES = Path(os.environ.get("ERASEKIT_NODE_MODULES", Path.home() / ".cache" / "erasekit" / "node" / "node_modules"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def frontend(tmp_path_factory):
    comfy_path, reason = find_comfyui()
    if comfy_path is None:
        pytest.skip(reason)
    if not (CHROMIUM and NODE and (NODE_MODULES / "playwright-core").is_dir()):
        pytest.skip("needs chromium, node and playwright-core (run scripts/dev_setup.sh)")
    base = tmp_path_factory.mktemp("comfy-server")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_FOLDER_NAME).symlink_to(PACK_ROOT, target_is_directory=True)
    port = _free_port()
    log = open(base / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
         "--base-directory", str(base), "--disable-auto-launch"],
        cwd=comfy_path, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                object_info = json.load(urllib.request.urlopen(url + "/object_info", timeout=5))
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    pytest.fail("ComfyUI server did not start:\n" + (base / "server.log").read_text()[-3000:])
                time.sleep(1)
        yield url, object_info
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def frontend_prompts(url, workflows):
    env = dict(os.environ, NODE_PATH=str(NODE_MODULES))
    script = HERE / "frontend" / "graph_to_prompt.mjs"
    # ESM ignores NODE_PATH, so run the script from a copy that sits next to node_modules.
    runner = NODE_MODULES.parent / "graph_to_prompt.mjs"
    shutil.copyfile(script, runner)
    done = subprocess.run([NODE, str(runner), url, CHROMIUM], input=json.dumps(workflows), capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _cases():
    workflows = {p.stem: json.loads(p.read_text()) for p in sorted((PACK_ROOT / "workflows").glob("*.json"))}
    for p in sorted((HERE / "frontend").glob("*.json")):
        workflows["case_" + p.stem] = json.loads(p.read_text())
    return workflows


def test_converter_matches_frontend_graph_to_prompt(frontend):
    url, object_info = frontend
    workflows = _cases()
    seen = frontend_prompts(url, workflows)
    problems = []
    for name, workflow in workflows.items():
        if seen[name]["missing"]:
            problems.append(f"{name}: the frontend lacks node types {seen[name]['missing']}")
        ours = workflow_to_prompt(workflow, object_info)
        theirs = seen[name]["output"]
        for entry in list(ours.values()) + list(theirs.values()):
            entry.pop("_meta", None)
        for node_id in sorted(set(ours) | set(theirs)):
            if ours.get(node_id) != theirs.get(node_id):
                problems.append(f"{name} node {node_id}: converter {ours.get(node_id)} != frontend {theirs.get(node_id)}")
    assert not problems, "\n".join(problems)


def test_server_lists_every_workflow_as_a_template(frontend):
    url, _ = frontend
    listed = json.load(urllib.request.urlopen(url + "/api/workflow_templates", timeout=10))
    shipped = sorted(p.stem for p in (PACK_ROOT / "workflows").glob("*.json"))
    assert sorted(listed.get(PACK_FOLDER_NAME, [])) == shipped
