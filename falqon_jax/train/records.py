"""A data set's records, read from wherever ``--data`` points: :func:`read_records`.

* a local JSON file (a list of objects) or JSON Lines file (one object per line), read here
  so that errors name the line;
* a local Parquet (``.parquet``) or Arrow (``.arrow``: the IPC stream format ``datasets``
  writes, or the IPC file format) file, read with pyarrow;
* a local directory: a data set saved with ``Dataset.save_to_disk``
  (``datasets.load_from_disk``), or data files laid out like a Hub data set repository
  (``datasets.load_dataset(directory, config, split=...)``);
* a Hugging Face Hub name, ``org/name`` or ``org/name@revision``: the repository's README
  (which declares its configurations) and the data files of the chosen configuration are
  fetched into the Hugging Face cache (:mod:`falqon_jax.hub`: progress bars, the user's
  token, ``HF_HUB_OFFLINE=1`` reads the cache only), then read with
  ``datasets.load_dataset`` from that snapshot, so configurations and splits mean what they
  mean in ``datasets``. A local path of the same name wins.

Records keep the data set's order, so the held-out split and the batches, drawn from it by
seed, are the same on every run. Errors raise :class:`DataError` with one line.
"""

from __future__ import annotations

import dataclasses
import json
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from falqon_jax import hub
from falqon_jax.cli import quiet_logger

TABLE_SUFFIXES = (".parquet", ".arrow")
# Data files of a Hub data set repository without declared configurations.
HUB_DATA_PATTERNS = ("*.parquet", "*.arrow", "*.json", "*.jsonl", "*.ndjson", "*.csv", "*.tsv",
                     "*.json.gz", "*.jsonl.gz", "*.jsonl.zst", "*.csv.gz")


class DataError(ValueError):
    """A problem with the user's data set; the message is one line that says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Records:
    """A data set's records in order.

    ``rows``: the records as read (objects are dicts); ``label`` and ``unit`` name them in
    errors (``"alpaca.json"``, ``"record"``: "alpaca.json record 3"); ``numbers[i]`` is row
    ``i``'s line or record number; ``columns``: the column names of a table (Parquet, Arrow,
    ``datasets``), ``None`` for JSON, whose records may differ in their keys.
    """

    rows: list[Any]
    label: str
    unit: str
    numbers: list[int]
    columns: tuple[str, ...] | None = None

    def where(self, i: int) -> str:
        """Row ``i``'s name in an error message."""
        return f"{self.label} {self.unit} {self.numbers[i]}"


def read_records(data: str | Path, *, split: str = "train", config: str | None = None) -> Records:
    """The records of ``data``: a local file or directory, or a Hub data set name (see the
    module docstring). ``split`` and ``config`` choose a split and a configuration of a data
    set directory or Hub data set; a single file is one split (``"train"``) and has no
    configurations."""
    path = Path(data)
    if path.is_dir():
        return _read_directory(path, split, config)
    if path.exists():
        if split != "train" or config is not None:
            raise DataError(f"{path} is a single file, one split: --data-split and --data-config "
                            "choose within a data set directory or Hub data set")
        if path.suffix == ".parquet":
            return _read_parquet(path)
        if path.suffix == ".arrow":
            return _read_arrow(path)
        return _read_json(path)
    name = hub.parse_name(str(data))
    if name is None or path.suffix in (".json", ".jsonl", *TABLE_SUFFIXES):
        raise DataError(f"data file {path} does not exist; pass --data PATH to an existing file "
                        "or a Hugging Face Hub data set name (org/name)")
    return _read_hub(name, split, config)


# --------------------------------------------------------------------------------------
# Local files.


def _read_json(path: Path) -> Records:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read data file {path}: {err}") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"data file {path} is empty")
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: malformed JSON at line {err.lineno}: {err.msg}") from None
        return Records(records, str(path), "record", list(range(1, len(records) + 1)))
    rows, numbers = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: malformed JSON on line {lineno}: {err.msg}") from None
        numbers.append(lineno)
    return Records(rows, str(path), "line", numbers)


def _table_records(table: Any, label: str) -> Records:
    if table.num_rows == 0:
        raise DataError(f"data set {label} is empty")
    rows = table.to_pylist()
    return Records(rows, label, "row", list(range(1, len(rows) + 1)), tuple(table.column_names))


def _read_parquet(path: Path) -> Records:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"cannot read {path} as Parquet: {_first_line(err)}") from None
    return _table_records(table, str(path))


