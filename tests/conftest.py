import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)
# Two xdist workers share the 2 cores: one intra-op thread each.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def load_tool(monkeypatch):
    """load_tool("eval_listops") -> the module tools/eval_listops.py, imported for this test only."""
    import importlib.util
    import pathlib
    import sys

    def load(name: str):
        path = pathlib.Path(__file__).resolve().parent.parent / "tools" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
        tool = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, tool)  # dataclasses look their module up there
        monkeypatch.setattr(sys, "path", list(sys.path))  # tools prepend tools/ and the repo root
        spec.loader.exec_module(tool)
        return tool
    return load
