import pytest
import torch

# The suite's problems are tiny: one intra-op thread is fastest for them, and it keeps timings
# steady when other work shares the machine (oversubscribed thread pools slow small ops ~10×).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
