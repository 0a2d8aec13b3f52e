"""Crosscoders by Hub repo id, without the network: a Hub cache laid out by the test (HF_HUB_OFFLINE=1, so any
request raises), holding our format and the paper's layouts at several revisions and subfolders; a download from a
loopback server the test starts (connections elsewhere fail the test); push_to_hub against a recording HfApi, its
upload loaded back, and the model card it writes."""

import dataclasses
import hashlib
import http.server
import json
import os
import shutil
import socket
import sys
import threading
import urllib.parse

import pytest
import safetensors.torch
import torch
from conftest import rng

import crossdiff_ext as cx
from crossdiff_ext import cli
from crossdiff_ext.errors import InputError, MissingInputError
from crossdiff_ext.layer import hub

huggingface_hub = pytest.importorskip("huggingface_hub")
hf_constants = pytest.importorskip("huggingface_hub.constants")

D, F = 8, 24
REPO = "science-of-finetuning/gemma-2-2b-L13-k100-lr1e-04-local-shuffling-CCLoss"


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """A fresh Hub cache under tmp_path, and huggingface_hub in offline mode (a request raises instead of going
    out); returns the cache directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    return cache


def commit_hash(salt):
    return f"{salt:040x}"


def cache_repo(cache, repo_id, files, *, commit, ref=None):
    """Lay out one commit of a model repo in a Hub cache as huggingface_hub writes it: snapshots/<commit>/... and
    refs/<ref> naming the commit. `files` maps paths in the repo to local files or directories to copy."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path_in_repo, source in files.items():
        target = snapshot / path_in_repo
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if os.path.isdir(source) else shutil.copyfile)(source, target)
    if ref is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def random_crosscoder(salt, activation="batch_topk", M=2):
    g = rng(salt)
    cc = cx.CrossCoder(D, F, M, k=4 if activation == "batch_topk" else None, activation=activation)
    with torch.no_grad():
        for p in cc.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        cc.threshold.fill_(0.7)
    return cc


def assert_same(a, b):
    assert a.config() == b.config()
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def paper_state(salt, k=4):
    """A dictionary_learning crosscoder's state dict (encoder [M, d, F], decoder [M, F, d])."""
    g = rng(salt)
    state = {
        "encoder.weight": torch.randn(2, D, F, generator=g),
        "encoder.bias": torch.randn(F, generator=g),
        "decoder.weight": torch.randn(2, F, D, generator=g),
        "decoder.bias": torch.randn(2, D, generator=g),
        "code_normalization_id": torch.tensor(1),
    }
    if k is not None:
        state.update(k=torch.tensor(k, dtype=torch.int32), threshold=torch.tensor(0.5))
    return state


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_our_format_by_repo_id_with_revision_and_subfolder(tmp_path, offline):
    first, second = random_crosscoder(1), random_crosscoder(2, activation="relu", M=3)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    cache_repo(offline, "me/cc", {"layer-13": tmp_path / "first"}, commit=commit_hash(1), ref="main")
    cache_repo(offline, "me/cc", {"layer-13": tmp_path / "second"}, commit=commit_hash(2), ref="v2")

    assert_same(first, cx.CrossCoder.from_pretrained("me/cc", subfolder="layer-13", cache_dir=offline))
    assert_same(second, cx.CrossCoder.from_pretrained("me/cc", subfolder="layer-13", revision="v2", cache_dir=offline))
    by_commit = cx.CrossCoder.from_pretrained(
        "me/cc", subfolder="layer-13/", revision=commit_hash(1), cache_dir=offline
    )
    assert_same(first, by_commit)

    with pytest.raises(MissingInputError, match="me/cc: the Hub repo has no subfolder 'layer-7'"):
        cx.CrossCoder.from_pretrained("me/cc", subfolder="layer-7", cache_dir=offline)
    for kwargs, match in (
        (dict(repo="me/cc", revision="v3"), "me/cc: no such local path, and the Hub repo at revision 'v3' cannot be"),
        (dict(repo="me/other"), "me/other: no such local path, and the Hub repo cannot be read"),
    ):
        with pytest.raises(InputError, match=match) as caught:
            cx.CrossCoder.from_pretrained(kwargs.pop("repo"), cache_dir=offline, **kwargs)
        assert "\n" not in str(caught.value)


def test_a_local_path_wins_and_takes_no_revision(tmp_path, offline, monkeypatch):
    cc = random_crosscoder(3)
    monkeypatch.chdir(tmp_path)
    cc.save_pretrained(tmp_path / "me" / "cc")  # a local directory that reads like a repo id
    assert not hub.is_repo_id("me/cc")
    assert_same(cc, cx.CrossCoder.from_pretrained("me/cc"))
    with pytest.raises(InputError, match="revision='v2' applies to a Hub repo id, but 'me/cc' is a local path"):
        cx.CrossCoder.from_pretrained("me/cc", revision="v2")
    with pytest.raises(MissingInputError, match="no such checkpoint directory"):
        cx.CrossCoder.from_pretrained(tmp_path / "not" / "here" / "at-all")  # not a repo id: no Hub involved


