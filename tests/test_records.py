"""Data sets by Hugging Face Hub name and as local Parquet / Arrow files and directories.

References: the same records written as an Alpaca JSON file (read by the JSON reader the
project had before), and ``datasets`` reading the same Parquet file. Hub data sets come
from :mod:`tests.hub_server` through the real huggingface_hub and datasets.
"""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from falqon_jax.train import data
from falqon_jax.train.records import read_records

RECORDS = [{"instruction": f"Count to {i}.", "input": "" if i % 3 else f"start at {i % 5}",
            "output": " ".join(str(k) for k in range(i))} for i in range(1, 41)]
CHATS = [{"messages": [{"role": "user", "content": f"Say {i}."},
                       {"role": "assistant", "content": str(i)}]} for i in range(12)]


def parquet_bytes(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    return sink.getvalue()


@pytest.fixture
def alpaca_json(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(RECORDS))
    return path


def test_parquet_and_arrow_files_read_like_the_json_file(tmp_path, alpaca_json):
    import datasets

    want = data.read_examples(alpaca_json)
    parquet = tmp_path / "alpaca.parquet"
    parquet.write_bytes(parquet_bytes(RECORDS))
    reference = datasets.load_dataset("parquet", data_files=str(parquet), split="train",
                                      cache_dir=str(tmp_path / "cache"))
    assert read_records(parquet).rows == reference.to_list() == RECORDS
    assert data.read_examples(parquet) == want
    # Arrow: the IPC stream datasets writes (save_to_disk), and the IPC file format
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(saved))
    (stream,) = saved.glob("*.arrow")
    assert data.read_examples(stream) == want
    ipc = tmp_path / "alpaca.arrow"
    with pa.OSFile(str(ipc), "wb") as sink, pa.ipc.new_file(
            sink, pa.Table.from_pylist(RECORDS).schema) as writer:
        writer.write_table(pa.Table.from_pylist(RECORDS))
    assert data.read_examples(ipc) == want
    assert data.read_examples(saved) == want  # the save_to_disk directory itself
    # The held-out split and batches are drawn from the records in order: the same per seed.
    assert data.split(data.read_examples(parquet), 5, 3) == data.split(want, 5, 3)


def test_a_data_set_directory_with_splits(tmp_path):
    import datasets

    saved = tmp_path / "dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list(RECORDS[:30]),
        "test": datasets.Dataset.from_list(RECORDS[30:]),
    }).save_to_disk(str(saved))
    assert len(data.read_examples(saved)) == 30
    assert len(data.read_examples(saved, split="test")) == 10
    with pytest.raises(data.DataError, match="has no split 'dev'; it has train, test"):
        data.read_examples(saved, split="dev")
    # Data files laid out like a Hub repository: datasets infers the splits from the names.
    layout = tmp_path / "repo" / "data"
    layout.mkdir(parents=True)
    (layout / "train-00000-of-00001.parquet").write_bytes(parquet_bytes(RECORDS[:25]))
    (layout / "test-00000-of-00001.parquet").write_bytes(parquet_bytes(RECORDS[25:]))
    assert len(data.read_examples(layout.parent)) == 25
    assert len(data.read_examples(layout.parent, split="test")) == 15


@pytest.mark.parametrize("rows, message", [
    ([{"question": "a", "answer": "b"}], "has columns question, answer; expected "
     "instruction/input/output (Alpaca), text (### Human:/### Assistant:), messages (chat) or "
     "prompt/completion"),
    ([{"instruction": "a", "output": None}], "row 1: field 'output' is missing"),
    ([], "is empty"),
])
def test_tables_that_fit_no_format_are_one_line_errors(tmp_path, rows, message):
    path = tmp_path / "t.parquet"
    table = pa.Table.from_pylist(rows) if rows else pa.table({"text": pa.array([], pa.string())})
    pq.write_table(table, path)
    with pytest.raises(data.DataError) as info:
        data.read_examples(path)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_missing_local_file_is_not_taken_for_a_hub_name(tmp_path, fake_hub):
    with pytest.raises(data.DataError, match="data file data/alpaca.json does not exist"):
        data.read_examples("data/alpaca.json")
    assert not fake_hub.requests