def _read_arrow(path: Path) -> Records:
    """An Arrow IPC stream (what ``datasets`` writes) or IPC file (Feather v2)."""
    import pyarrow as pa

    errors = []
    for opener in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            with pa.memory_map(str(path)) as source:
                table = opener(source).read_all()
            return _table_records(table, str(path))
        except (OSError, pa.ArrowException) as err:
            errors.append(err)
    raise DataError(f"cannot read {path} as Arrow: {_first_line(errors[-1])}")


# --------------------------------------------------------------------------------------
# Data sets (through the datasets library).


def _read_directory(path: Path, split: str, config: str | None) -> Records:
    datasets = _import_datasets()
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read the saved data set {path}: {_first_line(err)}"
                            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"data set {path} has no split {split!r}; it has "
                                f"{', '.join(loaded)}: pass --data-split NAME")
            loaded = loaded[split]
        return _dataset_records(loaded, f"{path} ({split})")
    return _load_dataset(path, str(path), split, config)


def _read_hub(name: hub.HubName, split: str, config: str | None) -> Records:
    try:
        snapshot = hub.open_snapshot(name, "dataset", first=("README.md",))
    except hub.HubError as err:
        raise DataError(str(err)) from None
    configs = _declared_configs(snapshot.directory / "README.md")
    patterns: tuple[str, ...] = HUB_DATA_PATTERNS
    if configs:
        config = config or _default_config(configs, name)
        if config not in configs:
            raise DataError(f"data set {name} has no configuration {config!r}; it has "
                            f"{', '.join(configs)}: pass --data-config NAME")
        patterns = _config_patterns(configs[config])
    files = [f for f in snapshot.files if any(fnmatch(f, p) for p in patterns)]
    if not files:
        which = f" for configuration {config!r}" if configs else ""
        raise DataError(f"data set {name} holds no data files{which} that this tool reads "
                        "(Parquet, Arrow, JSON, JSON Lines, CSV)")
    extra = ["README.md"] if "README.md" in snapshot.files else []
    try:
        directory = hub.download(snapshot, extra + files)
    except hub.HubError as err:
        raise DataError(str(err)) from None
    return _load_dataset(directory, str(name), split, config)


def _declared_configs(readme: Path) -> dict[str, dict[str, Any]]:
    """The configurations a data set card's YAML header declares (``configs:``), as
    ``datasets`` reads them; empty when it declares none."""
    if not readme.is_file():
        return {}
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    try:  # "Repo card metadata block was not found" is normal for a data set README
        with quiet_logger("huggingface_hub.repocard"):
            card = DatasetCard.load(readme)
        return dict(MetadataConfigs.from_dataset_card_data(card.data))
    except (ValueError, TypeError, AttributeError):
        return {}  # an unreadable header: let datasets infer from the files


def _default_config(configs: dict[str, dict[str, Any]], name: hub.HubName) -> str:
    from datasets.utils.metadata import MetadataConfigs

    try:
        default = MetadataConfigs(configs).get_default_config_name()
    except ValueError:
        default = None
    if default is None:
        raise DataError(f"data set {name} has several configurations ({', '.join(configs)}): "
                        "pass --data-config NAME")
    return default


def _config_patterns(params: dict[str, Any]) -> tuple[str, ...]:
    """The file patterns of one declared configuration (``data_files``, under ``data_dir``)."""
    spec = params.get("data_files")
    data_dir = str(params.get("data_dir") or "").strip("/")
    if spec is None:
        found = HUB_DATA_PATTERNS
    else:
        items = spec if isinstance(spec, list) else [spec]
        found = []
        for item in items:
            paths = item.get("path") if isinstance(item, dict) else item
            found += paths if isinstance(paths, list) else [paths]
    prefix = f"{data_dir}/" if data_dir else ""
    return tuple(prefix + str(p).removeprefix("./") for p in found)


def _load_dataset(directory: Path, label: str, split: str, config: str | None) -> Records:
    datasets = _import_datasets()
    try:
        with quiet_logger("huggingface_hub.repocard"):
            loaded = datasets.load_dataset(str(directory), name=config, split=split)
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetGenerationError) as err:
        raise DataError(f"data set {label}: {_first_line(err)}") from None
    return _dataset_records(loaded, f"{label} ({split})")


def _dataset_records(dataset: Any, label: str) -> Records:
    if len(dataset) == 0:
        raise DataError(f"data set {label} is empty")
    rows = dataset.to_list()
    return Records(rows, label, "row", list(range(1, len(rows) + 1)),
                   tuple(dataset.column_names))


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("reading data set directories and Hub data sets needs the datasets "
                        "library: pip install datasets") from None
    return datasets


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
