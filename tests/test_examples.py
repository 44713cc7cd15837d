"""The examples and the README keep up with the code: every config key is shown in
examples/gateway.yaml, and every backend kind is named in the README."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from gateway.config.reader import keys_read, load_config
from gateway.config.schema import BACKEND_KINDS, config_keys

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "gateway.yaml"
ENV = {"OPS_KEY": "sk-ops-example"}  # the example's admin key comes from the environment


def shown_keys(data: dict[str, Any], path: str = "") -> set[str]:
    """The example's keys, spelled as config_keys() spells them: models.*.ttl, auth.keys[].key."""
    leaves = config_keys()
    found: set[str] = set()
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if not path and key in ("models", "backends", "nodes"):
            for item in value.values():
                found |= shown_keys(item, f"{key}.*")
        elif full in leaves or not isinstance(value, dict | list):
            found.add(full)
        elif isinstance(value, dict):
            found |= shown_keys(value, full)
        else:
            for item in value:
                found |= shown_keys(item, f"{full}[]") if isinstance(item, dict) else {full}
    return found


def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))


def test_the_example_shows_every_config_key() -> None:
    missing = config_keys() - shown_keys(example())
    assert not missing, f"examples/gateway.yaml does not show: {', '.join(sorted(missing))}"


def test_the_schema_names_every_key_the_reader_reads() -> None:
    """So that the walk above cannot miss a key: the reader asks for nothing else."""
    assert keys_read(example(), ENV) == config_keys()


def test_the_example_loads_cleanly() -> None:
    config = load_config(EXAMPLE, env=ENV)
    assert config.unknown_keys == () and config.warnings == ()
    assert {b.kind for b in config.backends.values()} == set(BACKEND_KINDS)
    assert {key.name for key in config.auth.keys} == {"ops", "team-a", "ci"}
    assert next(k for k in config.auth.keys if k.name == "team-a").secret == (
        "sk-team-a-example-only")  # key_file, found beside the example wherever it is run from


def test_the_readme_names_every_backend_kind() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    paragraph = readme[readme.index("Backend kinds (drivers):"):].split("\n\n", 1)[0]
    named = set(re.findall(r"`([a-z-]+)`", paragraph))
    assert set(BACKEND_KINDS) <= named, f"README lacks {set(BACKEND_KINDS) - named}"
