"""Fixtures shared by every test module: one torch thread, and a YAML writer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

# The suite runs on small shared machines; one intra-op thread keeps runs predictable.
torch.set_num_threads(1)

WriteYaml = Callable[[str, Any], Path]


@pytest.fixture
def write_yaml(tmp_path: Path) -> Iterator[WriteYaml]:
    """``write_yaml(name, content) -> path`` under ``tmp_path``.

    ``content`` is a mapping (dumped as YAML) or a string (written verbatim, for
    deliberately broken files). ``name`` may contain sub-folders.
    """

    def write(name: str, content: Any) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        path.write_text(text)
        return path

    yield write
