"""Each `tuneforge models|datasets|data|workspaces` command as a script runs it: a real stack
(nats-server, five service processes), one SFT job on a Llama stand-in for the whole module, the
CLI in subprocesses with `--json`. Each command's document must be the only thing on stdout and
match what the RPC itself answers; tables are checked for their headers and rows; exit codes 1
(refused / not found), 2 (usage) and 3 (no stack)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
from tuneforge.cli.common import message_dict
from tuneforge.core.client import Clients
from tuneforge.plugins import get_registry
from tuneforge.quickstart import BASE_MODEL, run_job
from tuneforge.stack import Stack
from tuneforge.trainer.standin import make_standin

pytestmark = pytest.mark.integration
NAME = "cli-commands-bot"


class Env:
    """The module's stack: its data directory, the workspace's API key, its endpoints, the job."""

    def __init__(self, data_dir: Path, key: str, endpoints: dict[str, str], admin_token: str, outcome):
        self.data_dir, self.key, self.endpoints, self.admin_token, self.outcome = (
            data_dir, key, endpoints, admin_token, outcome)

    def rpc(self, call, token: str | None = None):
        """What the service answers (the truth a command's output is checked against)."""
        async def go():
            async with Clients.connect(self.endpoints, token or self.key) as clients:
                return await call(clients)

        return asyncio.run(go())


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-commands")
    store = root / "models"
    make_standin(get_registry().base_model(BASE_MODEL), store)
    data_dir = root / "state"
    with Stack(data_dir, extra_env={"TUNEFORGE_MODEL_STORE": str(store)}) as stack:
        outcome = asyncio.run(run_job(
            stack.endpoints, stack.admin_token, topics=["billing"], job_name=NAME,
            hyperparameters=common_pb2.Hyperparameters(max_epochs=1, n_evals=1, learning_rate=1e-3, min_examples=100),
        ))
        assert outcome.job.state == js.JOB_STATE_SUCCEEDED, outcome.job.failure_reason
        yield Env(data_dir, outcome.api_key, dict(stack.endpoints), stack.admin_token, outcome)


def tuneforge(env: Env | None, *args: str, key: str | None = None, data_dir: Path | None = None):
    environ = {k: v for k, v in os.environ.items() if k not in ("TUNEFORGE_ADMIN_TOKEN", "TUNEFORGE_DEBUG")}
    environ["TUNEFORGE_API_KEY"] = key or (env.key if env else "tfk_unused")
    target = data_dir or env.data_dir
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", "--data-dir", str(target), *args],
                          capture_output=True, text=True, env=environ, timeout=300, check=False)


def as_json(env: Env | None, *args: str, code: int = 0, **kwargs) -> dict:
    """Run a command with --json: exit code ``code`` and exactly one JSON document on stdout."""
    result = tuneforge(env, *args, "--json", **kwargs)
    assert result.returncode == code, (args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)  # refuses anything besides the one document


