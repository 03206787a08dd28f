"""One-shot federated expert collection (`flexmore.federated`, `flexmore federate`).

The world: a tiny 1-expert public model, a second public model that differs (another seed), and three
owners whose data files hold a secret sentence. Most server tests run `run_server` against `LocalGrid`,
an in-process Flower Grid whose nodes answer with `owner_reply` at once (real flwr Messages, no engine),
so tampered uploads can be injected; the Flower engines themselves run once each: the simulation (through
the CLI, real training) and the loopback deployment (real SuperLink and SuperNode processes).

Properties checked:
  simulation   3 owners -> a mixture `load_model` loads with 4 experts [public, owners...], shared tensors
               the public model's bit for bit, ranks as compressed, bytes reported;
  equivalence  the federated mixture equals `flexmore merge` of the owners' own 2-expert checkpoints,
               bit for bit (full uploads);
  privacy      an owner's answer holds exactly expert 1's tensors + router rows (float, architecture
               shapes) and the metadata keys owner/rank/public_hash/bytes; no integer arrays, no string
               but the owner's name and the public hash, none of the data's bytes; a training failure
               travels as its exception type only;
  rejections   another public model (owner refuses; forged hash), a wrong shape, NaN, an extra tensor:
               each error names the owner; with allow_missing the rest is assembled and the rejected
               owner reported, without it nothing is written;
  compression  rank:R uploads cost exactly L(3R(H+I)+H) floats, less than a full upload, are the optimal
               rank-R truncation, and energy:F picks the smallest pooled rank reaching F;
  deployment   SuperLink + 2 SuperNodes on 127.0.0.1 produce the mixture and leave no process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # read when flwr is imported: no usage pings from tests
pytest.importorskip("flwr", reason="needs the federated extra (flwr[simulation])")

from flwr.app import ConfigRecord, Message, MessageType  # noqa: E402

from flexmore.checkpoint import CheckpointReader, CheckpointWriter  # noqa: E402
from flexmore.convert import load_model  # noqa: E402
from flexmore.errors import FlexmoreError  # noqa: E402
from flexmore.experts import PROJECTIONS  # noqa: E402
from flexmore.federated import app as fed  # noqa: E402
from flexmore.federated.run import run_federation_deployment  # noqa: E402
from flexmore.merge import merge_experts  # noqa: E402
from flexmore.tiny import build_flexolmo, tiny_flexolmo_config  # noqa: E402
from tests.test_cli import assert_one_error_line, flexmore, leftovers  # noqa: E402, F401  (fixture)

H, I, L = 32, 64, 2
OWNERS = ("math", "code", "chat")
SECRET = "the vault code of {owner} is 7-4-1-9 zebra orchid"
TRAIN = {"steps": 2, "batch_size": 2, "seq_len": 32, "lr": 1e-2, "warmup_steps": 1, "checkpoint_every": 0}


@dataclass(frozen=True)
class World:
    root: Path
    public: Path
    other_public: Path  # same architecture, other weights: "another public model"
    data: dict[str, Path]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tokenizer) -> World:
    root = tmp_path_factory.mktemp("federation")
    config = tiny_flexolmo_config(vocab_size=len(tokenizer), num_experts=1, num_experts_per_tok=1)
    paths = {}
    for name, seed in (("public", 0), ("other-public", 1)):
        paths[name] = root / name
        build_flexolmo(config, seed=seed).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    data = {}
    for owner in OWNERS:
        data[owner] = root / f"{owner}.jsonl"
        docs = [f"{SECRET.format(owner=owner)}; note {i} about {owner} and more {owner} text" for i in range(12)]
        data[owner].write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    return World(root, paths["public"], paths["other-public"], data)


def fake_trainer(public, data_paths, out_dir, hyperparameters, owner, device=None) -> Path:
    """What training leaves behind, in milliseconds: the 2-expert model with expert 1 and row 1 moved."""
    from flexmore.training.data import load_public
    from flexmore.training.expert import build_two_expert, export_expert

    pub = load_public(public)
    g = torch.Generator().manual_seed(zlib.crc32(owner.encode()) + int(hyperparameters.get("seed", 0)))
    model = build_two_expert(pub, int(hyperparameters.get("rank", 0)), torch.randn(pub.hidden_size, generator=g), owner)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts.1." in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return export_expert(model, pub, Path(out_dir), None, {"operation": "fake-train"}, overwrite=False)


def keeping(keep: Path, train_fn=fake_trainer):
    """A trainer that also leaves a copy of each owner's checkpoint in keep/OWNER (the test's oracle)."""

    def train(public, data_paths, out_dir, hyperparameters, owner, device=None):
        out = train_fn(public, data_paths, out_dir, hyperparameters, owner, device)
        shutil.copytree(out, keep / owner)
        return out

    return train


@pytest.fixture(autouse=True)
def task_identity():
    """What a Flower runtime sets before a ServerApp builds Messages (LocalGrid runs outside any runtime)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