def test_the_papers_hub_layouts_by_repo_id(tmp_path, offline):
    # PyTorchModelHubMixin's layout (model.safetensors + the constructor's config.json) with the trainer record
    # the science-of-finetuning repos add as trainer_config.json.
    topk = tmp_path / "topk"
    topk.mkdir()
    state = paper_state(4)
    safetensors.torch.save_file(state, topk / "model.safetensors")
    write_json(topk / "config.json", dict(activation_dim=D, dict_size=F, num_layers=2, k=4))
    trainer = dict(dict_class="BatchTopKCrossCoder", k=4, activation_dim=D, dict_size=F, lm_name="gemma-2-2b", layer=13)
    write_json(
        topk / "trainer_config.json", dict(trainer=dict(trainer, code_normalization="CodeNormalization.CROSSCODER"))
    )
    cache_repo(offline, REPO, {".": topk}, commit=commit_hash(4), ref="main")
    expected = expected_topk = cx.load_dictionary_learning(state)
    assert expected.activation == "batch_topk" and expected.k == 4
    assert_same(expected, cx.CrossCoder.from_pretrained(REPO, cache_dir=offline))
    assert_same(expected, cx.load_dictionary_learning(REPO, cache_dir=offline))

    # An older mixin upload: pytorch_model.bin (read with weights_only=True), an L1 crosscoder (no k).
    l1 = tmp_path / "l1"
    l1.mkdir()
    state = paper_state(5, k=None)
    torch.save(state, l1 / "pytorch_model.bin")
    write_json(l1 / "config.json", dict(activation_dim=D, dict_size=F, num_layers=2))
    write_json(l1 / "trainer_config.json", dict(trainer=dict(dict_class="CrossCoder", activation_dim=D, dict_size=F)))
    cache_repo(offline, "science-of-finetuning/l1", {"l13": l1}, commit=commit_hash(5), ref="main")
    loaded = cx.CrossCoder.from_pretrained("science-of-finetuning/l1", subfolder="l13", cache_dir=offline)
    assert loaded.activation == "relu"
    assert_same(cx.load_dictionary_learning(state), loaded)

    # A training run's output as the library writes it: ae.pt beside config.json {"trainer": ..., "buffer": ...}.
    run = tmp_path / "run"
    run.mkdir()
    state = paper_state(6)
    torch.save(state, run / "ae.pt")
    write_json(run / "config.json", dict(trainer=dict(trainer, dict_size=F), buffer=dict(d_submodule=D)))
    assert_same(cx.load_dictionary_learning(state), cx.CrossCoder.from_pretrained(run))
    assert_same(cx.load_dictionary_learning(state), cx.CrossCoder.from_pretrained(run / "ae.pt"))
    assert_same(expected_topk, cx.CrossCoder.from_pretrained(topk / "model.safetensors"))