MULTI_CARD = """---
configs:
- config_name: small
  default: true
  data_files:
  - split: train
    path: small/train-*
- config_name: chat
  data_files:
  - split: train
    path: chat/train-*
  - split: test
    path: chat/test-*
---
# A data set with two configurations
"""


def test_a_hub_data_set_by_name(fake_hub, alpaca_json, monkeypatch):
    from huggingface_hub import constants, scan_cache_dir

    fake_hub.add("tatsu-lab/alpaca", {
        "README.md": "---\nlicense: cc-by-nc-4.0\n---\n# Alpaca\n",
        "data/train-00000-of-00001-a09b74b3ef9c3b56.parquet": parquet_bytes(RECORDS),
        "assets/logo.png": b"\x89PNG"}, repo_type="dataset")
    want = data.read_examples(alpaca_json)
    assert data.read_examples("tatsu-lab/alpaca") == want
    assert fake_hub.downloaded("tatsu-lab/alpaca") == {
        "README.md", "data/train-00000-of-00001-a09b74b3ef9c3b56.parquet"}
    (repo,) = scan_cache_dir(constants.HF_HUB_CACHE).repos
    assert (repo.repo_id, repo.repo_type) == ("tatsu-lab/alpaca", "dataset")
    with pytest.raises(data.DataError, match=r"Unknown split \"test\""):
        data.read_examples("tatsu-lab/alpaca", split="test")
    fake_hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert data.read_examples("tatsu-lab/alpaca") == want  # from the cache alone
    with pytest.raises(data.DataError, match="org/other is neither a local path nor a data "
                       "set in the Hugging Face cache .*HF_HUB_OFFLINE is set"):
        data.read_examples("org/other")


def test_hub_configurations_fetch_only_their_files(fake_hub):
    fake_hub.add("org/multi", {
        "README.md": MULTI_CARD,
        "small/train-00000-of-00001.parquet": parquet_bytes(RECORDS[:20]),
        "chat/train-00000-of-00001.parquet": parquet_bytes(CHATS[:10]),
        "chat/test-00000-of-00001.parquet": parquet_bytes(CHATS[10:])}, repo_type="dataset")
    assert len(data.read_examples("org/multi")) == 20  # the default configuration
    assert fake_hub.downloaded("org/multi") == {"README.md", "small/train-00000-of-00001.parquet"}
    chats = data.read_examples("org/multi", config="chat", split="test")
    assert [c.messages for c in chats] == [(("user", "Say 10."), ("assistant", "10")),
                                           (("user", "Say 11."), ("assistant", "11"))]
    with pytest.raises(data.DataError, match="org/multi has no configuration 'nope'; it has "
                       "small, chat: pass --data-config NAME"):
        data.read_examples("org/multi", config="nope")
    fake_hub.add("org/nodefault", {"README.md": MULTI_CARD.replace("  default: true\n", "")},
                 repo_type="dataset")
    with pytest.raises(data.DataError, match=r"several configurations \(small, chat\): pass "
                       "--data-config NAME"):
        data.read_examples("org/nodefault")


@pytest.mark.parametrize("repo, message", [
    ("org/none", "org/none is neither a local path nor a data set on the Hugging Face Hub"),
    ("org/images", "org/images holds no data files that this tool reads"),
    ("org/columns", "has columns question, answer; expected"),
])
def test_unusable_hub_data_sets_are_one_line_errors(fake_hub, repo, message):
    fake_hub.add("org/images", {"README.md": "# pictures", "a.png": b"x"}, repo_type="dataset")
    fake_hub.add("org/columns", {"train.parquet": parquet_bytes([{"question": "q",
                                                                  "answer": "a"}])},
                 repo_type="dataset")
    with pytest.raises(data.DataError) as info:
        data.read_examples(repo)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_single_file_has_one_split(alpaca_json):
    with pytest.raises(data.DataError, match="is a single file, one split: --data-split"):
        data.read_examples(alpaca_json, split="test")
    with pytest.raises(data.DataError, match="single file"):
        data.read_examples(alpaca_json, config="x")