class LocalGrid:
    """A Flower Grid in this process: each pushed message is answered at once by its node's function."""

    def __init__(self, nodes: dict[int, Callable[[Message], Message]]):
        self.nodes = nodes
        self.replies: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid4().hex  # what the SuperLink does
            self.replies[message.metadata.message_id] = self.nodes[message.metadata.dst_node_id](message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]


def owner_node(world: World, owner: str, train_fn=fake_trainer, public: Path | None = None,
               tamper: Callable[[Message], None] | None = None) -> Callable[[Message], Message]:
    setup = fed.OwnerSetup(owner=owner, data_paths=(str(world.data[owner]),), public=str(public or world.public))

    def answer(message: Message) -> Message:
        reply = fed.owner_reply(message, setup, train_fn)
        if tamper is not None:
            tamper(reply)
        return reply

    return answer


def settings(world: World, out: Path, **kw) -> fed.FederationSettings:
    return fed.FederationSettings(**{"public": str(world.public), "out": str(out), "owners": list(OWNERS),
                                     "node_timeout": 1.0, "train": {"seed": 3}, **kw})


def tensors(path: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return {name: reader.get(name) for name in reader.keys()}


# --------------------------------------------------------------------------------------------------
# (a) simulation, through the CLI, with real training


def test_simulation_with_three_owners_via_cli(flexmore, world: World, tmp_path: Path) -> None:
    out = tmp_path / "mixture"
    owners = [f"--owner={o}={world.data[o]}" for o in OWNERS]
    result = flexmore("federate", world.public, out, *owners, "--simulation", "--compress", "rank:4", "--steps", 2,
                      "--batch-size", 2, "--seq-len", 32, "--lr", 1e-2, "--warmup-steps", 1, "--num-cpus", 2)
    assert result.code == 0, result.err[-3000:]
    model = load_model(out)
    assert model.config.expert_names == ["public", *OWNERS]
    assert model.config.expert_ranks == [0, 4, 4, 4]
    logits = model(input_ids=torch.tensor([[5, 17, 42, 7]])).logits
    assert torch.isfinite(logits).all()
    public, mixed = tensors(world.public), tensors(out)
    for name, value in public.items():
        if name.endswith("mlp.gate.weight"):
            assert torch.equal(mixed[name][0], value[0]), name  # row 0 is the public router row
        else:
            assert torch.equal(mixed[name], value), name  # shared tensors and expert 0
    for e in (1, 2, 3):  # training moved every owner's expert
        assert mixed[f"model.layers.0.mlp.experts.{e}.gate_proj_b.weight"].abs().sum() > 0
    summary = json.loads(fed.summary_path(out).read_text())
    assert list(summary["owners"]) == list(OWNERS)
    low_rank_bytes = L * (3 * 4 * (H + I) + H) * 4
    assert all(x["bytes"] == low_rank_bytes and x["rank"] == 4 for x in summary["owners"].values())
    assert summary["full_expert_bytes"] == L * (3 * H * I + H) * 4
    assert summary["rejected"] == {} and summary["missing"] == []


# --------------------------------------------------------------------------------------------------
# Equivalence with `flexmore merge`


def test_federation_equals_merge_of_the_owners_checkpoints(world: World, tmp_path: Path) -> None:
    keep = tmp_path / "kept"
    keep.mkdir()
    train = keeping(keep)
    grid = LocalGrid({10 + i: owner_node(world, o, train) for i, o in enumerate(OWNERS)})
    out = tmp_path / "mixture"
    result = fed.run_server(grid, settings(world, out))
    merged = merge_experts(tmp_path / "merged", [world.public, *(keep / o for o in OWNERS)], names=list(OWNERS))
    assert merged.target == "flexolmo"
    a, b = tensors(out), tensors(tmp_path / "merged")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert json.loads((out / "config.json").read_text())["model_type"] == "flex_olmo"
    assert result.summary["owners"]["code"]["bytes"] == result.summary["full_expert_bytes"]
    meta = json.loads((out / "flexmore.json").read_text())
    assert meta["operation"] == "federate" and meta["expert_names"] == ["public", *OWNERS]
    assert (out / "tokenizer.json").is_file()


# --------------------------------------------------------------------------------------------------
# (b) privacy: what an owner sends


def instruction_message(world: World, compression: str = "full", train: dict | None = None) -> Message:
    plan = fed.plan_federation(fed.FederationSettings(public=str(world.public), out=str(world.root / "unused"),
                                                      owners=list(OWNERS), compression=compression,
                                                      train=dict(TRAIN if train is None else train)))
    message = Message(fed.instruction(plan), dst_node_id=7, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = uuid4().hex
    return message


@pytest.mark.parametrize("compression,rank", [("full", 0), ("rank:3", 3)])
def test_owner_sends_only_the_expert_and_its_router_row(world: World, compression: str, rank: int) -> None:
    owner = "math"
    setup = fed.OwnerSetup(owner=owner, data_paths=(str(world.data[owner]),), public=str(world.public))
    reply = fed.owner_reply(instruction_message(world, compression), setup)  # the real trainer
    content = reply.content
    assert set(content.keys()) == {fed.EXPERT, fed.META}
    assert not content.metric_records
    arrays = content.array_records[fed.EXPERT]
    config = CheckpointReader(world.public)
    expected = fed.payload_shapes(fed.open_checkpoint(world.public)[1], rank)
    assert set(arrays.keys()) == set(expected)
    assert len(expected) == L * (4 if rank == 0 else 7)  # 3 matrices (or 6 factors) + 1 router row per layer
    for name, array in arrays.items():
        assert array.dtype == "float32", name  # no integer (token id) arrays
        assert tuple(array.shape) == expected[name], name
    meta = dict(content.config_records[fed.META])
    assert set(meta) == set(fed.META_KEYS)
    assert meta["owner"] == owner and meta["rank"] == rank
    assert meta["public_hash"] == fed.public_hash(config.path)
    assert meta["bytes"] == sum(len(a.data) for a in arrays.values())
    strings = [v for v in meta.values() if isinstance(v, str)]
    assert set(strings) == {owner, meta["public_hash"]}
    data = world.data[owner].read_text()
    payload = b"".join(a.data for a in arrays.values())
    for needle in ("vault code", "zebra orchid", data.splitlines()[0][:20]):
        assert needle.encode() not in payload
        assert all(needle not in s for s in strings)


def test_training_failure_travels_as_its_type_only(world: World) -> None:
    secret = SECRET.format(owner="math")

    def failing(*args, **kwargs):
        raise ValueError(f"cannot parse line 3: {secret!r}")

    setup = fed.OwnerSetup(owner="math", data_paths=(str(world.data["math"]),), public=str(world.public))
    reply = fed.owner_reply(instruction_message(world), setup, failing)
    assert set(reply.content.keys()) == {fed.META}
    meta = dict(reply.content.config_records[fed.META])
    assert set(meta) == set(fed.ERROR_META_KEYS)
    assert "ValueError" in meta["error"] and "zebra" not in meta["error"] and "vault" not in meta["error"]


def test_server_may_not_set_owner_only_options(world: World) -> None:
    setup = fed.OwnerSetup(owner="math", data_paths=(str(world.data["math"]),), public=str(world.public))
    message = instruction_message(world)
    message.content[fed.TRAIN] = ConfigRecord({"steps": 1, "router_init": "/etc/passwd"})
    meta = dict(fed.owner_reply(message, setup, fake_trainer).content.config_records[fed.META])
    assert "router_init" in meta["error"]
    with pytest.raises(FlexmoreError, match="device"):
        fed.plan_federation(fed.FederationSettings(public=str(world.public), out=str(world.root / "x"),
                                                   owners=["a"], train={"device": "cuda"}))


# --------------------------------------------------------------------------------------------------
# (c) rejections


def _set(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Message], None]:
    def tamper(reply: Message) -> None:
        arrays = reply.content.array_records[fed.EXPERT]
        arrays[name] = fed.to_array(make(fed.from_array(arrays[name], name)))

    return tamper


def _forge_hash(reply: Message) -> None:
    reply.content.config_records[fed.META]["public_hash"] = "0" * 64


def _add_tensor(reply: Message) -> None:
    reply.content.array_records[fed.EXPERT]["model.embed_tokens.weight"] = fed.to_array(torch.zeros(300, H))


def _nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, 0] = float("nan")
    return t


