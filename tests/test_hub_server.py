"""The local Hub of tests/hub_server.py, driven through the public `huggingface_hub` API only."""

import hashlib
import os
import socket
import tempfile
import threading
from pathlib import Path

import huggingface_hub
import pytest
from hub_server import LFS_SIZE_THRESHOLD, HubServer, connect_huggingface_hub, set_hub_offline
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


def make_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def read(path: str | Path) -> bytes:
    return Path(path).read_bytes()


FILES = {
    "config.json": b'{"hidden_size": 8}',
    "pack.safetensors": os.urandom(2048),  # LFS by name (.gitattributes)
    "notes/readme.txt": b"two domains",
}


@pytest.fixture
def alice(hub_server) -> HfApi:
    """User `alice`, owner of the public repo `alice/pack`, which holds only its initial commit."""
    api = HfApi(token=hub_server.add_user("alice"))
    api.create_repo("alice/pack")
    return api


def push_pack(api: HfApi, tmp_path: Path, files: dict[str, bytes] = FILES, repo_id: str = "alice/pack") -> str:
    folder = make_folder(Path(tempfile.mkdtemp(prefix="push-", dir=tmp_path)), files)
    return api.upload_folder(repo_id=repo_id, folder_path=folder).oid


def test_push_folder_then_pull_into_fresh_caches(hub_server, alice, tmp_path):
    big = b"x" * LFS_SIZE_THRESHOLD  # text, but LFS by size
    commit = push_pack(alice, tmp_path, {**FILES, "big.txt": big})

    assert alice.list_repo_files("alice/pack") == [
        ".gitattributes",
        "big.txt",
        "config.json",
        "notes/readme.txt",
        "pack.safetensors",
    ]
    tree = {entry.path: entry for entry in alice.list_repo_tree("alice/pack", recursive=True)}
    assert tree["notes"].tree_id  # directories are listed too
    assert tree["pack.safetensors"].lfs.sha256 == hashlib.sha256(FILES["pack.safetensors"]).hexdigest()
    assert tree["big.txt"].lfs is not None and tree["big.txt"].size == len(big)
    assert tree["config.json"].lfs is None

    path = hf_hub_download("alice/pack", "pack.safetensors", cache_dir=tmp_path / "cache-a")
    assert read(path) == FILES["pack.safetensors"]
    assert f"snapshots/{commit}/" in Path(path).as_posix()

    snapshot = Path(snapshot_download("alice/pack", cache_dir=tmp_path / "cache-b"))
    assert snapshot.name == commit
    assert {name: read(snapshot / name) for name in FILES} == FILES
    assert read(snapshot / "big.txt") == big

    only_json = Path(snapshot_download("alice/pack", cache_dir=tmp_path / "cache-c", allow_patterns=["*.json"]))
    assert sorted(p.name for p in only_json.iterdir()) == ["config.json"]


def test_revision_pinned_by_commit_survives_a_second_push(hub_server, alice, tmp_path):
    first = push_pack(alice, tmp_path)
    second = push_pack(alice, tmp_path, {"config.json": b'{"hidden_size": 16}'})
    assert first != second and len(first) == len(second) == 40

    pinned = hf_hub_download("alice/pack", "config.json", revision=first, cache_dir=tmp_path / "fresh")
    assert read(pinned) == FILES["config.json"]
    assert read(hf_hub_download("alice/pack", "config.json", cache_dir=tmp_path / "fresh")) == b'{"hidden_size": 16}'
    assert HfApi().model_info("alice/pack", revision=first).sha == first
    assert [c.commit_id for c in alice.list_repo_commits("alice/pack")][:2] == [second, first]
    assert alice.list_repo_commits("alice/pack")[-1].title == "initial commit"

    alice.create_branch("alice/pack", branch="v1", revision=first)
    refs = {ref.name: ref.target_commit for ref in alice.list_repo_refs("alice/pack").branches}
    assert refs == {"main": second, "v1": first}
    assert read(hf_hub_download("alice/pack", "config.json", revision="v1")) == FILES["config.json"]


