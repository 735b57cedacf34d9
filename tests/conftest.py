import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py helpers

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Triton kernels run under Triton's CPU interpreter on a machine without CUDA. The variable is read when
# triton is imported, which any test module may cause first (transformers, torch._inductor), so it is set
# here, before collection. `make test` sets DPENGINE_REQUIRE_TRITON=1: there a kernel test module that
# would skip for want of triton fails instead, so CI cannot pass without running the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def require_triton():
    """``triton`` for kernel test modules, ready to run: on a machine without CUDA, under the interpreter.
    Skipped where triton is absent or was imported before TRITON_INTERPRET=1 was set; an error instead
    where CI requires the kernels to run."""
    required = os.environ.get("DPENGINE_REQUIRE_TRITON") == "1"
    if required:
        import triton  # noqa: PLC0415 - raises ImportError, failing the module, if missing
    else:
        triton = pytest.importorskip("triton", reason="triton is not installed (pip install dpengine[test]); "
                                                      "the Triton kernels cannot be tested")
    if not torch.cuda.is_available() and not triton.knobs.runtime.interpret:
        kernels_unavailable("triton was imported before TRITON_INTERPRET=1 could be set: the kernels cannot run "
                            "on this CPU-only machine")
    return triton


def kernels_unavailable(reason: str) -> None:
    """Skip a kernel test module (fail it where CI requires the kernels to run)."""
    if os.environ.get("DPENGINE_REQUIRE_TRITON") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: a second thread only spins (slow on a shared machine).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


#: torch's process-wide float32 precision switches (backend, op) of the new API (torch >= 2.9)
FP32_SWITCHES = [("generic", "all"), ("cuda", "matmul"), ("cuda", "conv"), ("cuda", "rnn"), ("mkldnn", "matmul"),
                 ("mkldnn", "conv"), ("mkldnn", "rnn")]


def fp32_state() -> tuple:
    """(legacy float32_matmul_precision or None where the APIs were mixed and it cannot be read, the
    per-(backend, op) values)."""
    try:
        legacy = torch._C._get_float32_matmul_precision()
    except RuntimeError:
        legacy = None
    raw = tuple(torch._C._get_fp32_precision_getter(*k) for k in FP32_SWITCHES) \
        if hasattr(torch._C, "_get_fp32_precision_getter") else ()
    return legacy, raw


@pytest.fixture
def restore_fp32_switches():
    """Put torch's process-wide float32 precision switches (legacy and per backend/op) back after a test."""
    legacy, raw = fp32_state()
    legacy_flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) if not raw else None
    yield
    if legacy_flags is not None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = legacy_flags
        return
    torch._C._set_float32_matmul_precision(legacy or "highest")
    for k, v in zip(FP32_SWITCHES, raw):
        torch._C._set_fp32_precision_setter(*k, v)