GATE = "model.layers.1.mlp.experts.1.gate_proj.weight"
BAD_OWNERS = {  # how "code" goes wrong -> what the error must say
    "other public model": (dict(public="other"), ["public model"]),
    "forged hash": (dict(tamper=_forge_hash), ["another public model"]),
    "wrong shape": (dict(tamper=_set(GATE, lambda t: t[:, :-1])), [GATE, "shape"]),
    "NaN": (dict(tamper=_set(GATE, _nan)), [GATE, "NaN"]),
    "extra tensor": (dict(tamper=_add_tensor), ["model.embed_tokens.weight", "unexpected"]),
}


@pytest.mark.parametrize("allow_missing", [False, True], ids=["strict", "allow-missing"])
@pytest.mark.parametrize("case", sorted(BAD_OWNERS))
def test_server_rejects_a_bad_upload_naming_the_owner(world: World, tmp_path: Path, case: str,
                                                      allow_missing: bool) -> None:
    how, mentions = BAD_OWNERS[case]
    public = world.other_public if how.get("public") == "other" else None
    grid = LocalGrid({i: owner_node(world, o, public=public if o == "code" else None,
                                    tamper=how.get("tamper") if o == "code" else None)
                      for i, o in enumerate(OWNERS, start=1)})
    out = tmp_path / "mixture"
    if not allow_missing:
        with pytest.raises(FlexmoreError) as err:
            fed.run_server(grid, settings(world, out))
        for text in ["'code'", *mentions, "nothing written"]:
            assert text in str(err.value), (text, str(err.value))
        assert not out.exists() and not fed.summary_path(out).exists() and not leftovers(out)
        return
    result = fed.run_server(grid, settings(world, out, allow_missing=True))
    assert load_model(out).config.expert_names == ["public", "math", "chat"]
    assert list(result.summary["rejected"]) == ["code"]
    reason = result.summary["rejected"]["code"]
    assert all(text in reason for text in ["'code'", *mentions]), reason
    assert json.loads(fed.summary_path(out).read_text())["rejected"] == result.summary["rejected"]
    assert not leftovers(out)


