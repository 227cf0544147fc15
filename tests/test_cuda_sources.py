"""Fast, GPU-free checks that the CUDA backend is complete and built from the source list.

Every op schema declared in csrc/ops.cpp must have a CUDA kernel bound with
``m.impl("<name>", ...)`` inside ``TORCH_LIBRARY_IMPL(pysonic, CUDA, m)`` in some csrc/cuda/*.cu,
and every csrc/cuda/*.cu must be listed (group ``cuda``) in csrc/sources.txt, which is what
setup.py and tools/check_cuda.py compile.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import check_cuda  # noqa: E402


def _schemas() -> set[str]:
    text = (ROOT / "csrc" / "ops.cpp").read_text()
    block = text[text.index("TORCH_LIBRARY(pysonic, m)"):]
    return set(re.findall(r'm\.def\(\s*"([A-Za-z_][A-Za-z0-9_.]*)\(', block))


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _cuda_impls() -> dict[str, list[str]]:
    """op name -> the csrc/cuda files that bind it for the CUDA key."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        text = _strip_comments(path.read_text())
        for m in re.finditer(r"TORCH_LIBRARY_IMPL\(\s*pysonic\s*,\s*CUDA\s*,\s*(\w+)\s*\)\s*\{", text):
            var, depth, i = m.group(1), 1, m.end()
            while depth and i < len(text):  # the body of the block, braces balanced
                depth += {"{": 1, "}": -1}.get(text[i], 0)
                i += 1
            body = text[m.end():i]
            for name in re.findall(rf'\b{var}\.impl\(\s*"([A-Za-z_][A-Za-z0-9_]*)"', body):
                found.setdefault(name, []).append(path.name)
    return found


def test_schemas_are_found():
    # Guards the parser: the op library declares these (and maybe more).
    assert {"attention", "rvq_decode", "flow_step", "diffusion_step"} <= _schemas()


def test_every_op_has_a_cuda_kernel():
    impls = _cuda_impls()
    missing = sorted(_schemas() - set(impls))
    assert not missing, f"ops without a CUDA kernel (m.impl in csrc/cuda/*.cu): {missing}"


def test_each_cuda_kernel_is_bound_once_and_declared():
    impls = _cuda_impls()
    twice = {name: files for name, files in impls.items() if len(files) > 1}
    assert not twice, f"ops bound for CUDA more than once: {twice}"
    unknown = sorted(set(impls) - _schemas())
    assert not unknown, f"CUDA kernels for ops that csrc/ops.cpp does not declare: {unknown}"


def test_every_cuda_file_is_listed():
    listed = set(check_cuda.cuda_sources(ROOT))
    files = {f"csrc/cuda/{p.name}" for p in (ROOT / "csrc" / "cuda").glob("*.cu")}
    assert files, "no csrc/cuda/*.cu files"
    unlisted = sorted(files - listed)
    assert not unlisted, f"csrc/cuda files missing from csrc/sources.txt (as 'cuda <path>'): {unlisted}"
    absent = sorted(p for p in listed if not (ROOT / p).is_file())
    assert not absent, f"csrc/sources.txt lists cuda sources that do not exist: {absent}"


def test_kernels_are_headers_without_aten():
    # Device code stays framework-free: kernels/cuda/*.cuh never include ATen/torch/c10.
    for path in (ROOT / "kernels" / "cuda").glob("*.cuh"):
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', path.read_text())
        bad = [i for i in includes if i.split("/")[0] in ("ATen", "torch", "c10")]
        assert not bad, f"{path.name} includes {bad}"


def test_check_cuda_flags_cover_both_archs():
    flags = " ".join(check_cuda.nvcc_flags())
    for arch in ("80", "90"):
        assert f"arch=compute_{arch},code=sm_{arch}" in flags
    assert "-Werror" in flags and "-DPYSONIC_WITH_CUDA" in flags
