"""Files of Hugging Face Hub repositories (models and data sets), by name.

A Hub name is ``org/name`` or ``org/name@revision`` (a branch, tag or commit;
:func:`parse_name`). :func:`open_snapshot` resolves a name to a commit, fetches a few small
files and lists the repository's files; :func:`download` then fetches the files the caller
chose into the same snapshot. Everything goes through ``huggingface_hub`` into the standard
Hugging Face cache (``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``), shared with
transformers, datasets and every other tool, with huggingface_hub's progress bars:

* gated and private repositories use the user's token (``HF_TOKEN`` or ``hf auth login``);
* with ``HF_HUB_OFFLINE=1``, or when the Hub cannot be reached, the cache is used alone;
* files land in the cache only once complete (huggingface_hub downloads to ``*.incomplete``
  and renames), and :func:`download` checks that every chosen file is there before it returns,
  so an interrupted download is resumed or reported, never used.

Every failure raises :class:`HubError` with one line that says what is wrong and what to do.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
_T = TypeVar("_T")


class HubError(ValueError):
    """A Hub name that cannot be used; the message is one line saying why and what to do."""


@dataclasses.dataclass(frozen=True)
class HubName:
    """A repository on the Hub and an optional revision (branch, tag or commit hash)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_name(text: str | os.PathLike[str]) -> HubName | None:
    """The Hub name ``text`` spells, ``org/name`` or ``org/name@revision``; ``None`` for anything
    else (a card name without a slash, ``./x``, ``/abs/path``, ``a/b/c``, ...).

    Whether a local path of that name exists is the caller's question: local paths win.
    """
    repo, at, revision = str(text).partition("@")
    if not _NAME.fullmatch(repo) or "--" in repo or ".." in repo or repo.endswith("."):
        return None
    if at and not revision.strip():
        return None
    return HubName(repo, revision or None)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A repository at one commit: ``directory`` is its snapshot folder in the cache (holding
    the files fetched so far) and ``files`` every file path of the repository at that commit
    (from the Hub, or from the listing huggingface_hub caches). ``listed`` is ``False`` when
    offline without a cached listing: ``files`` are then the snapshot's files alone."""

    name: HubName
    repo_type: str
    directory: Path
    files: tuple[str, ...]
    listed: bool = True

    @property
    def commit(self) -> str:
        return self.directory.name


def open_snapshot(name: HubName, repo_type: str, first: Iterable[str]) -> Snapshot:
    """Resolve ``name`` to a commit, fetch the files of ``first`` the repository has (small
    ones: a config, an index, a README) and list its files.

    ``repo_type`` is ``"model"`` or ``"dataset"``. Online this asks the Hub (two requests
    plus the files); offline it reads the cache. Raises :class:`HubError`.
    """
    from huggingface_hub import snapshot_download

    quiet = logging.getLogger("huggingface_hub._snapshot_download")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "No files matched": a repository without some of `first`
    try:
        directory = Path(_call(name, repo_type, lambda: snapshot_download(
            name.repo_id, repo_type=repo_type, revision=name.revision,
            allow_patterns=[_exact(f) for f in first],
            tqdm_class=_quiet_tqdm())))
    finally:
        quiet.setLevel(level)
    files = _listing(name, repo_type, directory)
    if files is None:
        local = tuple(sorted(p.relative_to(directory).as_posix()
                             for p in directory.rglob("*") if p.is_file()))
        return Snapshot(name, repo_type, directory, local, listed=False)
    return Snapshot(name, repo_type, directory, files)


def download(snapshot: Snapshot, files: Iterable[str]) -> Path:
    """Fetch ``files`` (paths in the repository) into ``snapshot``'s folder, with progress
    bars, and return the folder. Files already in the cache are not fetched again.

    Raises :class:`HubError` when a file is still missing afterwards (offline, or an
    interrupted download): nothing partial is handed on.
    """
    from huggingface_hub import snapshot_download

    wanted = sorted(set(files))
    missing = [f for f in wanted if not (snapshot.directory / f).is_file()]
    if missing:
        _call(snapshot.name, snapshot.repo_type, lambda: snapshot_download(
            snapshot.name.repo_id, repo_type=snapshot.repo_type, revision=snapshot.commit,
            allow_patterns=[_exact(f) for f in missing]), partly=missing)
    still = [f for f in wanted if not (snapshot.directory / f).is_file()]
    if still:
        raise HubError(_partly(snapshot.name, snapshot.repo_type, still))
    return snapshot.directory


def _partly(name: HubName, repo_type: str, missing: list[str]) -> str:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return (f"{_what(repo_type)} {name} is only partly in the Hugging Face cache ({_cache()}: "
            f"{shown} missing); {_how_to_get_online()}")


