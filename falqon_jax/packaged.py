"""Files that ship with the package: model cards and training recipes.

In the repository they live at the top level (``models/``, ``train/``); a wheel or a
non-editable install carries them inside the package as ``falqon_jax/cards`` and
``falqon_jax/recipes`` (``pyproject.toml`` maps one onto the other). These functions find
whichever is there, so an editable install, a wheel and a clone run from any directory
resolve the same names.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def _folder(packaged: str, source: str) -> Path:
    inside = PACKAGE / packaged
    return inside if inside.is_dir() else PACKAGE.parent / source


def cards_dir() -> Path:
    """The folder of the model cards shipped with the package (``NAME.toml``)."""
    return _folder("cards", "models")


def recipes_dir() -> Path:
    """The folder of the training recipes shipped with the package (``NAME.toml``)."""
    return _folder("recipes", "train")


def names(folder: Path) -> list[str]:
    """The ``*.toml`` names (without the suffix) in ``folder``, sorted; none if missing."""
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def install_command(extra: str) -> str:
    """The pip command that adds ``extra`` (e.g. ``"h100"``) to this installation, in the
    form that fits how the package was installed: ``pip install -e "DIR[extra]"`` for an
    editable install of a clone, ``pip install "falqon-jax[extra] @ URL"`` for one from a
    local folder, a wheel or a git URL, else ``pip install "falqon-jax[extra]"``."""
    import json
    from importlib import metadata

    fallback = f'pip install "falqon-jax[{extra}]"'
    # the installed one records how it was installed (a source tree's own egg-info, found
    # first when Python runs in the clone, does not)
    texts = [d.read_text("direct_url.json") for d in metadata.distributions(name="falqon-jax")]
    try:
        info = next((json.loads(t) for t in texts if t), {})
    except ValueError:
        return fallback
    url = info.get("url", "") if isinstance(info, dict) else ""
    if not url:
        return fallback
    if info.get("dir_info", {}).get("editable"):
        folder = url.removeprefix("file://")
        return f'pip install -e "{folder}[{extra}]"'
    vcs = info.get("vcs_info", {})
    if vcs.get("vcs"):
        url = f"{vcs['vcs']}+{url}"
    return f'pip install "falqon-jax[{extra}] @ {url}"'