def test_too_few_nodes_is_a_clear_error_or_a_smaller_mixture(world: World, tmp_path: Path) -> None:
    grid = LocalGrid({1: owner_node(world, "math")})
    out = tmp_path / "mixture"
    two = dict(owners=["math", "code"])
    with pytest.raises(FlexmoreError, match=r"only 1 of 2 owners' nodes registered within 0\.3 s"):
        fed.run_server(grid, settings(world, out, node_timeout=0.3, **two))
    assert not out.exists()
    result = fed.run_server(grid, settings(world, out, node_timeout=0.3, allow_missing=True, **two))
    assert result.summary["missing"] == ["code"]
    assert load_model(out).config.expert_names == ["public", "math"]


# --------------------------------------------------------------------------------------------------
# (d) compression


def test_rank_compression_is_smaller_reported_and_optimal(world: World, tmp_path: Path) -> None:
    keep = tmp_path / "kept"
    keep.mkdir()
    grid = LocalGrid({i: owner_node(world, o, keeping(keep)) for i, o in enumerate(OWNERS, start=1)})
    out = tmp_path / "mixture"
    rank = 2
    result = fed.run_server(grid, settings(world, out, compression=f"rank:{rank}"))
    full = result.summary["full_expert_bytes"]
    for owner, x in result.summary["owners"].items():
        assert x["rank"] == rank and x["bytes"] == L * (3 * rank * (H + I) + H) * 4 < full
        assert x["fraction_of_full"] == pytest.approx(x["bytes"] / full)
    mixed, trained = tensors(out), tensors(keep / "code")
    for layer in range(L):
        for proj in PROJECTIONS:
            delta = (trained[f"model.layers.{layer}.mlp.experts.1.{proj}.weight"]
                     - trained[f"model.layers.{layer}.mlp.experts.0.{proj}.weight"]).double()  # [out, in]
            b = mixed[f"model.layers.{layer}.mlp.experts.2.{proj}_b.weight"].double()  # [out, r]
            a = mixed[f"model.layers.{layer}.mlp.experts.2.{proj}_a.weight"].double()  # [r, in]
            s = torch.linalg.svdvals(delta)
            best = float(s[rank:].square().sum().sqrt())  # Eckart-Young: the least error of any rank-r matrix
            error = float(torch.linalg.matrix_norm(delta - b @ a))
            assert best * (1 - 1e-6) <= error <= best * 1.01  # randomized SVD: within 1% of the optimum
    assert torch.equal(mixed["model.layers.0.mlp.gate.weight"][2], trained["model.layers.0.mlp.gate.weight"][1])


