"""Compile the FAE kernel for sm_90 without a GPU and report what the compiler made of it.

    python -m benchmarks.fae.sass_report [--dump DIR]

For each variant: registers, spills, shared memory, and counts of the SASS instructions that
matter (HGMMA = Hopper wgmma, HMMA = the older mma.sync path, MUFU.EX2, UTMALDG = TMA loads,
LDGSTS = cp.async, FFMA/FADD/FMUL/FMNMX, local-memory LDL/STL). Uses Triton's bundled cuobjdump.
The signature mimics what the launcher specializes for B=2, H=16, Lq=4096, Lk=10521, D=128 bf16.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from toprovar.kernels.triton_fae import fae_kernel

OPS = [
    "HGMMA",
    "HMMA",
    "MUFU.EX2",
    "UTMALDG",
    "LDGSTS",
    "LDG",
    "STG",
    "LDS",
    "STS",
    "LDSM",
    "STSM",
    "FFMA",
    "FADD",
    "FMUL",
    "FMNMX",
    "F2FP",
    "SHFL",
    "LDL",
    "STL",
    "BAR",
    "SYNCS",
    "WARPGROUP",
    "FSETP",
    "FSEL",
    "SETMAXNREG",
]


def _signature(
    use_tma: bool,
    with_entropy: bool,
    bn: int,
    D: int = 128,
    H: int = 16,
    Lq: int = 4096,
    Lk: int = 10521,
    dtype: str = "bf16",
):
    names = fae_kernel.arg_names
    sig, const, attrs = {}, {}, {}
    desc = f"tensordesc<{dtype}[1, 1, {bn}, {D}]>"
    vals = {
        "Q": f"*{dtype}",
        "K": desc if use_tma else f"*{dtype}",
        "V": desc if use_tma else f"*{dtype}",
        "O": f"*{dtype}",
        "E": "*fp32" if with_entropy else f"*{dtype}",
        "qk_scale": "fp32",
    }
    ints = {}
    for t, length in (("q", Lq), ("k", Lk), ("v", Lk), ("o", Lq)):
        ints.update(
            {f"s{t}b": H * length * D, f"s{t}h": length * D, f"s{t}m" if t in "qo" else f"s{t}n": D, f"s{t}d": 1}
        )
    ints.update({"seb": H * Lq, "seh": Lq, "sem": 1} if with_entropy else {"seb": 0, "seh": 0, "sem": 0})
    ints.update({"H": H, "Lq": Lq, "Lk": Lk})
    for i, n in enumerate(names):
        if n in vals:
            sig[n] = vals[n]
            if vals[n].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in ("H", "Lq", "Lk"):  # do_not_specialize
            sig[n] = "i32"
        elif n in ints:
            if ints[n] == 1:
                sig[n], const[n] = "constexpr", 1
            else:
                sig[n] = "i32"
                if ints[n] % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[n] = "constexpr"
    return sig, const, attrs


def compile_variant(bm, bn, warps, stages, with_entropy=True, use_tma=False, after_pv=False, D=128, dtype="bf16"):
    sig, const, attrs = _signature(use_tma, with_entropy, bn, D=D, dtype=dtype)
    const.update(
        HEAD_DIM=D,
        BLOCK_M=bm,
        BLOCK_N=bn,
        WITH_ENTROPY=with_entropy,
        DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
        USE_TMA=use_tma,
        ENTROPY_AFTER_PV=after_pv,
    )
    src = ASTSource(fn=fae_kernel, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def report(kernel) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        sass = subprocess.run([_cuobjdump(), "--dump-sass", path], capture_output=True, text=True).stdout
        res = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    ops = Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            op = m.group(1)
            for key in OPS:
                if op == key or op.startswith(key + "."):
                    ops[key] += 1
    reg = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    out = {
        "regs": int(reg.group(1)) if reg else None,
        "stack": int(stack.group(1)) if stack else None,
        "smem": kernel.metadata.shared,
        "sass_lines": sass.count("\n"),
    }
    out.update({k: ops[k] for k in OPS})
    return out, sass


VARIANTS = {  # name: (bm, bn, warps, stages, dict of switches)
    "tma_128x128_w8_s3": (128, 128, 8, 3, {"use_tma": True}),
    "tma_64x64_w4_s3_after_pv": (64, 64, 4, 3, {"use_tma": True, "after_pv": True}),
    "ptr_128x128_w8_s3": (128, 128, 8, 3, {}),
    "tma_128x128_w8_s2": (128, 128, 8, 2, {"use_tma": True}),
    "fp32_ptr_32x32_w4_s2": (32, 32, 4, 2, {"dtype": "fp32", "after_pv": True}),
    "d256_tma_64x64_w4_s3": (64, 64, 4, 3, {"use_tma": True, "D": 256, "after_pv": True}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dump", default=None, help="write each variant's SASS here")
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    print(f"triton {triton.__version__}")
    for name, (bm, bn, w, s, sw) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        for ent in (True, False):
            tag = f"{name}{'' if ent else '_noent'}"
            try:
                k = compile_variant(bm, bn, w, s, with_entropy=ent, **sw)
                r, sass = report(k)
                if args.dump:
                    os.makedirs(args.dump, exist_ok=True)
                    with open(os.path.join(args.dump, tag + ".sass"), "w") as f:
                        f.write(sass)
                    with open(os.path.join(args.dump, tag + ".ttgir"), "w") as f:
                        f.write(k.asm["ttgir"])
                print(tag, " ".join(f"{k}={v}" for k, v in r.items() if v))
            except Exception as err:  # report and go on: one variant failing must not stop the others
                print(tag, "FAILED", str(err).splitlines()[-1][:200] if str(err) else repr(err))


if __name__ == "__main__":
    main()