def test_unchanged_push_makes_no_commit_and_deletions_do(hub_server, alice, tmp_path):
    first = push_pack(alice, tmp_path)
    commits_before = [r for r in hub_server.requests if "/commit/" in r]
    assert push_pack(alice, tmp_path) == first  # preupload reports the remote oids: nothing to commit
    assert [r for r in hub_server.requests if "/commit/" in r] == commits_before
    alice.delete_file("notes/readme.txt", repo_id="alice/pack")
    assert "notes/readme.txt" not in alice.list_repo_files("alice/pack")
    with pytest.raises(EntryNotFoundError):
        alice.delete_file("notes/readme.txt", repo_id="alice/pack")


def test_missing_revision_and_file_raise_the_client_errors(hub_server, alice, tmp_path):
    push_pack(alice, tmp_path)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("alice/pack", "config.json", revision="nope")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("alice/pack", "missing.json")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/nothing-here", "config.json")
    assert not alice.file_exists("alice/pack", "missing.json") and alice.file_exists("alice/pack", "config.json")


def test_private_repo_needs_the_owners_token(hub_server, tmp_path):
    alice = HfApi(token=hub_server.add_user("alice"))
    bob = HfApi(token=hub_server.add_user("bob"))
    alice.create_repo("alice/secret", private=True)
    push_pack(alice, tmp_path, repo_id="alice/secret")
    assert alice.model_info("alice/secret").private

    with pytest.raises(RepositoryNotFoundError) as anonymous:
        hf_hub_download("alice/secret", "config.json")
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as other_user:
        bob.model_info("alice/secret")
    assert other_user.value.response.status_code == 404
    with pytest.raises(HfHubHTTPError, match="Invalid credentials") as bad_token:
        hf_hub_download("alice/secret", "config.json", token="hf_not_a_real_token")
    assert bad_token.value.response.status_code == 401 and not isinstance(bad_token.value, RepositoryNotFoundError)
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("alice/secret", token=bob.token)

    assert read(hf_hub_download("alice/secret", "config.json", token=alice.token)) == FILES["config.json"]
    assert [m.id for m in HfApi().list_models(author="alice")] == []
    assert [m.id for m in alice.list_models(author="alice")] == ["alice/secret"]


def test_only_the_owner_writes(hub_server, alice, tmp_path):
    bob = HfApi(token=hub_server.add_user("bob"))
    with pytest.raises(HfHubHTTPError) as push:
        push_pack(bob, tmp_path)
    assert push.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as create:
        bob.create_repo("alice/mine-now")
    assert create.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as anonymous:
        HfApi().create_repo("alice/anon")
    assert anonymous.value.response.status_code == 401
    assert alice.create_repo("alice/pack", exist_ok=True).repo_id == "alice/pack"


def test_two_users_push_and_a_third_composes(hub_server, tmp_path):
    users = {name: HfApi(token=hub_server.add_user(name)) for name in ("alice", "bob", "carol")}
    for name in ("alice", "bob"):
        users[name].create_repo(f"{name}/{name}-pack")
        push_pack(users[name], tmp_path, {f"{name}.safetensors": name.encode() * 100}, repo_id=f"{name}/{name}-pack")

    carol = users["carol"]
    parts = [Path(carol.snapshot_download(f"{name}/{name}-pack")) for name in ("alice", "bob")]
    carol.create_repo("carol/composed", private=True)
    weights = {path.name: read(path) for part in parts for path in part.glob("*.safetensors")}
    composed = make_folder(tmp_path / "composed", weights)
    carol.upload_folder(repo_id="carol/composed", folder_path=composed)

    snapshot = Path(snapshot_download("carol/composed", token=carol.token, cache_dir=tmp_path / "fresh"))
    assert read(snapshot / "bob.safetensors") == b"bob" * 100
    assert sorted(m.id for m in HfApi().list_models()) == ["alice/alice-pack", "bob/bob-pack"]


def test_delete_repo(hub_server, alice, tmp_path):
    bob = HfApi(token=hub_server.add_user("bob"))
    with pytest.raises(HfHubHTTPError) as not_owner:
        bob.delete_repo("alice/pack")
    assert not_owner.value.response.status_code == 403
    alice.delete_repo("alice/pack")
    with pytest.raises(RepositoryNotFoundError):
        alice.repo_info("alice/pack")
    alice.delete_repo("alice/pack", missing_ok=True)


