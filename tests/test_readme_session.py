"""The README's command-line session, run as written against a real `tuneforge up`.

The commands are read from the README (between ``<!-- cli-session -->`` markers), each run with
``--json`` as a subprocess; every answer is parsed (stdout must be exactly one JSON document) and
checked against what the platform really did. During ``jobs watch`` the job-scheduler is killed
(the supervised stack restarts it): the watch must reconnect by itself and still show every event
once, in order. ``jobs watch`` interrupted and started again is tested separately below.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def session_commands() -> list[tuple[list[str], int]]:
    """(argv after `tuneforge`, expected exit code) for each command of the README session; the
    export line is ["export"]."""
    block = README.read_text().split("<!-- cli-session -->")[1].split("<!-- /cli-session -->")[0]
    commands = []
    for line in block.splitlines():
        line = line.strip()
        if line.startswith("export TUNEFORGE_API_KEY="):
            commands.append((["export"], 0))
        elif line.startswith(".venv/bin/tuneforge "):
            command, _, comment = line.partition("#")
            argv = shlex.split(command)[1:]
            argv = argv[:-1] if argv[-1] == "&" else argv
            expected = re.search(r"exit code (\d)", comment)
            commands.append((argv, int(expected.group(1)) if expected else 0))
    return commands


class Session:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.data_dir = tmp_path / "state"
        self.key = ""

    def argv(self, args: list[str]) -> list[str]:
        return [sys.executable, "-m", "tuneforge.cli", "--data-dir", str(self.data_dir), *args, "--json"]

    def env(self, key: str | None = None) -> dict:
        return {**os.environ, "TUNEFORGE_API_KEY": self.key if key is None else key, "COLUMNS": "200"}

    def run(self, args: list[str], expected: int = 0, key: str | None = None) -> dict:
        result = subprocess.run(self.argv(args), capture_output=True, text=True, env=self.env(key), cwd=self.tmp,
                                timeout=600)
        assert result.returncode == expected, (args, result.returncode, result.stdout, result.stderr)
        return json.loads(result.stdout)  # exactly one JSON document, nothing else


def service_pid(up_pid: int, service: str) -> int:
    """The pid of `tuneforge serve <service>` started by the `up` process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == up_pid and b"serve" in cmdline and service.encode() in cmdline:
            return int(entry.name)
    raise AssertionError(f"no {service} process under {up_pid}")


def sequences(document: dict) -> list[int]:
    return [int(e["sequence"]) for e in document["events"]]


@pytest.fixture
def stack_up(tmp_path):
    data_dir = tmp_path / "state"
    up = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "--data-dir", str(data_dir), "up"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 90
    while not (data_dir / "stack.json").exists():
        assert up.poll() is None, up.stdout.read()
        assert time.monotonic() < deadline, "stack did not come up"
        time.sleep(0.2)
    yield up
    up.send_signal(signal.SIGINT)
    try:
        up.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)


