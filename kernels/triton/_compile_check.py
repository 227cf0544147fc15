"""Check the GPU path of the Triton kernels on a machine without a GPU.

Run from a source checkout with TRITON_INTERPRET unset::

    python kernels/triton/_compile_check.py [--arch 90]

1. Traces the body of every ``pysonic::*_triton`` op (the ``triton_op`` implementation used on
   CUDA tensors) on fake CUDA tensors, as ``torch.compile``'s functional decomposition does: each
   kernel launch must become a ``triton_kernel_wrapper_mutation`` node (no host sync, no data
   access), for model-sized shapes in every dtype.
2. Compiles each traced launch (the exact constexprs and tile sizes the host code picked) to a
   cubin for ``sm_<arch>`` and, when ptxas is found, prints registers and spill bytes.

Exit status 1 if a body fails to trace or a kernel fails to compile.
"""
from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run with TRITON_INTERPRET unset: this checks the compiled (GPU) path")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import triton  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.fx.experimental.proxy_tensor import make_fx  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from pysonic.ops import _triton  # noqa: E402

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32"}


def _body(op):
    """The Python body of a triton_op (triton_op wraps it in a backend function)."""
    return inspect.getclosurevars(op._init_fn).nonlocals["fn"]


def _cases(m):
    """(name, op body, argument builder) for model-sized shapes; builders run in fake mode."""
    def E(*shape, dt=torch.float32):
        return torch.empty(*shape, device="cuda", dtype=dt)

    def L(*shape):
        return torch.empty(*shape, device="cuda", dtype=torch.int64)

    cases = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        cases.append((f"elu_out {dt}", _body(m.elu.elu_out), lambda dt=dt: (E(1, 32, 1, 240000, dt=dt), 1.0,
                                                                              E(1, 32, 1, 240000, dt=dt))))
        for D in (64, 128):
            def att(dt=dt, D=D):
                q, k = E(2, 8, 300, D, dt=dt), E(2, 2, 333, D, dt=dt)
                return (q, k, k, True, None, L(2))
            def att_bwd(dt=dt, D=D):
                q, k = E(2, 8, 300, D, dt=dt), E(2, 2, 333, D, dt=dt)
                return (q, q, k, k, q, E(2, 8, 300), True, None, L(2))
            cases += [(f"attention {dt} D={D}", _body(m.attention.attention), att),
                      (f"attention_backward {dt} D={D}", _body(m.attention.attention_backward), att_bwd)]
        if dt == torch.float16:
            continue
        cases += [
            (f"rotary {dt}", _body(m.rotary.rotary), lambda dt=dt: (E(2, 8, 300, 64, dt=dt), E(300, 16), E(300, 16), True)),
            (f"conformer_conv {dt}", _body(m.conformer_conv.conformer_conv),
             lambda dt=dt: (E(4, 500, 512, dt=dt), E(256, 31, dt=dt), E(256, dt=dt), False)),
            (f"conformer_conv_backward {dt}", _body(m.conformer_conv.conformer_conv_backward),
             lambda dt=dt: (E(4, 500, 256, dt=dt), E(4, 500, 512, dt=dt), E(256, 31, dt=dt), E(256, dt=dt), True)),
            (f"rvq_encode {dt}", _body(m.rvq.rvq_encode), lambda dt=dt: (E(4, 750, 128, dt=dt), E(8, 1024, 128, dt=dt), 8)),
            (f"rvq_decode {dt}", _body(m.rvq.rvq_decode), lambda dt=dt: (L(4, 750, 8), E(8, 1024, 128, dt=dt))),
            (f"lstm_recurrence {dt}", _body(m.lstm.lstm_recurrence),
             lambda dt=dt: (E(3, 1, 2048, dt=dt), E(2048, 512, dt=dt), E(1, 512, dt=dt), E(1, 512, dt=dt))),
            (f"flow_step {dt}", _body(m.steps.flow_step), lambda dt=dt: (E(4, 64, 1000, dt=dt),) * 3 + (0.1, 3.0)),
            (f"diffusion_step {dt}", _body(m.steps.diffusion_step),
             lambda dt=dt: (E(4, 64, 1000, dt=dt),) * 3 + (E(4), E(4), E(4), 1.0)),
            (f"diffusion_step_x0 {dt}", _body(m.steps.diffusion_step_x0),
             lambda dt=dt: (E(4, 64, 1000, dt=dt),) * 3 + (E(4),) * 5 + (1.0,)),
        ]
    return cases


def _signature(kernel, kwargs):
    sig, constexprs = {}, {}
    for p in kernel.params:
        value = kwargs[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constexprs[p.name] = value
        elif isinstance(value, torch.Tensor):
            sig[p.name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[p.name] = "i1"
        elif isinstance(value, int):
            sig[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            sig[p.name] = "fp32"
    return sig, constexprs


def _ptxas_info(ptx, arch):
    exe = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"
    if not exe.exists():
        return ""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    r = subprocess.run([str(exe), f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    lines = [line.split(":", 1)[-1].strip() for line in r.stderr.splitlines() if "spill" in line or "Used" in line]
    return "; ".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    args = parser.parse_args(argv)
    module, error = _triton._load()
    if error:
        print(f"cannot load the kernels: {error}")
        return 1
    failures = 0
    compiled = {}
    target = GPUTarget("cuda", args.arch, 32)
    for name, body, build in _cases(module):
        mode = FakeTensorMode()
        with mode:
            inputs = build()
        slots = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]

        def call(*tensors, body=body, inputs=inputs, slots=slots):
            full = list(inputs)
            for i, t in zip(slots, tensors):
                full[i] = t
            return body(*full)

        try:
            gm = make_fx(call, tracing_mode="fake")(*[inputs[i] for i in slots])
        except Exception as exc:  # report every failure, then fail
            print(f"TRACE FAIL {name}: {type(exc).__name__}: {exc}")
            failures += 1
            continue
        launches = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.triton_kernel_wrapper_mutation]
        print(f"traced {name}: {len(launches)} kernel launches")
        for node in launches:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            kwargs = dict(kernel_side_table.get_constant_args(node.kwargs["constant_args_idx"]))
            kwargs.update({k: (v.meta["val"] if hasattr(v, "meta") else v) for k, v in node.kwargs["kwargs"].items()})
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            if isinstance(kernel, Autotuner):  # torch wraps launches with num_warps/num_stages in one config
                config = kernel.configs[0]
                options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
                kwargs.update(config.kwargs)
                kernel = kernel.fn
            sig, constexprs = _signature(kernel, kwargs)
            key = (kernel.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())), tuple(sorted(options.items())))
            if key in compiled:
                continue
            try:
                binary = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs), target=target, options=options)
            except Exception as exc:
                print(f"  COMPILE FAIL {kernel.fn.__name__} {constexprs} {options}: {exc}")
                failures += 1
                continue
            compiled[key] = True
            shown = {k: v for k, v in constexprs.items() if k.startswith("BLOCK")}
            print(f"  {kernel.fn.__name__} {shown} {options}: {_ptxas_info(binary.asm['ptx'], args.arch)}")
    print(f"{len(compiled)} kernel variants compiled for sm_{args.arch}, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
