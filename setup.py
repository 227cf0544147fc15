"""Build pysonic and its compiled extension ``pysonic._C``.

The compiled sources are listed once, in ``csrc/sources.txt`` (CMakeLists.txt reads the same
file). Environment knobs:

* ``PYSONIC_CUDA=auto|0|1``: build the CUDA kernels. ``auto`` (default) builds them when torch
  is a CUDA build and a CUDA toolkit is found; ``1`` makes their absence an error.
* ``TORCH_CUDA_ARCH_LIST``: CUDA architectures, honoured by torch's build helpers.
* ``PYSONIC_CPU_ARCH``: value for ``-march`` (default ``native``: the CPU kernels are tuned for
  the machine that builds them; set e.g. ``x86-64-v3`` to build portable binaries).

Build against the torch you already have: ``pip install --no-build-isolation -e .``.
"""
import os
import platform
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()


def read_sources(groups):
    """Return the sources of ``groups`` from csrc/sources.txt, relative to the repo root."""
    sources = []
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        group, path = line.split()
        if group in groups:
            if not (ROOT / path).exists():
                raise FileNotFoundError(f"csrc/sources.txt lists {path}, which does not exist")
            sources.append(path)
    return sources


def cpu_capability(march):
    """The at::vec capability the compiler will target with -march=<march> (AVX512, AVX2 or DEFAULT)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "DEFAULT"
    try:
        out = subprocess.run(
            ["c++", f"-march={march}", "-dM", "-E", "-x", "c++", "/dev/null"],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "DEFAULT"
    have = lambda name: f"#define {name} 1" in out
    if all(have(f) for f in ("__AVX512F__", "__AVX512BW__", "__AVX512VL__", "__AVX512DQ__")):
        return "AVX512"
    if have("__AVX2__") and have("__FMA__"):
        return "AVX2"
    return "DEFAULT"


def want_cuda():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    mode = os.environ.get("PYSONIC_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"PYSONIC_CUDA must be auto, 0 or 1, got {mode!r}")
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if mode == "1" and not possible:
        raise RuntimeError(
            "PYSONIC_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    return possible and mode != "0"


def extensions():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    march = os.environ.get("PYSONIC_CPU_ARCH", "native")
    capability = cpu_capability(march)
    cuda = want_cuda()
    cxx = [
        "-O3", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas",
        f"-DPYSONIC_VERSION=\"{VERSION}\"",
        f"-DPYSONIC_CPU_ISA=\"{capability}\"",
        f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}",
    ]
    if platform.machine() in ("x86_64", "AMD64"):
        cxx.append(f"-march={march}")
    sources = read_sources({"common", "cpu"} | ({"cuda"} if cuda else set()))
    kwargs = dict(
        name="pysonic._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc"), str(ROOT / "kernels" / "cuda")],
        extra_link_args=["-fopenmp"],
    )
    if cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "default")
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-DPYSONIC_WITH_CUDA", f"-DPYSONIC_CUDA_ARCHS=\"{archs}\""]
        return [CUDAExtension(**kwargs, extra_compile_args={"cxx": cxx + ["-DPYSONIC_WITH_CUDA", f"-DPYSONIC_CUDA_ARCHS=\"{archs}\""], "nvcc": nvcc})]
    return [CppExtension(**kwargs, extra_compile_args={"cxx": cxx})]


VERSION = "0.1.0"

if __name__ == "__main__":
    from torch.utils.cpp_extension import BuildExtension

    setup(
        version=VERSION,
        packages=find_packages(include=["pysonic", "pysonic.*"]) + ["pysonic.triton_kernels"],
        # Triton kernels live beside the CUDA ones in kernels/; they ship as pysonic.triton_kernels.
        package_dir={"pysonic": "pysonic", "pysonic.triton_kernels": "kernels/triton"},
        # WaveGrad noise schedules found by pysonic's own search (pysonic.models.wavegrad.search);
        # the shipped default model (pysonic.generate without a checkpoint): weights, configs, card.
        package_data={"pysonic.models.wavegrad": ["schedules.json"],
                      "pysonic": ["assets/default/*.json", "assets/default/*.safetensors", "assets/default/*.md",
                                  "assets/default/*/*.json", "assets/default/*/*.safetensors"]},
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
