"""`serve run serve_config.yaml` as a user runs it: the demo model with its demo adapters on one
CPU replica, asked a question through the openai SDK."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import openai
import pytest

from deploy.demo import cache_root

API = "http://127.0.0.1:8000"


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if not (port_is_free(8000) and port_is_free(9464)):
        pytest.skip("serve_config.yaml's ports 8000/9464 are in use on this machine")
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "RAY_TMPDIR": tempfile.mkdtemp(prefix="lfray", dir="/tmp"),
           # The converted demo model is shared with the rest of the suite, not converted again.
           "LORAFLEET_CACHE": str(cache_root()), "PYTHONUNBUFFERED": "1"}
    serve_bin = os.path.join(os.path.dirname(sys.executable), "serve")
    proc = subprocess.Popen([serve_bin, "run", "serve_config.yaml"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + 400
    while not any("lorafleet is up" in ln for ln in lines):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("serve run did not come up:\n" + "".join(lines[-40:]))
        time.sleep(1)
    yield lines
    os.killpg(proc.pid, 2)  # Ctrl-C, as a user stops it: serve run shuts Serve and Ray down
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


def ask(model: str, question: str) -> str:
    client = openai.OpenAI(base_url=API + "/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           max_tokens=24, temperature=0.0)
    return reply.choices[0].message.content


def test_startup_message_has_a_curl_line(served):
    text = "".join(served)
    assert f"OpenAI-compatible API at {API}/v1" in text
    assert f"curl -s {API}/v1/chat/completions" in text


def test_demo_adapters_change_the_answer(served):
    question = "What is the capital of France?"
    base = ask("SmolLM2-135M-Instruct", question)
    shouty = ask("shouty", question)
    pirate = ask("pirate", question)
    assert base and shouty != base and pirate != base
    letters = [c for c in shouty if c.isalpha()]
    assert sum(c.isupper() for c in letters) > 0.8 * len(letters)
    assert pirate.lower().startswith("arr")
