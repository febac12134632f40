import os

import pytest




@pytest.fixture(scope="session", autouse=True)
def tidemind_cache_dir(tmp_path_factory):
    """Every test session converts GGUF files into its own cache, not ~/.cache/tidemind; set
    TIDEMIND_TEST_CACHE_DIR to keep conversions between sessions (faster reruns)."""
    path = os.environ.get("TIDEMIND_TEST_CACHE_DIR") or str(tmp_path_factory.mktemp("tidemind-cache"))
    previous = os.environ.get("TIDEMIND_CACHE_DIR")
    os.environ["TIDEMIND_CACHE_DIR"] = path
    yield path
    if previous is None:
        os.environ.pop("TIDEMIND_CACHE_DIR", None)
    else:
        os.environ["TIDEMIND_CACHE_DIR"] = previous
