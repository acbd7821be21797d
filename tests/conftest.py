import os

import pytest
import torch

# The suite's problems are tiny: one intra-op thread is fastest for them, and it keeps timings
# steady when other work shares the machine (oversubscribed thread pools slow small ops ~10×).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fashion_mnist():
    """The local Fashion-MNIST files: skipped where they are not installed, a failure where
    they must be (CI installs them and sets SECONDORDER_REQUIRE_DATA=1)."""
    from secondorder.data import find_fashion_mnist

    found = find_fashion_mnist()
    if found is None:
        if os.environ.get("SECONDORDER_REQUIRE_DATA") == "1":
            pytest.fail("Fashion-MNIST must be installed here (SECONDORDER_REQUIRE_DATA=1)")
        pytest.skip("Fashion-MNIST is not installed")
    return found


def require_peers(why: str) -> None:
    """Skip a comparison with a peer package that is missing here; fail instead where the
    peers must be installed (``make test`` installs them and sets SECONDORDER_REQUIRE_PEERS=1),
    so that CI never counts a skipped comparison as a pass."""
    if os.environ.get("SECONDORDER_REQUIRE_PEERS") == "1":
        pytest.fail(f"a peer must be installed here (SECONDORDER_REQUIRE_PEERS=1): {why}")
    pytest.skip(why)
