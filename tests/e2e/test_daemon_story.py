"""Acceptance of the daemon, for real: a ``mlflow server`` over HTTP, tiny transformers BERT
bases, adapters made by ``core.training`` and by ``peft``, ``migrator run`` as a subprocess, and
the admin CLI (approvals, lineage) on the side.

The story: base v1 with three adapters (a trained LoRA-X in PEFT layout, a plain PEFT LoRA, a
LoRA-X kohya file). Three bases then claim v1's place: v2 (v1 moved 2%: transferred by policy),
a moderately related base under another name (v1 moved 30%: waits for an admin) and an
unrelated one (random init: skipped). The admin approves one pending transfer and it arrives.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import mlflow.artifacts
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from core.adapter import AdapterLayout
from core.formats import read_adapter, write_adapter
from core.selection import DEFAULT_PATTERNS
from core.training import constrain_lorax_, export_lorax, inject_lorax
from migrator.registry import Tag, VersionRef
from migrator.registry.mlflow_registry import MlflowRegistry
from tests.core.lora_models import (
    bert_inputs,
    bert_output,
    peft_adapter,
    perturbed,
    save_weights,
    shapes_of,
    tiny_bert,
    with_deltas,
)
from tests.e2e.conftest import StartDaemon
from tests.e2e.harness import (
    JobRow,
    PendingCli,
    jobs_table,
    migrator_env,
    read_jobs,
    run_cli,
    run_cli_parallel,
    wait_for,
)
from tests.fixtures.mlflow import MlflowServer
from tests.migrator.scenario import register

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.mlflow_server,
    pytest.mark.interop,
    pytest.mark.slow,
]

#: Measured ATCs (k = 8) of v1 -> v2 ~0.002, -> mid ~0.18, -> other ~0.86.
AUTO_APPROVE_ATC = 0.05
MAX_ATC = 0.5


@dataclass(frozen=True)
class BertStory:
    """Tiny BERT bases and the adapters trained on v1, as files."""

    v1: nn.Module
    v2: nn.Module
    bases: dict[str, Path]  # v1, v2, mid, other -> folder with model.safetensors
    adapters: dict[str, tuple[Path, str]]  # styleA, plainB, kohyaC -> (files, lorax.format)


def _train_lorax(model: nn.Module, steps: int, seed: int) -> list[float]:
    """A few Adam steps on the dS of the injected LoRA-X layers, toward a random target."""
    inputs = bert_inputs(seed)
    shape = bert_output(model, inputs).shape
    target = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(steps):
        optimiser.zero_grad()
        loss = nn.functional.mse_loss(model(**inputs).last_hidden_state, target)
        loss.backward()
        optimiser.step()
        constrain_lorax_(model)
        losses.append(float(loss.detach()))
    return losses


@pytest.fixture(scope="module")
def bert_story(tmp_path_factory: pytest.TempPathFactory) -> BertStory:
    root = tmp_path_factory.mktemp("bert-story")
    v1 = tiny_bert(0)
    models = {
        "v1": v1,
        "v2": perturbed(v1, eps=0.02, seed=1),
        "mid": perturbed(v1, eps=0.3, seed=5),
        "other": tiny_bert(1234),
    }
    bases = {}
    for name, model in models.items():
        save_weights(model, root / name / "model.safetensors")
        bases[name] = root / name

    trained = copy.deepcopy(v1)
    layers = inject_lorax(trained, DEFAULT_PATTERNS, rank=32)
    assert len(layers) == 8  # query, key, value, attention.output.dense in 2 layers
    losses = _train_lorax(trained, steps=8, seed=3)
    assert losses[-1] < losses[0], f"LoRA-X training did not learn: {losses}"
    write_adapter(export_lorax(trained), root / "styleA")
    _train_lorax(trained, steps=4, seed=4)  # a second, different LoRA-X for the kohya file
    (root / "kohyaC").mkdir()
    write_adapter(
        export_lorax(trained, layout=AdapterLayout.KOHYA),
        root / "kohyaC" / "style.safetensors",
    )
    peft_adapter(v1, root / "plainB", targets=["query", "key", "value"], r=4, alpha=8, seed=2)
    return BertStory(
        v1=v1,
        v2=models["v2"],
        bases=bases,
        adapters={
            "styleA": (root / "styleA", "lorax"),
            "plainB": (root / "plainB", "lora"),
            "kohyaC": (root / "kohyaC", "lorax"),
        },
    )


def _by_target(jobs: list[JobRow]) -> dict[str, dict[str, JobRow]]:
    out: dict[str, dict[str, JobRow]] = {}
    for job in jobs:
        out.setdefault(job.target_base, {})[job.adapter] = job
    return out


def _peft_folder(registry: MlflowRegistry, ref: VersionRef, dst: Path) -> Path:
    local = registry.download(ref, dst)
    return next(p.parent for p in local.rglob("adapter_config.json"))


def test_daemon_moves_adapters_and_waits_for_an_admin(
    bert_story: BertStory,
    mlflow_server: MlflowServer,
    server_registry: MlflowRegistry,
    unique: str,
    start_daemon: StartDaemon,
    tmp_path: Path,
) -> None:
    registry = server_registry
    base = f"{unique}-enc"
    database = f"sqlite:///{tmp_path / 'jobs.db'}"
    env = migrator_env(
        data_dir=tmp_path / "data",
        tracking_uri=mlflow_server.url,
        database_url=database,
        auto_approve_atc=AUTO_APPROVE_ATC,
        max_atc=MAX_ATC,
    )
    daemon = start_daemon(env, "daemon")  # it starts up while the registry fills

    v1 = register(registry, base, bert_story.bases["v1"], {Tag.ROLE: "base"})
    sources: dict[str, VersionRef] = {}
    for name, (files, fmt) in bert_story.adapters.items():
        sources[name] = register(
            registry,
            f"{unique}-{name}",
            files,
            {Tag.ROLE: "adapter", Tag.BASE: str(v1), Tag.FORMAT: fmt},
        )

    # New bases appear while the daemon watches.
    v2 = register(registry, base, bert_story.bases["v2"], {Tag.ROLE: "base"})
    mid = register(
        registry,
        f"{unique}-mid",
        bert_story.bases["mid"],
        {Tag.ROLE: "base", Tag.SUPERSEDES: str(v1)},
    )
    other = register(
        registry,
        f"{unique}-other",
        bert_story.bases["other"],
        {Tag.ROLE: "base", Tag.SUPERSEDES: str(v1)},
    )
    assert v2 == VersionRef(base, "2")

    def context() -> str:
        return f"{daemon.tail()}\n--- jobs ---\n{jobs_table(database)}"

    def settled() -> bool:
        jobs = _by_target(read_jobs(database))
        return (
            all(len(jobs.get(str(t), {})) == 3 for t in (v2, mid, other))
            and all(j.status == "succeeded" for j in jobs[str(v2)].values())
            and all(j.status == "pending_approval" for j in jobs[str(mid)].values())
            and all(j.status == "skipped" for j in jobs[str(other)].values())
        )

    wait_for(
        settled,
        timeout_s=150,
        what="3 transfers to v2 registered, 3 to mid pending, 3 to other skipped",
        context=context,
        watch=[daemon],
    )
    assert daemon.alive, context()
    jobs = _by_target(read_jobs(database))
    refs = {name: str(ref) for name, ref in sources.items()}

    # The policy decided on the ATC of each base pair.
    for job in jobs[str(v2)].values():
        assert job.atc is not None and job.atc <= AUTO_APPROVE_ATC, job
    for job in jobs[str(mid)].values():
        assert job.atc is not None and AUTO_APPROVE_ATC < job.atc <= MAX_ATC, job
    for job in jobs[str(other)].values():
        assert job.atc is not None and job.atc > MAX_ATC, job
        assert job.result_ref is None
    assert registry.get_version(v1).tags.get(Tag.DEPRECATED) == "true"

    # The related-base transfers are new adapter versions with lineage tags and their runs.
    client: MlflowClient = registry.client
    results: dict[str, VersionRef] = {}
    for name, source in refs.items():
        job = jobs[str(v2)][source]
        assert job.result_ref is not None, context()
        new = registry.get_version(VersionRef.parse(job.result_ref))
        results[name] = new.ref
        assert new.name == f"{unique}-{name}" and new.version == "2"
        assert new.tags[Tag.ROLE] == "adapter"
        assert new.tags[Tag.BASE] == str(v2)
        assert new.tags[Tag.TRANSFERRED_FROM] == source
        assert new.tags[Tag.JOB] == str(job.id)
        assert float(new.tags[Tag.ATC]) == pytest.approx(job.atc, abs=1e-4)
        assert new.tags[Tag.APPROVED_BY] == "policy"
        assert new.tags[Tag.FORMAT] == bert_story.adapters[name][1]
        assert f"#/models/{unique}-{name}/versions/1" in new.description
        assert new.run_id is not None and new.run_id == job.mlflow_run_id
        run = client.get_run(new.run_id)
        assert run.data.metrics["atc"] == pytest.approx(job.atc, abs=1e-6)
        assert run.data.metrics["modules_transferred"] > 0
        assert 0.5 < run.data.metrics["energy_retained"] <= 1.5
        top = {a.path for a in client.list_artifacts(new.run_id)}
        assert {"adapter", "module_map.json", "similarity.png"} <= top, top
        stored = {a.path for a in client.list_artifacts(new.run_id, "adapter")}
        assert any(f.endswith(".safetensors") for f in stored), stored
        if name != "kohyaC":
            assert "adapter/adapter_config.json" in stored, stored
    run_dir = tmp_path / "run-artifacts"
    module_map = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=registry.get_version(results["styleA"]).run_id,
                artifact_path="module_map.json",
                dst_path=str(run_dir),
                tracking_uri=mlflow_server.url,
            )
        ).read_text()
    )
    assert len(module_map) == 8 and all("target" in m for m in module_map), module_map
    png = mlflow.artifacts.download_artifacts(
        run_id=registry.get_version(results["styleA"]).run_id,
        artifact_path="similarity.png",
        dst_path=str(run_dir),
        tracking_uri=mlflow_server.url,
    )
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The admin sees the pending transfers and approves one; lineage of a v2 transfer.
    listed, lineage_v2 = run_cli_parallel(
        [
            (["approvals", "list", "--json"], env),
            (["lineage", str(results["plainB"]), "--json"], env),
        ]
    )
    assert listed.returncode == 0, listed.describe()
    pending = listed.json()
    assert {(p["adapter"], p["target_base"]) for p in pending} == {
        (source, str(mid)) for source in refs.values()
    }, pending
    assert all(p["status"] == "pending_approval" for p in pending)
    assert lineage_v2.returncode == 0, lineage_v2.describe()
    doc = lineage_v2.json()
    assert doc["version"] == str(results["plainB"]) and doc["base"] == str(v2)
    assert [a["version"] for a in doc["ancestors"]] == [refs["plainB"]], doc

    chosen = next(p for p in pending if p["adapter"] == refs["styleA"])
    approved = run_cli(["approvals", "approve", str(chosen["id"]), "--by", "alice", "--json"], env)
    assert approved.returncode == 0, approved.describe()
    assert approved.json()["status"] == "approved"
    assert approved.json()["id"] == chosen["id"]

    def arrived() -> bool:
        job = next(j for j in read_jobs(database) if j.id == chosen["id"])
        return job.status == "succeeded"

    wait_for(
        arrived,
        timeout_s=60,
        what="the approved transfer to arrive",
        context=context,
        watch=[daemon],
    )
    job = next(j for j in read_jobs(database) if j.id == chosen["id"])
    assert job.result_ref is not None
    on_mid = registry.get_version(VersionRef.parse(job.result_ref))
    assert on_mid.ref == VersionRef(f"{unique}-styleA", "3")
    assert on_mid.tags[Tag.BASE] == str(mid)
    assert on_mid.tags[Tag.APPROVED_BY] == "alice"
    assert on_mid.tags[Tag.TRANSFERRED_FROM] == refs["styleA"]
    # The other pending transfers still wait: approving one approves nothing else.
    still = _by_target(read_jobs(database))[str(mid)]
    assert sorted(j.status for j in still.values()) == [
        "pending_approval",
        "pending_approval",
        "succeeded",
    ]

    pending_lineage = PendingCli(["lineage", str(on_mid.ref), "--json"], env)

    # The transferred PEFT adapters load in peft on the v2 model, and give v2 + their dW.
    from peft import PeftModel

    inputs = bert_inputs(7)
    plain_v2 = bert_output(bert_story.v2, inputs)
    for name in ("styleA", "plainB"):
        folder = _peft_folder(registry, results[name], tmp_path / "peft" / name)
        moved = read_adapter(folder, base_modules=shapes_of(bert_story.v2))
        assert len(moved.modules) in (6, 8), sorted(moved.modules)
        deltas = {n: m.delta() for n, m in moved.modules.items()}
        expected = bert_output(with_deltas(bert_story.v2, deltas), inputs)
        assert not torch.allclose(expected, plain_v2, atol=1e-4), name
        loaded = PeftModel.from_pretrained(copy.deepcopy(bert_story.v2), str(folder)).eval()
        torch.testing.assert_close(bert_output(loaded, inputs), expected, rtol=0, atol=1e-5)

    lineage = pending_lineage.result()
    assert lineage.returncode == 0, lineage.describe()
    chain = lineage.json()
    assert chain["version"] == str(on_mid.ref) and chain["base"] == str(mid)
    assert chain["origin"] == "transferred"
    assert {"version": refs["styleA"], "base": str(v1), "depth": 1} in chain["ancestors"], chain

    assert daemon.alive, context()
    code = daemon.terminate(timeout_s=60)
    assert code == 0, context()
    log = daemon.text()
    assert "pass failed" not in log, daemon.tail(200)
    assert "daemon stopped" in log, daemon.tail()