@pytest.mark.parametrize(
    "trainer, match",
    [
        (dict(dict_class="BatchTopKSAE"), "dict_class = 'BatchTopKSAE' is not a crosscoder"),
        (dict(dict_class="BatchTopKCrossCoder", k=5), "k = 5 but the k tensor is 4"),
        (dict(dict_class="BatchTopKCrossCoder", dict_size=F + 1), f"dict_size = {F + 1} but the tensors give {F}"),
        (dict(dict_class="CrossCoder", code_normalization="CodeNormalization.SAE"), "'CodeNormalization.SAE' is not"),
    ],
)
def test_a_trainer_config_that_disagrees_is_named(tmp_path, trainer, match):
    safetensors.torch.save_file(paper_state(7), tmp_path / "model.safetensors")
    write_json(tmp_path / "config.json", dict(activation_dim=D, dict_size=F, num_layers=2))
    write_json(tmp_path / "trainer_config.json", dict(trainer=trainer))
    with pytest.raises(InputError, match=match):
        cx.CrossCoder.from_pretrained(tmp_path)


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records the calls and copies what upload_folder would send."""

    calls = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        sent = os.path.join(self.sent_to, kwargs.get("path_in_repo") or "")
        shutil.copytree(folder_path, sent, dirs_exist_ok=True)
        self.calls.append(("upload_folder", repo_id, kwargs))
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{repo_id}/commit/{commit_hash(9)}",
            commit_message=kwargs["commit_message"],
            commit_description="",
            oid=commit_hash(9),
        )


def test_push_to_hub_uploads_our_format_with_a_model_card(tmp_path, offline, monkeypatch):
    RecordingHfApi.calls = []
    RecordingHfApi.sent_to = str(tmp_path / "sent")
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    cc = random_crosscoder(8)
    facts = hub.CardFacts(
        base_model="google/gemma-2-2b",
        chat_model="google/gemma-2-2b-it",
        layer=13,
        tokens_trained=100_000_000,
        fve_per_model=[0.8125, 0.75],
        datasets=["HuggingFaceFW/fineweb", "lmsys/lmsys-chat-1m"],
    )
    url = cc.push_to_hub("me/pushed", facts=facts, subfolder="layer-13", private=True, token="hf_test")
    assert url == f"https://huggingface.co/me/pushed/commit/{commit_hash(9)}"
    (create, repo, create_kwargs), (upload, repo2, upload_kwargs) = RecordingHfApi.calls
    assert (create, repo, create_kwargs) == ("create_repo", "me/pushed", dict(private=True, exist_ok=True))
    assert (upload, repo2, upload_kwargs["path_in_repo"]) == ("upload_folder", "me/pushed", "layer-13")
    sent = tmp_path / "sent" / "layer-13"
    assert sorted(os.listdir(sent)) == ["README.md", "config.json", "model.safetensors"]

    # What was sent loads back by repo id, bit for bit.
    cache_repo(offline, "me/pushed", {".": tmp_path / "sent"}, commit=commit_hash(9), ref="main")
    assert_same(cc, cx.CrossCoder.from_pretrained("me/pushed", subfolder="layer-13", cache_dir=offline))

    card = (sent / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: crossdiff_ext" in front
    metadata = huggingface_hub.ModelCard(card).data  # the Hub's own parser reads the front matter
    assert metadata.library_name == "crossdiff_ext"
    assert metadata.base_model == ["google/gemma-2-2b", "google/gemma-2-2b-it"]
    assert 'base_model:\n- "google/gemma-2-2b"\n- "google/gemma-2-2b-it"' in front
    assert 'datasets:\n- "HuggingFaceFW/fineweb"\n- "lmsys/lmsys-chat-1m"' in front
    for row in (
        "| models | google/gemma-2-2b / google/gemma-2-2b-it |",
        "| layer | 13 |",
        f"| dictionary size | {F} |",
        "| sparsity | BatchTopK, k = 4 active latents per token on average |",
        "| tokens trained | 100000000 |",
        "| fraction of variance explained | google/gemma-2-2b: 0.8125, google/gemma-2-2b-it: 0.7500 |",
    ):
        assert row in body
    assert 'cx.CrossCoder.from_pretrained("me/pushed", subfolder="layer-13")' in body


def test_model_card_of_an_l1_crosscoder_with_little_recorded():
    card = hub.model_card(random_crosscoder(10, activation="relu"), "me/l1", hub.CardFacts(l1_coefficient=0.041))
    assert "| sparsity | L1 (ReLU), mu = 0.041 |" in card
    assert "| layer | not recorded |" in card and "| tokens trained | not recorded |" in card
    assert "base_model" not in card


def test_push_to_hub_refuses_a_bad_repo_id():
    with pytest.raises(InputError, match="repo_id must be a Hub repo id owner/name, got 'no-owner'"):
        random_crosscoder(11).push_to_hub("no-owner")


def test_without_huggingface_hub_the_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(InputError, match=r"pip install 'crossdiff_ext\[hub\]'"):
        cx.CrossCoder.from_pretrained("me/cc")


def test_push_command_fills_the_card_from_the_training_run(tmp_path, offline, monkeypatch, capsys):
    RecordingHfApi.calls = []
    RecordingHfApi.sent_to = str(tmp_path / "sent")
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    torch.manual_seed(0)
    cc = cx.CrossCoder(D, F, 2, activation="relu")
    data = torch.randn(120, 2, D, generator=rng(12))
    config = cx.TrainConfig(
        steps=6, batch_size=16, warmup_steps=2, checkpoint_every=3, log_every=2, checkpoint_dir=str(tmp_path / "run")
    )
    cx.train(cc, data, dataclasses.replace(config, progress=False), until=3)
    cx.train(cc, data, dataclasses.replace(config, progress=False), resume=True)  # the log goes on past step 3
    logged = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    at_step_2 = next(r for r in logged if r["step"] == 2)["fve_per_model"]

    argv = ["push", str(tmp_path / "run" / "step-00000003"), "me/run", "--base-model", "base", "--chat-model", "chat"]
    assert cli.main(argv + ["--layer", "3", "--dataset", "web", "--dataset", "chat-data"]) == 0
    assert "-> me/run: https://huggingface.co/me/run/commit/" in capsys.readouterr().out
    card = (tmp_path / "sent" / "README.md").read_text()
    fve = ", ".join(f"{name}: {value:.4f}" for name, value in zip(("base", "chat"), at_step_2))
    for row in (
        "| layer | 3 |",
        "| tokens trained | 48 |",  # 3 steps x 16 rows
        "| sparsity | L1 (ReLU), mu = 0.041 |",
        f"| fraction of variance explained | {fve} (training batch at step 2) |",
    ):
        assert row in card
    assert 'datasets:\n- "web"\n- "chat-data"' in card
    assert 'cx.CrossCoder.from_pretrained("me/run")' in card
    assert_same(
        cx.CrossCoder.from_pretrained(tmp_path / "run" / "step-00000003"),
        cx.CrossCoder.from_pretrained(tmp_path / "sent"),
    )


class LoopbackHub(http.server.BaseHTTPRequestHandler):
    """The few Hub routes snapshot_download uses (revision info, file tree, file HEAD/GET), served from memory:
    repos = {repo_id: {ref: (commit, {path: bytes})}}; every request is logged with its Authorization header."""

    repos: dict = {}
    requests: list = []

    def do_GET(self):
        self.answer(head=False)

    def do_HEAD(self):
        self.answer(head=True)

    def answer(self, head):
        path = urllib.parse.unquote(urllib.parse.urlparse(self.path).path)
        self.requests.append((self.command, path, self.headers.get("Authorization")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            kind, repo, ref, name = parts[4], "/".join(parts[2:4]), parts[5], None
        elif len(parts) >= 5 and parts[2] == "resolve":
            kind, repo, ref, name = "file", "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        else:
            return self.send(404, b"{}", head)
        found = [(c, files) for r, (c, files) in self.repos.get(repo, {}).items() if ref in (r, c)]
        if not found:
            code = "RevisionNotFound" if repo in self.repos else "RepoNotFound"
            return self.send(404, b'{"error": "not found"}', head, {"X-Error-Code": code})
        commit, files = found[0]
        if kind == "revision":
            info = dict(id=repo, sha=commit, private=False, siblings=[dict(rfilename=f) for f in sorted(files)])
            return self.send(200, json.dumps(info).encode(), head)
        if kind == "tree":
            tree = [dict(type="file", path=f, size=len(b), oid=hashlib.sha1(b).hexdigest()) for f, b in files.items()]
            return self.send(200, json.dumps(tree).encode(), head)
        if name not in files:
            return self.send(404, b"", head, {"X-Error-Code": "EntryNotFound"})
        etag = hashlib.sha256(files[name]).hexdigest()
        return self.send(200, files[name], head, {"ETag": f'"{etag}"', "X-Repo-Commit": commit})

    def send(self, code, body, head, headers=None):
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def loopback_hub(monkeypatch):
    """A LoopbackHub on 127.0.0.1 as huggingface_hub's endpoint; any connection elsewhere fails the test."""
    real_connect = socket.socket.connect

    def loopback_only(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a test tried to reach {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    LoopbackHub.repos, LoopbackHub.requests = {}, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LoopbackHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(hf_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(
        hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    yield LoopbackHub
    server.shutdown()
    server.server_close()
    thread.join()


def test_download_from_a_loopback_hub_fetches_only_what_loads(tmp_path, loopback_hub):
    state = paper_state(13)
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    files = {
        "l13/model.safetensors": (tmp_path / "model.safetensors").read_bytes(),
        "l13/config.json": json.dumps(dict(activation_dim=D, dict_size=F, num_layers=2, k=4)).encode(),
        "l13/trainer_config.json": json.dumps(dict(trainer=dict(dict_class="BatchTopKCrossCoder", k=4))).encode(),
        "l13/README.md": b"# a card",
        "l20/model.safetensors": b"another layer, never fetched",
    }
    loopback_hub.repos["science-of-finetuning/cc"] = {"v1": (commit_hash(13), files)}
    loaded = cx.CrossCoder.from_pretrained(
        "science-of-finetuning/cc", revision="v1", subfolder="l13", cache_dir=tmp_path / "cache", token="hf_test"
    )
    assert_same(cx.load_dictionary_learning(state), loaded)
    fetched = sorted(p.rsplit("/", 2)[-1] for m, p, _ in loopback_hub.requests if m == "GET" and "/resolve/" in p)
    assert fetched == ["config.json", "model.safetensors", "trainer_config.json"]
    assert all(auth == "Bearer hf_test" for _, p, auth in loopback_hub.requests if "science-of-finetuning" in p)

    with pytest.raises(InputError, match="science-of-finetuning/cc: no such local path, and the Hub repo at revision"):
        cx.CrossCoder.from_pretrained("science-of-finetuning/cc", revision="v2", cache_dir=tmp_path / "cache")
