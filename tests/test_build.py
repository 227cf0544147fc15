"""The package imports and works with and without the compiled extension."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pysonic

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_reports_the_build():
    info = pysonic.build_info()
    if not info["compiled"]:
        pytest.fail(f"the compiled extension did not load: {info['error']}")
    assert info["version"] == pysonic.__version__
    assert info["cpu_isa"] in ("AVX512", "AVX2", "DEFAULT")
    assert isinstance(info["cuda"], bool)
    # Importing pysonic._C registered the ops with the dispatcher.
    for op in ("attention", "rotary", "conformer_conv", "rvq_encode", "rvq_decode", "flow_step", "diffusion_step", "diffusion_step_x0"):
        assert hasattr(torch.ops.pysonic, op), op


def test_import_pysonic_first_loads_the_extension():
    # pysonic._C links against libtorch: importing pysonic before torch must still load it.
    code = "import pysonic; info = pysonic.build_info(); assert info['compiled'], info; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_import_without_extension_warns_and_uses_reference():
    # A failed or missing build must leave pysonic usable on the reference path.
    code = textwrap.dedent(
        """
        import sys, warnings

        class BlockExtension:
            def find_spec(self, name, path=None, target=None):
                if name == "pysonic._C":
                    raise ImportError("simulated missing build")

        sys.meta_path.insert(0, BlockExtension())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import pysonic
        messages = [str(w.message) for w in caught if "pysonic" in str(w.message)]
        assert len(messages) == 1 and "pip install" in messages[0], messages
        assert "\\n" not in messages[0], "the warning must be one line"
        import torch
        x = torch.randn(2, 5)
        torch.testing.assert_close(pysonic.ops.flow_step(x, x, None, 0.5, 1.0), 1.5 * x)
        try:
            pysonic.ops.flow_step(x, x, None, 0.5, 1.0, backend="cpp")
        except pysonic.ops.BackendUnavailable as exc:
            assert "pysonic._C" in str(exc), exc
        else:
            raise AssertionError("backend='cpp' without the extension must raise")
        assert pysonic.build_info()["compiled"] is False
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
