#!/usr/bin/env python
"""Compile every CUDA source of csrc/sources.txt with nvcc, warnings as errors (compile only).

Machines without a GPU (and with torch's CPU wheel, which ships the ATen/c10 CUDA headers but no
CUDA libraries) can still prove that the CUDA kernels build for sm_80 and sm_90: each ``cuda``
source is compiled with ``-c`` to an object in a temporary directory; nothing is linked (unless --link-check, below).

Usage: ``python tools/check_cuda.py [--jobs N] [--nvcc PATH] [--link-check] [FILE ...]``. Prints
one line per file with its compile time; exits 1 if any file fails (its diagnostics are printed),
2 if nvcc cannot be found.

``--link-check`` goes one step further: it links the objects with the common sources (csrc/ops.cpp,
csrc/block_cache.cpp) into a throwaway ``_C`` module (against torch's CPU libraries and libcudart)
and imports it in a subprocess with lazy symbol binding (the c10_cuda functions the launchers call
are absent from a CPU wheel but are never called). Loading runs every ``TORCH_LIBRARY_IMPL(pysonic,
CUDA, m)``, so a launcher whose C++ signature does not match its schema fails here, as it would on
import on a GPU machine; the check also asserts that every declared op then has a CUDA kernel.

Flags mirror torch's extension build (torch.utils.cpp_extension): its COMMON_NVCC_FLAGS
(-D__CUDA_NO_HALF_OPERATORS__ ... --expt-relaxed-constexpr), -DTORCH_EXTENSION_NAME=_C,
-DTORCH_API_INCLUDE_EXTENSION_H, -D_GLIBCXX_USE_CXX11_ABI=<torch's>, plus setup.py's
-DPYSONIC_WITH_CUDA, and the include paths of torch, csrc/, kernels/cuda/ and Python.
Warnings are errors (-Werror all-warnings for nvcc, -Wall -Werror for the host compiler).
No warning is silenced. One define works around the CPU wheel: it lacks the generated
c10/cuda/impl/cuda_cmake_macros.h, so -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE is passed when that file
is missing (the header only sets a Windows DLL-export macro).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("80", "90")


def group_sources(group: str, root: Path = ROOT) -> list[str]:
    """The sources of one group of csrc/sources.txt, relative to the repo root."""
    out = []
    for line in (root / "csrc" / "sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        kind, path = line.split()
        if kind == group:
            out.append(path)
    return out


def cuda_sources(root: Path = ROOT) -> list[str]:
    """The ``cuda`` group of csrc/sources.txt, relative to the repo root."""
    return group_sources("cuda", root)


def find_nvcc(explicit: str | None) -> str | None:
    candidates = [explicit] if explicit else []
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates += ["/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc", shutil.which("nvcc")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def nvcc_flags() -> list[str]:
    import torch
    from torch.utils import cpp_extension

    flags = ["-std=c++20", "-O3", "-Xcompiler", "-fPIC,-Wall,-Werror", "-Werror", "all-warnings"]
    for arch in ARCHS:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    flags += list(cpp_extension.COMMON_NVCC_FLAGS)
    flags += [
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DPYSONIC_WITH_CUDA",
        '-DPYSONIC_CUDA_ARCHS="8.0;9.0"',
    ]
    includes = list(cpp_extension.include_paths())
    macros = Path(includes[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not macros.exists():
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    includes += [str(ROOT / "csrc"), str(ROOT / "kernels" / "cuda"), sysconfig.get_paths()["include"]]
    flags += [f"-I{p}" for p in includes]
    return flags


def compile_one(nvcc: str, flags: list[str], src: str, outdir: str) -> tuple[str, bool, float, str]:
    obj = os.path.join(outdir, src.replace("/", "_") + ".o")
    start = time.monotonic()
    proc = subprocess.run([nvcc, *flags, "-c", str(ROOT / src), "-o", obj], capture_output=True, text=True)
    elapsed = time.monotonic() - start
    ok = proc.returncode == 0 and os.path.exists(obj)
    return src, ok, elapsed, (proc.stdout + proc.stderr).strip()


def link_check(outdir: str, sources: list[str]) -> bool:
    """Links the CUDA objects with the common sources (csrc/ops.cpp, ...) into a module ``_C``
    and loads it lazily."""
    from torch.utils import cpp_extension

    start = time.monotonic()
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", str(Path(find_nvcc(None) or "/").resolve().parent.parent)]
    cuda_lib = next((Path(h) / "lib64" for h in homes if h and (Path(h) / "lib64" / "libcudart.so").exists()), None)
    if cuda_lib is None:
        print("FAIL link-check: libcudart.so not found (set CUDA_HOME)", flush=True)
        return False
    includes = [*cpp_extension.include_paths(), str(ROOT / "csrc"), sysconfig.get_paths()["include"]]
    import torch

    defines = ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DPYSONIC_WITH_CUDA",
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    # The "common" group (csrc/ops.cpp and the code it calls outside the kernels).
    common = [(str(ROOT / src), os.path.join(outdir, "common_" + Path(src).stem + ".o")) for src in group_sources("common")]
    # Data symbols cannot bind lazily: define the one libc10_cuda object the c10/cuda headers'
    # inline code (CUDAGuardImpl) refers to. Only this throwaway module contains it.
    stub_src, stub_obj = os.path.join(outdir, "c10_cuda_stub.cpp"), os.path.join(outdir, "c10_cuda_stub.o")
    Path(stub_src).write_text(
        "#include <c10/cuda/CUDACachingAllocator.h>\n"
        "namespace c10::cuda::CUDACachingAllocator { std::atomic<CUDAAllocator*> allocator; }\n")
    macros = Path(cpp_extension.include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub_defines = [] if macros.exists() else ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    cuda_inc = cuda_lib.parent / "include"
    steps = [
        *(["c++", "-std=c++20", "-O0", "-fPIC", "-c", src, "-o", obj, *defines, *(f"-I{p}" for p in includes)]
          for src, obj in common),
        ["c++", "-std=c++20", "-O0", "-fPIC", "-c", stub_src, "-o", stub_obj, *defines, *stub_defines,
         f"-I{cuda_inc}", *(f"-I{p}" for p in includes)],
        ["c++", "-shared", "-o", os.path.join(outdir, "_C.so"), *(obj for _, obj in common), stub_obj,
         *(os.path.join(outdir, s.replace("/", "_") + ".o") for s in sources),
         *(f"-L{p}" for p in cpp_extension.library_paths()), f"-L{cuda_lib}",
         "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python", "-lcudart",
         *(f"-Wl,-rpath,{p}" for p in [*cpp_extension.library_paths(), str(cuda_lib)])],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"FAIL link-check: {' '.join(cmd[:3])} ...\n{proc.stderr[-4000:]}", flush=True)
            return False
    probe = (
        "import os, sys, re, torch\n"
        "sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_GLOBAL)\n"
        f"sys.path.insert(0, {outdir!r})\n"
        "import _C\n"
        f"text = open({str(ROOT / 'csrc' / 'ops.cpp')!r}).read()\n"
        "names = re.findall(r'm\\.def\\(\\s*\"([A-Za-z_0-9]+)\\(', text)\n"
        "missing = [n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f'pysonic::{n}', 'CUDA')]\n"
        "assert names and not missing, f'ops without a CUDA kernel: {missing}'\n"
        "print(len(names))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    ok = proc.returncode == 0
    detail = f"{proc.stdout.strip()} ops registered for CUDA" if ok else proc.stderr.strip()[-4000:]
    print(f"{'ok  ' if ok else 'FAIL'} link-check {time.monotonic() - start:.1f}s: {detail}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", "-j", type=int, default=1, help="parallel nvcc processes (default 1)")
    parser.add_argument("--nvcc", default=None, help="path of nvcc (default: $CUDA_HOME/bin/nvcc, /usr/local/bin/nvcc, PATH)")
    parser.add_argument("--link-check", action="store_true", help="also link and load the CUDA registrations (see above)")
    parser.add_argument("files", nargs="*", help="only these sources (default: every cuda source of csrc/sources.txt)")
    args = parser.parse_args(argv)
    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("check_cuda: nvcc not found (set CUDA_HOME or pass --nvcc)", file=sys.stderr)
        return 2
    sources = args.files or cuda_sources()
    missing = [s for s in sources if not (ROOT / s).is_file()]
    if missing:
        print(f"check_cuda: missing sources: {', '.join(missing)}", file=sys.stderr)
        return 1
    if not sources:
        print("check_cuda: no cuda sources listed in csrc/sources.txt", file=sys.stderr)
        return 1
    flags = nvcc_flags()
    failed = 0
    total = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pysonic-check-cuda-") as outdir:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for src, ok, elapsed, log in pool.map(lambda s: compile_one(nvcc, flags, s, outdir), sources):
                print(f"{'ok  ' if ok else 'FAIL'} {src} {elapsed:.1f}s", flush=True)
                if not ok:
                    failed += 1
                    print(log, flush=True)
        linked = not args.link_check or (not failed and link_check(outdir, sources))
    print(f"check_cuda: {len(sources) - failed}/{len(sources)} compiled for sm_{', sm_'.join(ARCHS)} "
          f"in {time.monotonic() - total:.1f}s ({nvcc})")
    return 1 if failed or not linked else 0


if __name__ == "__main__":
    sys.exit(main())