# --------------------------------------------------------------------------------------
# huggingface_hub calls and their errors.


def _exact(path: str) -> str:
    """An ``allow_patterns`` entry that matches ``path`` only (fnmatch syntax escaped)."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def _quiet_tqdm() -> Any:
    """A progress-bar class that shows nothing (for the few small files of a first look)."""
    from huggingface_hub.utils import tqdm

    class Quiet(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet


def _listing(name: HubName, repo_type: str, directory: Path) -> tuple[str, ...] | None:
    """Every file of the repository at the snapshot's commit: huggingface_hub's cached tree
    listing, else the Hub's; ``None`` offline when the cache has no listing."""
    from huggingface_hub import HfApi, constants, get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        tree = get_cached_repo_tree(name.repo_id, repo_type=repo_type, revision=directory.name)
        return tuple(sorted(f.path for f in tree))
    except CachedRepoTreeNotFoundError:
        pass
    if not constants.is_offline_mode():
        try:
            return tuple(sorted(HfApi().list_repo_files(name.repo_id, repo_type=repo_type,
                                                        revision=directory.name)))
        except Exception:  # no listing from the Hub: go by what the cache has
            pass
    return None


def _what(repo_type: str) -> str:
    return "data set" if repo_type == "dataset" else "model"


def _page(name: HubName, repo_type: str) -> str:
    from huggingface_hub import constants

    kind = "datasets/" if repo_type == "dataset" else ""
    return f"{constants.ENDPOINT}/{kind}{name.repo_id}"


def _cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _how_to_get_online() -> str:
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE is set: unset it to finish the download"
    return "check the network connection and run again to finish the download"


def _call(name: HubName, repo_type: str, call: Callable[[], _T],
          partly: list[str] | None = None) -> _T:
    """``call()``, with huggingface_hub's errors turned into one-line :class:`HubError`.

    ``partly``: the files being fetched into a snapshot already in the cache; if they cannot
    be fetched (offline, no network), the error says the repository is only partly cached.
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = _what(repo_type)
    try:
        return call()
    except GatedRepoError as err:
        raise HubError(_gated(name, repo_type, err)) from None
    except RepositoryNotFoundError:
        raise HubError(f"{name} is neither a local path nor a {what} on the Hugging Face Hub "
                       "(for a private one, log in with `hf auth login` or set HF_TOKEN)"
                       ) from None
    except RevisionNotFoundError:
        raise HubError(f"the {what} {name.repo_id} has no revision {name.revision!r} on the "
                       "Hugging Face Hub") from None
    except IncompleteSnapshotError:
        raise HubError(_partly(name, repo_type, partly or ["some files"])) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:
        raise HubError(_not_reachable(name, repo_type, err, partly)) from None
    except HfHubHTTPError as err:
        raise HubError(f"the Hugging Face Hub refused {what} {name}: "
                       f"{_first_line(err)}") from None
    except OSError as err:  # disk full, permissions
        raise HubError(f"downloading {what} {name} failed: {_first_line(err)}") from None
    except Exception as err:
        if type(err).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore",
                                                      "httpcore2"):
            raise
        # the connection dropped mid-file: the partial download stays *.incomplete, unused
        raise HubError(f"downloading {what} {name} failed ({type(err).__name__}: "
                       f"{_first_line(err)}); run again to resume") from None


def _gated(name: HubName, repo_type: str, err: Exception) -> str:
    """The message for a gated repository: no access yet (HTTP 403), or terms to accept."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 403:
        return (f"your Hugging Face token has no access to the gated {_what(repo_type)} {name} "
                f"yet: request it on {_page(name, repo_type)}")
    return (f"{name} is a gated {_what(repo_type)}: accept its terms on "
            f"{_page(name, repo_type)}, then log in with `hf auth login` or set HF_TOKEN")


def _not_reachable(name: HubName, repo_type: str, err: Exception,
                   partly: list[str] | None) -> str:
    """The message for files neither in the cache nor downloadable (offline, no network).

    ``partly``: the files being fetched into a snapshot already in the cache, if any.
    """
    from huggingface_hub import constants

    if partly:
        return _partly(name, repo_type, partly)
    what = _what(repo_type)
    if constants.is_offline_mode():
        return (f"{name} is neither a local path nor a {what} in the Hugging Face "
                f"cache ({_cache()}), and HF_HUB_OFFLINE is set: unset it to download it")
    cause = err.__cause__ or err
    return (f"{name} is neither a local path nor a {what} in the Hugging Face "
            f"cache ({_cache()}), and the Hub cannot be reached "
            f"({type(cause).__name__}): check the network connection")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
