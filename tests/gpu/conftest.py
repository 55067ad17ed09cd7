"""tests/gpu/: tests that need a CUDA device (kernels, compiled training steps, FA3/varlen attention).

Every test collected here is marked `gpu` and skipped when torch sees no CUDA device, so the
CPU-only CI runs `python3 -m pytest -q tests` unchanged; select or deselect them with `-m gpu` /
`-m "not gpu"`. The session fixtures of tests/conftest.py (tiny_tokenizer, tiny_dataset,
make_hparams) are available here too.
"""
import os

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    # this hook sees the whole session's items, so pick out the ones under this folder
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if os.path.abspath(str(item.fspath)).startswith(HERE + os.sep):
            item.add_marker(pytest.mark.gpu)
            if skip:
                item.add_marker(skip)
