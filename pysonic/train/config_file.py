"""Reading training config files (YAML, JSON or TOML) into a dict, with errors that name the file."""
from __future__ import annotations

import json
from pathlib import Path


def read_config_file(path: str | Path, *, what: str = "training config") -> dict:
    """Parse ``path`` by its suffix: ``.yaml``/``.yml`` (PyYAML), ``.toml``, else JSON.

    Args:
        path: the file.
        what: how errors name the file (e.g. ``"train tangoflux config"``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unparsable, PyYAML missing for a YAML file, or not a mapping at the top.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {str(path)!r}")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError("reading YAML needs PyYAML (pip install pyyaml); or write the config as JSON") from None
            try:
                cfg = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(str(exc)) from None
        elif suffix == ".toml":
            import tomllib

            cfg = tomllib.loads(text)
        else:
            cfg = json.loads(text)
    except ValueError as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(f"{what}: cannot parse {str(path)!r}: {exc}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{what}: {str(path)!r} must hold a mapping of settings")
    return cfg
