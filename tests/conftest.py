import os
from pathlib import Path

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter; the variable must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from replica.testing import one_torch_thread, tiny_model_and_adapters


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The seeded tiny Llama and its PEFT adapters (replica.testing.TINY_ADAPTERS), built once."""
    return tiny_model_and_adapters(tmp_path_factory.getbasetemp() / "replica-tiny")


@pytest.fixture(scope="module")
def one_thread():
    """Modules of many tiny torch ops run them on one thread (see one_torch_thread)."""
    with one_torch_thread():
        yield