def test_dataset_repos(hub_server, alice, tmp_path):
    alice.create_repo("alice/pack", repo_type="dataset")  # same name as the model repo, separate repo
    folder = make_folder(tmp_path / "data", {"train.parquet": b"PAR1" * 10, "info.json": b"{}"})
    alice.upload_folder(repo_id="alice/pack", repo_type="dataset", folder_path=folder)
    path = hf_hub_download("alice/pack", "train.parquet", repo_type="dataset")
    assert read(path) == b"PAR1" * 10
    assert "train.parquet" not in alice.list_repo_files("alice/pack")


def test_same_size_corruption_is_cached_silently_and_caught_by_verify(hub_server, alice, tmp_path):
    """huggingface_hub checks only the size of a download: wrong bytes of the right size land in the cache."""
    push_pack(alice, tmp_path)
    cache = tmp_path / "cache"
    hub_server.corrupt("alice/pack", "pack.safetensors")

    poisoned = read(hf_hub_download("alice/pack", "pack.safetensors", cache_dir=cache))
    assert poisoned != FILES["pack.safetensors"] and len(poisoned) == len(FILES["pack.safetensors"])
    report = alice.verify_repo_checksums("alice/pack", cache_dir=cache)
    assert [mismatch["path"] for mismatch in report.mismatches] == ["pack.safetensors"]

    hub_server.repair("alice/pack", "pack.safetensors")
    assert read(hf_hub_download("alice/pack", "pack.safetensors", cache_dir=cache)) == poisoned  # still cached
    repaired = hf_hub_download("alice/pack", "pack.safetensors", cache_dir=cache, force_download=True)
    assert read(repaired) == FILES["pack.safetensors"]


@pytest.mark.parametrize("path", ["pack.safetensors", "config.json"])  # an LFS file and a regular one
def test_truncated_download_is_an_error_and_leaves_the_cache_clean(hub_server, alice, tmp_path, path):
    push_pack(alice, tmp_path)
    cache = tmp_path / "cache"
    hub_server.corrupt("alice/pack", path, data=FILES[path][:-5])
    with pytest.raises(OSError, match="Consistency check failed"):
        hf_hub_download("alice/pack", path, cache_dir=cache)
    assert not list(cache.rglob("blobs/*")) and not list(cache.rglob(f"snapshots/*/{path}"))

    hub_server.repair("alice/pack", path)
    assert read(hf_hub_download("alice/pack", path, cache_dir=cache)) == FILES[path]


def test_offline_mode_serves_from_the_cache_without_requests(hub_server, alice, tmp_path, monkeypatch):
    commit = push_pack(alice, tmp_path)
    snapshot = snapshot_download("alice/pack")
    requests_before = len(hub_server.requests)

    set_hub_offline(monkeypatch)
    assert huggingface_hub.is_offline_mode()
    assert read(hf_hub_download("alice/pack", "config.json")) == FILES["config.json"]
    assert read(hf_hub_download("alice/pack", "config.json", revision=commit)) == FILES["config.json"]
    assert snapshot_download("alice/pack") == snapshot
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download("alice/pack", "config.json", cache_dir=tmp_path / "empty-cache")
    assert len(hub_server.requests) == requests_before

    set_hub_offline(monkeypatch, False)
    assert alice.model_info("alice/pack").sha == commit


def test_transformers_push_to_hub_and_from_pretrained(hub_server, alice):
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(
        GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, bos_token_id=0, eos_token_id=0)
    )
    commit = model.push_to_hub("alice/tiny", token=alice.token).oid  # writes a README.md: validate-yaml
    loaded = AutoModelForCausalLM.from_pretrained("alice/tiny", revision=commit)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def server_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "hub_server" or "process_request_thread" in t.name]


def test_server_stops_cleanly(tmp_path, monkeypatch):
    server = HubServer().start()
    connect_huggingface_hub(monkeypatch, server.endpoint, tmp_path / "cache")
    host, port = server.endpoint.removeprefix("http://").split(":")
    root = server.root
    api = HfApi(endpoint=server.endpoint, token=server.add_user("alice"))
    api.create_repo("alice/pack")
    assert api.list_repo_files("alice/pack") == [".gitattributes"]
    server.stop()

    assert server_threads() == []
    assert not root.exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=1)
