import os

# Triton kernels run on CPU tensors through the interpreter in the test run (no GPU here).
# Must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# CI sets PYSONIC_STRICT_SKIPS=1: a skipped test then fails unless its reason is one that no
# setting of this machine can remove (no GPU). A missing peer package or backend can thus never
# pass as "skipped".
ALLOWED_SKIP_REASONS = ("CUDA device", "needs a GPU")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("PYSONIC_STRICT_SKIPS") == "1" and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in ALLOWED_SKIP_REASONS):
            report.outcome = "failed"
            report.longrepr = f"skipped under PYSONIC_STRICT_SKIPS=1: {reason}"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: on a loaded 2-core machine one thread runs
    small convolutions and matmuls several times faster than two (no OpenMP waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
