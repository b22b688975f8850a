"""Shard sets at a URL or behind a pipe: command: the same batches as the local folder, streamed, checked, and
one clear line for each way it can go wrong."""
from __future__ import annotations

import json
import shutil
import tarfile

import pytest

from cxrdist.data import storage
from cxrdist.data.index import load_index, verify_checksums
from cxrdist.data.loader import eval_loader, train_loader
from cxrdist.errors import DataError
from support.data_files import build_uneven_shard_set, loader_keys
from support.http_shards import serve


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_uneven_shard_set(tmp_path_factory.mktemp("remote"))


_keys = loader_keys


def test_member_locations_of_each_kind():
    assert storage.member("shards/a", "index.json") == "shards/a/index.json"
    assert storage.member("https://h/sets/a/", "x.tar") == "https://h/sets/a/x.tar"
    assert storage.member("s3://bucket/a", "x.tar") == "s3://bucket/a/x.tar"
    assert storage.member("pipe:aws s3 cp s3://b/a/{} -", "x.tar") == "pipe:aws s3 cp s3://b/a/x.tar -"
    assert storage.is_remote("gs://b/a") and storage.is_remote("pipe:cat {}") and not storage.is_remote("/data/a")
    with pytest.raises(DataError, match=r"a pipe: location needs \{\} where the file name goes"):
        storage.member("pipe:cat /data/a/index.json", "index.json")


def test_a_file_url_is_the_folder(shards):
    assert load_index(f"file://{shards}").root == str(shards) and not storage.is_remote(f"file://{shards}")
    assert _keys(eval_loader(f"file://{shards}", "test", batch_size=2, image_size=32)) == _keys(
        eval_loader(shards, "test", batch_size=2, image_size=32))


def test_http_shards_stream_the_same_batches_as_the_folder_and_each_rank_reads_its_share(shards):
    with serve(shards) as (url, sent):
        index = load_index(url)
        assert index.remote and index.shards(["test"])[0]["path"].startswith(url + "/test-")
        assert _keys(eval_loader(url, "test", batch_size=2, image_size=32)) == _keys(
            eval_loader(shards, "test", batch_size=2, image_size=32))
        for rank in (0, 1):
            assert _keys(train_loader(url, 0, batch_size=2, image_size=32, rank=rank, world_size=2, seed=1)) == _keys(
                train_loader(shards, 0, batch_size=2, image_size=32, rank=rank, world_size=2, seed=1))
        entries = index.shards(["fold1", "fold2"])
        train_bytes = sum(sent[e["name"]] for e in entries)
        # both ranks together: every training shard about once (plus the head of the shard rank 1 starts inside)
        assert sum(e["bytes"] for e in entries) <= train_bytes <= sum(e["bytes"] for e in entries) + max(
            e["bytes"] for e in entries)
        assert verify_checksums(url, raise_on_error=False) == []
    assert sent["index.json"] == (shards / "index.json").stat().st_size  # fetched once, for every loader above


def test_evaluate_reads_and_shard_inspect_verifies_a_shard_set_over_http(shards, tmp_path):
    from click.testing import CliRunner

    from cxrdist.cli import main
    from cxrdist.evaluation.runs import read_split

    with serve(shards) as (url, _):
        remote, local = read_split(url, "test", 0), read_split(str(shards), "test", 0)
        assert remote.reports == local.reports and (remote.references == local.references).all()
        preview = str(tmp_path / "p.png")
        inspected = CliRunner().invoke(main, ["shard", "inspect", url, "--verify", "--preview", preview])
        cached = CliRunner().invoke(main, ["shard", "cache-latents", url, "--pretrained", "preset:tiny"])
    assert inspected.exit_code == 0, inspected.output
    assert f"shard set   {url}" in inspected.output and "all sha256 match index.json" in inspected.output
    assert (tmp_path / "p.png").is_file()
    assert cached.exit_code != 0 and "needs a local shard set" in cached.output


def test_a_damaged_remote_shard_is_refused_when_it_has_streamed_in(shards, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(shards, copy)
    index = json.loads((copy / "index.json").read_text())
    victim = copy / index["splits"]["test"]["shards"][0]["name"]
    with tarfile.open(victim) as tar:  # a byte of the zero padding after a member: every sample still decodes
        member = next(m for m in tar.getmembers() if m.size % 512)
    data = bytearray(victim.read_bytes())
    data[member.offset_data + member.size] = 0xFF
    victim.write_bytes(bytes(data))
    with serve(copy) as (url, _):
        with pytest.raises(DataError, match=rf"{victim.name}: .* index.json says .*upload the shard set again"):
            _keys(eval_loader(url, "test", batch_size=2, image_size=32))
        problems = verify_checksums(url, raise_on_error=False)
        assert len(problems) == 1 and victim.name in problems[0]


def test_missing_index_and_missing_shard_are_one_line(shards, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(shards, copy)
    first = json.loads((copy / "index.json").read_text())["splits"]["test"]["shards"][0]["name"]
    (copy / first).unlink()
    with serve(copy) as (url, _):
        with pytest.raises(DataError, match=r"nothere/index.json is missing \(not found at the URL\): check"):
            load_index(url.replace("/set", "/nothere"))
        with pytest.raises(DataError, match=rf"{first} is missing \(not found at the URL\)") as err:
            _keys(eval_loader(url, "test", batch_size=2, image_size=32))
        assert "\n" not in str(err.value)


def test_pipe_commands_and_unknown_or_uninstalled_protocols(shards):
    pipe = f"pipe:cat {shards}/{{}}"
    assert _keys(eval_loader(pipe, "fold1", batch_size=4, image_size=32)) == _keys(
        eval_loader(shards, "fold1", batch_size=4, image_size=32))
    with pytest.raises(DataError, match=r"index.json could not be read \(the command exited with status 1\)"):
        load_index(f"pipe:cat {shards}/nothere/{{}}")
    with pytest.raises(DataError, match=r"fsspec knows no protocol 'nosuch': check data.shards"):
        load_index("nosuch://bucket/set")
    if importlib_missing("s3fs"):
        with pytest.raises(DataError, match=r"reading s3:// needs s3fs: pip install s3fs"):
            load_index("s3://bucket/set")


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None
