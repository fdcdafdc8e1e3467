"""Test environment: a private HF_HOME and a loopback test Hub, set up before anything imports huggingface_hub.

huggingface_hub and transformers read their endpoint and cache settings when first imported, so the
session-wide test Hub (`tests/hubserver.py`) is started here, at import, and `HF_ENDPOINT` points at it:
nothing can reach huggingface.co, and Hub tests use the real clients over HTTP. Tests that load local paths
never contact it. No `HF_TOKEN`: tests that write pass the `hf_token` fixture explicitly.
"""

import os
import tempfile
from collections.abc import Iterator

import pytest

from tests.hubserver import DEFAULT_TOKENS, HubServer, start_server

HUB = start_server()

_HF_HOME = tempfile.mkdtemp(prefix="hubmerge-tests-hf-")
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ["HF_ENDPOINT"] = HUB.url
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
os.environ["HF_HUB_DISABLE_XET"] = "1"  # the test Hub speaks LFS only
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
for _name in ("HF_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.pop(_name, None)


@pytest.fixture
def hub() -> Iterator[HubServer]:
    """The session's test Hub, emptied and without faults after each test."""
    yield HUB
    HUB.reset()
    HUB.clear_faults()


@pytest.fixture
def hf_token() -> str:
    """A token of `alice`, who owns the `alice/...` namespace on the test Hub."""
    return next(token for token, user in DEFAULT_TOKENS.items() if user == "alice")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped, with the reason, where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