def test_energy_compression_picks_the_smallest_pooled_rank(world: World, tmp_path: Path) -> None:
    keep = tmp_path / "kept"
    keep.mkdir()
    grid = LocalGrid({1: owner_node(world, "chat", keeping(keep))})
    result = fed.run_server(grid, settings(world, tmp_path / "mixture", owners=["chat"], compression="energy:0.6"))
    trained = tensors(keep / "chat")
    squares = [torch.linalg.svdvals((trained[f"model.layers.{layer}.mlp.experts.1.{p}.weight"]
                                     - trained[f"model.layers.{layer}.mlp.experts.0.{p}.weight"]).double()).square()
               for layer in range(L) for p in PROJECTIONS]
    total = sum(float(s.sum()) for s in squares)
    retained = [sum(float(s[:r].sum()) for s in squares) / total for r in range(1, min(H, I) + 1)]
    expected = next(r for r, x in enumerate(retained, start=1) if x >= 0.6)
    assert 1 < expected < min(H, I)  # the test would not tell anything otherwise
    assert result.summary["owners"]["chat"]["rank"] == expected


# --------------------------------------------------------------------------------------------------
# Settings, the public hash, the CLI's checks


def test_public_hash_follows_the_tensors_not_the_files(world: World, tmp_path: Path) -> None:
    original = fed.public_hash(world.public)
    values = tensors(world.public)
    resharded = tmp_path / "resharded"
    with CheckpointWriter(resharded, max_shard_bytes=20_000) as writer:  # several shards, other file layout
        for name in reversed(list(values)):
            writer.add(name, values[name])
        shutil.copy(world.public / "config.json", writer.tmp / "config.json")
        writer.commit({})
    assert len(list(resharded.glob("*.safetensors"))) > 1
    assert fed.public_hash(resharded) == original
    assert fed.public_hash(world.other_public) != original
    nudged = tmp_path / "nudged"
    with CheckpointWriter(nudged) as writer:
        for name, value in values.items():
            if name == "model.norm.weight":
                value = torch.nextafter(value, value + 1)  # one ulp
            writer.add(name, value)
        shutil.copy(world.public / "config.json", writer.tmp / "config.json")
        writer.commit({})
    assert fed.public_hash(nudged) != original