def wait_for_training(s: Session, job_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        job = s.run(["jobs", "get", job_id])
        if job["state"] == "JOB_STATE_TRAINING" and int(job.get("progress", {}).get("step", 0)) > 0:
            return
        assert job["state"] not in ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED"), job
        assert time.monotonic() < deadline, job
        time.sleep(0.3)


def test_readme_cli_session(tmp_path, stack_up):
    s = Session(tmp_path)
    commands = session_commands()
    assert commands[0][0] == ["up"]
    seen: dict[str, dict] = {}
    job_id = ci_key = ""
    for args, expected in commands[1:]:
        if args == ["export"]:
            assert s.key.startswith("tfk_")
            continue
        # Placeholders from earlier answers; the repository's files from anywhere (the commands run
        # in the test's folder, where `./acme-support` is downloaded).
        args = [job_id if a == "job_..." else ci_key if a == "key_..." else
                str(ROOT / a) if a.startswith("examples/") else a for a in args]
        name = " ".join(args[:2]) if args[0] != "workspaces" or args[1] != "keys" else " ".join(args[:3])
        if name == "jobs watch":
            seen[name] = watch_with_a_forced_reconnect(s, stack_up, job_id)
            continue
        doc = s.run(args, expected)
        if name == "models delete" and expected:
            seen["models delete refused"] = doc
        else:
            seen[name] = doc
        if name == "workspaces create":
            s.key = doc["api_key"]
            time.sleep(0.5)  # the key reaches the other services by event
        elif name == "jobs create":
            job_id = doc["job"]["id"]
        elif name == "workspaces keys create":
            ci_key = doc["key"]["id"]
            ci_secret = doc["api_key"]

    assert Path(seen["models make-standin"]["path"]).is_dir()
    assert seen["workspaces create"]["workspace"]["plan"] == "PLAN_ENTERPRISE"
    imported = seen["data import"]
    assert (int(imported["imported"]), int(imported["rejected"])) == (500, 0)
    topics = {t["topic"]: int(t["example_count"]) for t in seen["data topics"]["topics"]}
    assert topics == {"billing": 125, "returns": 125, "shipping": 125, "tech-support": 125}

    plan = seen["jobs validate"]
    d, t = plan["dataset_plan"], plan["training_plan"]
    job = seen["jobs get"]
    built = job["dataset"]
    assert int(d["after_topics"]) == 250 and int(d["after_dedupe"]) == int(built["deduplicated_count"])
    assert (int(d["train_count"]), int(d["test_count"])) == (int(built["train_count"]), int(built["test_count"]))
    assert int(d["train_tokens"]) == int(built["train_tokens"]["total"])
    steps_per_epoch = -(-int(built["train_count"]) // 8)
    assert (int(t["steps_per_epoch"]), int(t["total_steps"])) == (steps_per_epoch, 3 * steps_per_epoch)
    assert [int(x) for x in t["eval_steps"]][-1] == 3 * steps_per_epoch
    assert t["wall_time_estimates"] and t["wall_time_estimates"][0]["device_class"]
    assert seen["jobs create"]["job"]["spec"]["name"] == "acme-support"

    assert job["state"] == "JOB_STATE_SUCCEEDED" and job["model_name"] == "acme-support"
    assert int(job["metrics"]["steps"]) == 3 * steps_per_epoch or job["metrics"]["stopped_early"]
    assert "eval_loss" in job["metrics"] and "base_eval_loss" in job["metrics"]
    assert job["report_path"]
    listed = [m["name"] for m in seen["models list"]["models"]]
    assert listed == ["acme-support"]

    resolved = seen["models resolve"]
    assert resolved["base_model"] == "llama-3.1-8b" and resolved["vllm_lora_module"].startswith("acme-support=")
    assert seen["models assign"]["model"]["agent_ids"] == ["helpdesk"]
    assignments = seen["models assignments"]["assignments"]
    assert [(a["agent_id"], a["model_name"]) for a in assignments] == [("helpdesk", "acme-support")]
    adapter = tmp_path / "acme-support" / "adapter_model.safetensors"
    assert hashlib.sha256(adapter.read_bytes()).hexdigest() == resolved["adapter_sha256"]
    assert "adapter_config.json" in {Path(f["path"]).name for f in seen["models download"]["files"]}
    refused = seen["models delete refused"]["error"]
    assert (refused["code"], refused.get("reason")) == ("FAILED_PRECONDITION", "MODEL_IN_USE")
    assert "helpdesk" in refused["message"]
    assert seen["models unassign"]["model"]["agent_ids"] == []
    gone = s.run(["models", "get", "acme-support"], expected=1)
    assert gone["error"]["code"] == "NOT_FOUND"

    assert seen["workspaces keys revoke"]["key"]["id"] == ci_key
    deadline = time.monotonic() + 10
    while True:  # the revoked key is refused by every service within seconds
        result = subprocess.run(s.argv(["jobs", "list"]), capture_output=True, text=True, env=s.env(ci_secret))
        if result.returncode == 1 and json.loads(result.stdout)["error"]["code"] == "UNAUTHENTICATED":
            break
        assert time.monotonic() < deadline, result.stdout
        time.sleep(0.2)
    assert s.run(["jobs", "list"])["jobs"][0]["id"] == job_id  # the session's own key still works


def watch_with_a_forced_reconnect(s: Session, up: subprocess.Popen, job_id: str) -> dict:
    watch = subprocess.Popen(s.argv(["jobs", "watch", job_id]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=s.env(), cwd=s.tmp)
    try:
        wait_for_training(s, job_id)
        os.kill(service_pid(up.pid, "job-scheduler"), signal.SIGKILL)
        out, err = watch.communicate(timeout=600)
    finally:
        if watch.poll() is None:
            watch.kill()
    assert watch.returncode == 0, (out, err)
    doc = json.loads(out)
    assert doc["state"] == "SUCCEEDED" and doc["complete"] is True
    assert doc["reconnects"] >= 1 and "reconnecting" in err, err
    history = s.run(["jobs", "events", job_id])
    assert sequences(doc) == sequences(history) == list(range(1, len(history["events"]) + 1))
    assert [e["message"] for e in doc["events"]] == [e["message"] for e in history["events"]]
    return doc


def test_watch_interrupted_and_restarted_shows_every_event_once(tmp_path, stack_up):
    """Ctrl-C during training, `jobs watch` again: it goes on after the last event the first
    showed, so the two together are the job's history exactly once, in order."""
    s = Session(tmp_path)
    s.key = s.run(["workspaces", "create", "--name", "W", "--plan", "enterprise", "--email", "w@acme.test"])["api_key"]
    time.sleep(0.5)
    s.run(["models", "make-standin", "llama-3.1-8b"])
    s.run(["data", "import", str(ROOT / "examples" / "conversations.jsonl")])
    job_id = s.run(["jobs", "create", "--name", "w", "--base-model", "llama-3.1-8b", "--topic", "billing",
                    "--topic", "returns", "--set", "max_epochs=4"])["job"]["id"]
    first = subprocess.Popen(s.argv(["jobs", "watch", job_id]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=s.env(), cwd=s.tmp)
    try:
        wait_for_training(s, job_id)
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, (out, err)
    before = json.loads(out)
    assert before["complete"] is False and before["events"], before
    assert before["state"] != "SUCCEEDED"

    second = s.run(["jobs", "watch", job_id])
    assert second["complete"] is True and second["state"] == "SUCCEEDED"
    history = s.run(["jobs", "events", job_id])
    both = sequences(before) + sequences(second)
    assert both == sequences(history) == list(range(1, len(history["events"]) + 1))  # each once, in order
    assert sequences(second)[0] == sequences(before)[-1] + 1
    # Finished: a third watch shows the whole history again (the resume point is gone).
    assert sequences(s.run(["jobs", "watch", job_id])) == sequences(history)
    checkpoints = s.run(["jobs", "checkpoints", job_id])["checkpoints"]
    assert checkpoints and int(checkpoints[-1]["step"]) == int(s.run(["jobs", "get", job_id])["metrics"]["steps"])

    # A cancelled job: `jobs cancel` answers the job, `jobs watch` ends with exit code 1.
    other = s.run(["jobs", "create", "--name", "w-cancelled", "--base-model", "llama-3.1-8b", "--topic", "billing",
                   "--topic", "returns", "--set", "max_epochs=50"])["job"]["id"]
    cancelled = s.run(["jobs", "cancel", other])
    assert cancelled["id"] == other
    watched = s.run(["jobs", "watch", other], expected=1)
    assert watched["state"] == "CANCELLED" and watched["complete"] is True
    listed = s.run(["jobs", "list"])["jobs"]
    assert [j["id"] for j in listed] == [other, job_id]  # newest first

    # `jobs create --watch` of a job that fails (one topic: fewer than min_examples): exit code 1,
    # the watch's document with the failure.
    result = subprocess.run(s.argv(["jobs", "create", "--name", "w-too-small", "--base-model", "llama-3.1-8b",
                                    "--topic", "billing", "--watch"]), capture_output=True, text=True, env=s.env(),
                            cwd=s.tmp, timeout=300)
    assert result.returncode == 1 and "error" not in result.stderr, result.stderr  # an outcome, not an error
    failed = json.loads(result.stdout)
    assert failed["state"] == "FAILED" and failed["complete"] is True
    assert "min_examples" in failed["events"][-1]["message"]
