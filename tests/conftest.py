import os
import shutil

import pytest

LONG = os.environ.get("CLOUDLESS_LONG") == "1"


def pytest_collection_modifyitems(config, items):
    is_root = os.geteuid() == 0
    for item in items:
        if "slow" in item.keywords and not LONG:
            item.add_marker(pytest.mark.skip(reason="long mode only: set CLOUDLESS_LONG=1"))
        if "root" in item.keywords and not is_root:
            item.add_marker(pytest.mark.skip(reason="needs root"))


@pytest.fixture
def cloudless_bin():
    """Path of the installed `cloudless` console script (the venv's)."""
    path = shutil.which("cloudless") or os.path.join(os.path.dirname(os.sys.executable), "cloudless")
    assert os.path.exists(path), "cloudless console script is not installed"
    return path
