import os

import pytest
import torch

# Triton kernels (tests/test_kernels.py) run under Triton's CPU interpreter where there is no GPU;
# the variable is read when a kernel is decorated, so it is set before any test module imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fix_triton_interpreter_loop_bounds() -> None:
    """Triton 3.6's interpreter turns a loop bound loaded from memory (a shape-(1,) array) into an
    int with int(array), which numpy >= 2.4 refuses (triton-lang/triton#9171, fixed after 3.6):
    squeeze it first. Only the interpreter is patched; compiled kernels are not affected."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton: tests/test_kernels.py skips itself
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_squeezed_index(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_with_squeezed_index


if os.environ.get("TRITON_INTERPRET") == "1":
    _fix_triton_interpreter_loop_bounds()


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