def rows(stdout: str) -> list[list[str]]:
    """A table's lines split on runs of two or more spaces (cells hold single spaces)."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in stdout.strip().splitlines()]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- workspaces ---------------------------------------------------------------------------------

def test_workspaces_get_create_and_keys(env):
    doc = as_json(env, "workspaces", "get")
    truth = env.rpc(lambda c: c.job_scheduler.GetWorkspace(js.GetWorkspaceRequest()))
    assert doc == message_dict(truth) and doc["workspace"]["id"] == env.outcome.workspace_id
    assert doc["workspace"]["plan"] == "PLAN_ENTERPRISE"
    human = tuneforge(env, "workspaces", "get")
    assert human.returncode == 0 and f"workspace {env.outcome.workspace_id}" in human.stdout
    assert "plan   enterprise" in human.stdout

    # create takes the administrator token (the data directory's admin_token file)
    created = as_json(env, "workspaces", "create", "--name", "Second", "--plan", "pro", "--email", "two@example.com")
    assert created["api_key"].startswith("tfk_") and created["workspace"]["plan"] == "PLAN_PRO"
    assert created["workspace"]["owner_email"] == "two@example.com"

    key = as_json(env, "workspaces", "keys", "create", "--label", "ci")
    assert key["api_key"].startswith(key["key"]["prefix"]) and key["key"]["label"] == "ci"
    listed = as_json(env, "workspaces", "keys", "list")
    truth = env.rpc(lambda c: c.job_scheduler.ListApiKeys(js.ListApiKeysRequest()))
    assert listed == message_dict(truth) and key["key"]["id"] in [k["id"] for k in listed["keys"]]
    assert key["api_key"] not in json.dumps(listed)  # never the secret
    table = rows(tuneforge(env, "workspaces", "keys", "list").stdout)
    assert table[0] == ["ID", "PREFIX", "CREATED (UTC)", "LABEL"]
    assert [key["key"]["id"], key["key"]["prefix"]] == table[-1][:2] and table[-1][-1] == "ci"
    revoked = as_json(env, "workspaces", "keys", "revoke", key["key"]["id"])
    assert revoked["key"]["id"] == key["key"]["id"]
    after = env.rpc(lambda c: c.job_scheduler.ListApiKeys(js.ListApiKeysRequest()))
    assert key["key"]["id"] not in [k.id for k in after.keys]
    # the workspace's last key: refused by the server, exit code 1, the error as the document
    other = as_json(env, "workspaces", "keys", "list", key=created["api_key"], code=0)
    error = as_json(env, "workspaces", "keys", "revoke", other["keys"][0]["id"], key=created["api_key"], code=1)
    assert error["error"]["code"] == "FAILED_PRECONDITION" and "last API key" in error["error"]["message"]


# --- data ---------------------------------------------------------------------------------------

def _conversation(n: int) -> str:
    return json.dumps({"messages": [{"role": "user", "content": f"CLI test question number {n}?"},
                                    {"role": "assistant", "content": f"CLI test answer number {n}."}]})


def test_data_import_topics_list_delete(env, tmp_path):
    path = tmp_path / "extra.jsonl"
    path.write_text(_conversation(1) + "\n" + _conversation(2) + "\n" + '{"messages": []}\n')
    imported = as_json(env, "data", "import", str(path), "--topic", "cli-extra", code=1)  # one line rejected
    assert (int(imported["lines_read"]), int(imported["imported"]), int(imported["rejected"])) == (3, 2, 1)
    assert imported["errors"][0]["line"] == "3"

    topics = as_json(env, "data", "topics")
    truth = env.rpc(lambda c: c.dataset_builder.ListTopics(dsb.ListTopicsRequest()))
    assert topics == message_dict(truth)
    assert {t["topic"]: t["example_count"] for t in topics["topics"]}["cli-extra"] == "2"
    table = rows(tuneforge(env, "data", "topics").stdout)
    assert table[0] == ["TOPIC", "EXAMPLES", "FORMATS"] and ["cli-extra", "2", "conversation 2"] in table

    listed = as_json(env, "data", "list", "--topic", "cli-extra")
    truth = env.rpc(lambda c: c.dataset_builder.ListExamples(dsb.ListExamplesRequest(topic="cli-extra")))
    assert [e["example_id"] for e in listed["examples"]] == [e.example_id for e in truth.examples]
    assert len(listed["examples"]) == 2 and listed["next_page_token"] == ""
    one = tuneforge(env, "data", "list", "--topic", "cli-extra", "--limit", "1")  # a page and the hint
    table = rows(one.stdout)
    assert table[0] == ["ID", "FORMAT", "TOPICS", "HASH"] and len(table) == 2
    assert table[1][:3] == [truth.examples[0].example_id, "conversation", "cli-extra"]
    assert table[1][3] == truth.examples[0].content_hash[:12]
    assert one.stderr.startswith("more: tuneforge data list --topic cli-extra --limit 1 --page-token ")
    every = as_json(env, "data", "list", "--topic", "cli-extra", "--limit", "1", "--all")
    assert [e["example_id"] for e in every["examples"]] == [e.example_id for e in truth.examples]

    assert tuneforge(env, "data", "delete").returncode == 2  # neither --id nor --topic
    first = truth.examples[0].example_id
    assert as_json(env, "data", "delete", "--id", first) == {"deleted": "1"}
    assert tuneforge(env, "data", "delete", "--topic", "cli-extra").stdout.strip() == "deleted 1 example"
    left = env.rpc(lambda c: c.dataset_builder.ListExamples(dsb.ListExamplesRequest(topic="cli-extra")))
    assert list(left.examples) == []


# --- datasets -----------------------------------------------------------------------------------

def test_datasets_build_get_list_download(env, tmp_path):
    built = as_json(env, "datasets", "build", "--base-model", BASE_MODEL, "--topic", "returns")
    summary = built["dataset"]
    assert (int(summary["train_count"]), int(summary["test_count"])) == (112, 13)
    assert summary["topic_counts"] == {"returns": "125"}
    dataset_id = summary["dataset_id"]

    got = as_json(env, "datasets", "get", dataset_id)
    truth = env.rpc(lambda c: c.dataset_builder.GetDataset(dsb.GetDatasetRequest(dataset_id=dataset_id)))
    assert got == message_dict(truth)
    human = tuneforge(env, "datasets", "get", dataset_id).stdout
    d = truth.dataset
    assert human.startswith(f"dataset {dataset_id}: conversations")
    assert (f"{d.workspace_example_count} in the workspace → {d.topic_matched_count} with the topics → "
            f"{d.filtered_count} of the format → {d.deduplicated_count} after dedupe") in human
    assert "112 train + 13 test" in human
    if d.HasField("train_tokens"):
        assert f"tokens      train: {d.train_tokens.total} in 112 examples" in human

    listed = as_json(env, "datasets", "list")
    ids = [e["dataset"]["dataset_id"] for e in listed["datasets"]]
    assert dataset_id in ids and env.outcome.model.dataset.dataset_id in ids
    truth_list = env.rpc(lambda c: c.dataset_builder.ListDatasets(dsb.ListDatasetsRequest()))
    assert listed == message_dict(truth_list)
    table = rows(tuneforge(env, "datasets", "list").stdout)
    assert table[0] == ["ID", "TRAIN", "TEST", "KIND", "TOPICS", "CREATED"]
    assert [dataset_id, "112", "13", "conversations", "returns=125"] == next(r for r in table if r[0] == dataset_id)[:5]

    out = tmp_path / "dataset"
    downloaded = as_json(env, "datasets", "download", dataset_id, str(out))
    assert downloaded["dir"] == str(out.resolve()) and downloaded["dataset_id"] == dataset_id
    assert sorted((f["path"], int(f["size_bytes"]), f["sha256"]) for f in downloaded["files"]) == sorted(
        (f.path, f.size_bytes, f.sha256) for f in truth.files)
    assert all(sha256(out / f["path"]) == f["sha256"] for f in downloaded["files"])
    assert len((out / "test.jsonl").read_text().splitlines()) == 13

    missing = as_json(env, "datasets", "get", "ds_0000000000000000", code=1)
    assert missing["error"]["code"] == "NOT_FOUND"


# --- models -------------------------------------------------------------------------------------

def test_models_catalog_list_get_resolve(env):
    catalog = as_json(env, "models", "catalog")
    truth = env.rpc(lambda c: c.job_scheduler.ListBaseModels(js.ListBaseModelsRequest()))
    assert catalog == message_dict(truth) and BASE_MODEL in [m["id"] for m in catalog["base_models"]]

    listed = as_json(env, "models", "list")
    model = env.outcome.model
    assert [m["name"] for m in listed["models"]] == [NAME] and listed["base_models"] == []
    assert listed["models"][0]["id"] == model.id
    assert [m["name"] for m in as_json(env, "models", "list", "--base-model", BASE_MODEL, "--method", "sft")["models"]] == [NAME]
    assert as_json(env, "models", "list", "--base-model", "qwen-2.5-14b")["models"] == []
    assert as_json(env, "models", "list", "--method", "dpo")["models"] == []
    with_catalog = as_json(env, "models", "list", "--catalog", "--base-model", BASE_MODEL)
    assert [m["id"] for m in with_catalog["base_models"]] == [BASE_MODEL]
    table = rows(tuneforge(env, "models", "list").stdout)
    assert table[0] == ["NAME", "ID", "BASE", "METHOD", "EVAL LOSS (VS BASE)", "AGENTS", "CREATED"]
    assert table[1][:4] == [NAME, model.id, BASE_MODEL, "sft"]
    assert table[1][4].startswith(f"{model.metrics.eval_loss:.4f}") and table[1][5] == "-"

    got = as_json(env, "models", "get", NAME)
    truth = env.rpc(lambda c: c.model_registry.GetModel(mr.GetModelRequest(model=NAME)))
    assert got == message_dict(truth.model)

    resolved = as_json(env, "models", "resolve", NAME)
    truth = env.rpc(lambda c: c.model_registry.ResolveModel(mr.ResolveModelRequest(name=NAME)))
    assert resolved == message_dict(truth) and resolved["model_id"] == model.id
    human = tuneforge(env, "models", "resolve", NAME).stdout
    assert any(line.split() == ["model_id:", model.id] for line in human.splitlines())
    assert any(line.split() == ["adapter_sha256:", truth.adapter_sha256] for line in human.splitlines())

    missing = as_json(env, "models", "resolve", "no-such-model", code=1)
    assert missing["error"]["code"] == "NOT_FOUND"


def test_models_assign_download_delete(env, tmp_path):
    model = env.outcome.model
    assigned = as_json(env, "models", "assign", NAME, "--agent", "agent-support")
    assert assigned["model"]["agent_ids"] == ["agent-support"]
    line = tuneforge(env, "models", "assign", NAME, "--agent", "agent-billing").stdout
    assert line.startswith(f"agent agent-billing uses {NAME} ({model.id})")
    assert tuneforge(env, "models", "assign", NAME).returncode == 2  # --agent is required

    assignments = as_json(env, "models", "assignments")
    truth = env.rpc(lambda c: c.model_registry.ListAssignments(mr.ListAssignmentsRequest()))
    assert assignments == message_dict(truth)
    assert sorted(a["agent_id"] for a in assignments["assignments"]) == ["agent-billing", "agent-support"]
    assert [a["agent_id"] for a in as_json(env, "models", "assignments", "--agent", "agent-billing")["assignments"]] == [
        "agent-billing"]
    table = rows(tuneforge(env, "models", "assignments", "--model", NAME).stdout)
    assert table[0] == ["AGENT", "MODEL", "MODEL ID", "BASE", "SINCE"]
    assert sorted(r[:4] for r in table[1:]) == [["agent-billing", NAME, model.id, BASE_MODEL],
                                                ["agent-support", NAME, model.id, BASE_MODEL]]
    by_agent = as_json(env, "models", "list", "--agent", "agent-support")
    assert [m["name"] for m in by_agent["models"]] == [NAME]
    assert as_json(env, "models", "list", "--agent", "agent-nobody")["models"] == []

    out = tmp_path / "adapter"
    downloaded = as_json(env, "models", "download", NAME, str(out))
    assert sorted((f["path"], int(f["size_bytes"]), f["sha256"]) for f in downloaded["files"]) == sorted(
        (f.path, f.size_bytes, f.sha256) for f in model.files)
    assert all(sha256(out / f["path"]) == f["sha256"] for f in downloaded["files"])
    human = tuneforge(env, "models", "download", NAME, str(tmp_path / "again"))
    assert rows(human.stdout)[0] == ["PATH", "SIZE", "SHA256"]
    assert human.stdout.strip().splitlines()[-1].startswith(f"{len(model.files)} files, ")

    refused = tuneforge(env, "models", "delete", NAME)  # assigned: the server's refusal, exit code 1
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("tuneforge: error: FAILED_PRECONDITION: ") and "agent-support" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    error = as_json(env, "models", "delete", NAME, code=1)
    assert error["error"]["code"] == "FAILED_PRECONDITION" and error["error"].get("reason") == "MODEL_IN_USE"

    unassigned = as_json(env, "models", "unassign", NAME, "--agent", "agent-support")
    assert unassigned["model"]["agent_ids"] == ["agent-billing"]
    assert tuneforge(env, "models", "unassign", NAME, "--agent", "agent-billing").returncode == 0
    assert env.rpc(lambda c: c.model_registry.ListAssignments(mr.ListAssignmentsRequest())).assignments == []

    deleted = as_json(env, "models", "delete", NAME)
    assert deleted["deleted"]["id"] == model.id and deleted["deleted"]["name"] == NAME
    gone = tuneforge(env, "models", "get", NAME)
    assert gone.returncode == 1 and gone.stderr.startswith("tuneforge: error: NOT_FOUND")
    assert as_json(env, "models", "list")["models"] == []


# --- exit codes without a stack, bad usage ---------------------------------------------------------

COMMANDS = [
    ("models", "catalog"), ("models", "list"), ("models", "get", "m"), ("models", "resolve", "m"),
    ("models", "assign", "m", "--agent", "a"), ("models", "unassign", "m", "--agent", "a"),
    ("models", "assignments"), ("models", "download", "m", "out"), ("models", "delete", "m"),
    ("datasets", "get", "ds_1"), ("datasets", "list"), ("datasets", "download", "ds_1", "out"),
    ("datasets", "build", "--base-model", BASE_MODEL),
    ("data", "topics"), ("data", "list"), ("data", "delete", "--topic", "t"),
    ("workspaces", "get"), ("workspaces", "create", "--name", "x", "--plan", "pro", "--email", "a@b.io"),
    ("workspaces", "keys", "list"), ("workspaces", "keys", "create"), ("workspaces", "keys", "revoke", "key_1"),
]


def in_process(capsys, *argv: str) -> tuple[int, str, str]:
    """``tuneforge ARGV`` in this process (the sweeps below would take a minute as subprocesses)."""
    from tuneforge import cli

    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_stack(tmp_path, monkeypatch):
    """An empty data directory (main() sets $TUNEFORGE_DATA_DIR: restored afterwards)."""
    monkeypatch.setenv("TUNEFORGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TUNEFORGE_API_KEY", "tfk_unused")
    monkeypatch.delenv("TUNEFORGE_ADMIN_TOKEN", raising=False)
    return tmp_path


def test_no_stack_is_exit_code_3_with_an_error_document(no_stack, capsys):
    for command in COMMANDS:
        code, out, err = in_process(capsys, "--data-dir", str(no_stack), *command, "--json")
        assert code == 3, (command, out, err)
        doc = json.loads(out)
        assert doc["error"]["code"] == "UNAVAILABLE" and "tuneforge up" in doc["error"]["message"], command
        assert err.startswith("tuneforge: error: no tuneforge stack") and len(err.strip().splitlines()) == 1
    assert not (no_stack / "admin_token").exists()  # workspaces create looked for the stack first
    plain = tuneforge(None, "models", "list", data_dir=no_stack)  # and once as a user runs it
    assert plain.returncode == 3 and plain.stdout == "" and len(plain.stderr.strip().splitlines()) == 1


def test_bad_usage_is_exit_code_2(no_stack, capsys):
    for args in (("models", "list", "--limit", "0"), ("data", "list", "--limit", "500"),
                 ("datasets", "list", "--limit", "-1"), ("data", "delete"),
                 ("models", "make-standin", "gpt-5")):
        code, out, err = in_process(capsys, "--data-dir", str(no_stack), *args, "--json")
        assert code == 2 and json.loads(out)["error"]["code"] == "USAGE", (args, out, err)
        assert err.startswith("tuneforge: error: ") and len(err.strip().splitlines()) == 1
    for args in (("models", "assign", "m"), ("models", "download", "m"), ("datasets", "list", "--limit", "x"),
                 ("models", "assign", "m", "--agent", "a", "--replace=yes")):
        code, out, err = in_process(capsys, "--data-dir", str(no_stack), *args)
        assert code == 2 and err.startswith("tuneforge: error: ") and out == "", (args, err)