@pytest.mark.parametrize("text,ok", [("full", "full"), ("rank:8", "rank:8"), ("energy:0.9", "energy:0.9"),
                                     ("rank:0", None), ("rank:33", None), ("energy:1.5", None), ("8", None)])
def test_compression_spec(text: str, ok: str | None) -> None:
    if ok is None:
        with pytest.raises(FlexmoreError, match="--compress"):
            fed.parse_compression(text, max_rank=min(H, I))
    else:
        assert str(fed.parse_compression(text, max_rank=min(H, I))) == ok


def test_settings_round_trip_through_the_run_config(world: World) -> None:
    s = fed.FederationSettings(public="/p", out="/o", owners=["a", "b"], compression="rank:4",
                               train={"steps": 3, "lr": 0.5, "negative_bias": True}, allow_missing=True, top_k=2,
                               node_timeout=5.0, reply_timeout=60.0, overwrite=True, error_file="/e")
    assert fed.FederationSettings.from_run_config(s.to_run_config()) == s


@pytest.mark.parametrize("args,mentions", [
    (["--owner", "math"], ["--owner", "NAME=DATA_PATH"]),
    (["--owner", "math=/no/such/file.jsonl"], ["--owner math", "/no/such/file.jsonl"]),
    (["--owner", "public=DATA"], ["'public'"]),
    (["--owner", "a=DATA", "--owner", "a=DATA"], ["given twice"]),
    (["--owner", "a=DATA", "--compress", "rank:x"], ["--compress", "rank:x"]),
    (["--owner", "a=DATA", "--steps", "0"], ["--steps"]),
])
def test_cli_refuses_bad_options_before_any_engine_starts(flexmore, world: World, tmp_path: Path,
                                                          args: list[str], mentions: list[str]) -> None:
    args = [a.replace("=DATA", f"={world.data['math']}") for a in args]
    result = flexmore("federate", world.public, tmp_path / "out", *args)
    assert_one_error_line(result, *mentions)
    assert not (tmp_path / "out").exists()


def test_missing_flower_is_one_line_naming_the_extra(flexmore, world: World, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.delitem(sys.modules, "flexmore.federated.app")
    monkeypatch.delattr(sys.modules["flexmore.federated"], "app")
    monkeypatch.setitem(sys.modules, "flwr.app", None)  # as if flwr were not installed
    result = flexmore("federate", world.public, tmp_path / "out", f"--owner=a={world.data['math']}")
    assert_one_error_line(result, "Flower", "'federated' extra")


def test_public_model_must_have_one_expert(flexmore, world: World, flexolmo_dir: Path, tmp_path: Path) -> None:
    result = flexmore("federate", flexolmo_dir, tmp_path / "out", f"--owner=a={world.data['math']}")
    assert_one_error_line(result, str(flexolmo_dir), "4 experts", "1-expert")


# --------------------------------------------------------------------------------------------------
# (e) deployment: a SuperLink and two SuperNodes on 127.0.0.1


def _descendants() -> list[str]:
    """Commands of this process's live descendants (Linux /proc), grandchildren included."""
    parent, command = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                pid = int(stat.parent.name)
                parent[pid] = int(fields[1])
                command[pid] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    mine, found = {os.getpid()}, True
    while found:
        found = {pid for pid, ppid in parent.items() if ppid in mine and pid not in mine}
        mine |= found
    return [command[pid] for pid in mine if pid != os.getpid()]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process check reads /proc")
def test_loopback_deployment_with_two_owners(world: World, tmp_path: Path) -> None:
    out = tmp_path / "mixture"
    result = run_federation_deployment(world.public, [(o, world.data[o]) for o in ("math", "code")], out,
                                       train=TRAIN, node_timeout=60, timeout=240, keep_logs=tmp_path / "logs")
    model = load_model(out)
    assert model.config.expert_names == ["public", "math", "code"]
    assert model.config.expert_ranks == [0, 0, 0]
    assert result.summary["owners"]["math"]["bytes"] == result.summary["full_expert_bytes"]
    assert not [c for c in _descendants() if "flower" in c or "flwr" in c]
    assert "Sent successfully" in (tmp_path / "logs" / "supernode-math.log").read_text()
