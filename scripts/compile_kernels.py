"""Compile the implicit-GEMM conv kernels and the first layer's z^B kernels for an H100 (sm_90) without a GPU.

    python scripts/compile_kernels.py [--arch 90]

Triton's interpreter, which the CPU tests run the kernels in, executes them as Python: code that
the compiler rejects (a variable whose type changes across branches, an early return) passes
there and fails only on the GPU. This compiles each kernel, at the launches conv_products.py
and first_layer.py make (default tiles, every precision and epilogue), to a cubin, and prints the shared memory
each needs, the registers per thread and the bytes of stack that registers spill to (cuobjdump's
resource usage) and the instructions its products and loads compiled to (Hopper's wgmma or the
older mma.sync, asynchronous copies). Exit status 1 if any fails. To compile with the Triton the
GPU machine has (3.6 there, 3.8 here): `pip install --no-deps --target DIR triton==3.6.0`, then
`PYTHONPATH=DIR python scripts/compile_kernels.py` (session 21: every launch compiled with both). Run without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRECISIONS = {  # products' dtype -> (operand type, accumulator / input type, constexpr flags)
    "bf16": ("bf16", "fp32", dict(FP64=False, TF32=False)),
    "tf32": ("fp32", "fp32", dict(FP64=False, TF32=True)),
    "fp64": ("fp64", "fp64", dict(FP64=True, TF32=False)),
}


UNIT_STRIDES = ("srl", "sxp", "sfc")
ALIGNED = ("C", "M", "O", "OL", "L", "L_PER_SPLIT")


# the first layer's kernels read the raw input (float32 or float64, NCHW): (operand type, flags)
FIRST_LAYER_PRECISIONS = {"fp32": ("fp32", dict(FP64=False, TF32=False)), "tf32": ("fp32", dict(FP64=False, TF32=True)),
                          "fp64": ("fp64", dict(FP64=True, TF32=False))}
# what is a multiple of 16 at VGG16's conv1_1 launch (3 channels, 27 weight columns are not)
FIRST_LAYER_ALIGNED = ("O", "L", "H", "W", "Wo", "Ho")


def tma_tiles(precision: str, rows: int, cols: int, programs: int):
    """A TMA responses launch (``Tiles.tma``) of rows × cols, its reduction tile 128 bytes of a row."""
    from rsp_fast.kernels.triton.conv_products import Tiles

    return Tiles(rows, cols, 64 if precision == "bf16" else 32, 8, 3, programs, tma=True)


# shared memory per block (opted in) by compute capability × 10: what Triton lets a launch take
SHARED_MEMORY = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 120: 101376}


def launches(arch: int = 90):
    """(name, kernel, pointer types, constexprs, warps, stages, aligned integer arguments or None
    for ``ALIGNED``, whether a default run makes this launch) for each launch to compile, at the
    tiles a GPU of ``arch`` gets by default."""
    import torch

    from rsp_fast.kernels.triton import conv_products as cp
    from rsp_fast.kernels.triton import first_layer as fl

    def default_tiles(kernel: str, columns: int, dtype: torch.dtype):
        if dtype == torch.float64:
            return cp.default_tiles(kernel, columns, dtype, torch.device("cuda"))
        return cp.tensor_core_tiles(kernel, columns, dtype, SHARED_MEMORY[arch], arch // 10)

    cuda = torch.device("cuda")
    for precision, (op, acc, flags) in PRECISIONS.items():
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[op]
        # the back-projection reads F with its sections or its channels contiguous (the launcher's rule)
        sections_major = cp._filters_for_back(torch.empty(1, 1, 2, 2), flags).stride(2) == 1
        f_layouts = [dict(sfm=1, sfc=None) if sections_major else {}]
        if sections_major:
            f_layouts.append({})  # beside it, what F as the filters write it would compile to
        for channels in (64, 256):
            t = default_tiles("filters", channels, dtype)
            # the patches from the channels-last input, or (TF32's variant, Tiles.shifted) from
            # shifted positions-major copies, each channel's row at unit stride
            for shifted in (False, True) if precision == "tf32" else (False,):
                patches = dict(SHIFTED=True, ALIGN=16 // dtype.itemsize, sxh=0, sxw=0) if shifted else \
                    dict(SHIFTED=False, ALIGN=1)
                yield (f"filters {precision} C={channels}" + (" shifted" if shifted else ""), cp._filters_kernel,
                       {"r_ptr": op, "x_ptr": op, "f_ptr": op},
                       dict(BLOCK_M=t.rows, BLOCK_C=t.cols, BLOCK_L=t.red, **flags, **patches), t.warps, t.stages, None,
                       True)
            if precision != "fp64":  # the TMA filters (Tiles.tma) at VGG16's conv1_2 and conv3_3: R read as it is
                t = t._replace(shifted=False, tma=True)
                height, width = cp.position_box(t.red, (224, 224) if channels == 64 else (56, 56))
                yield (f"filters {precision} C={channels} TMA {height}×{width} box", cp._filters_tma_kernel,
                       {"r_desc": f"tensordesc<{acc}[1, {t.rows // 2}, {height}, {width}]>",
                        "x_desc": f"tensordesc<{op}[1, {height}, {width}, {t.cols}]>", "f_ptr": op},
                       dict(BLOCK_M=t.rows, BLOCK_C=t.cols, BLOCK_L=t.red, BOX_W=width, **flags), t.warps, t.stages,
                       None, False)
            for gram, combine, purge, persistent, layout in (
                    (False, True, True, False, 0), (False, True, False, False, 0), (False, False, False, False, 0),
                    (True, True, True, False, 0), (False, True, True, True, 0), (False, True, True, False, 1)):
                if layout >= len(f_layouts):
                    continue
                t = default_tiles("gram_back" if gram else "back", channels, dtype)
                yield (f"back {precision} C={channels} gram={gram} combine={combine} purge={purge}"
                       + (" persistent" if persistent else "") + (" channels-contiguous F" if layout else ""),
                       cp._back_kernel, {"s_ptr": op, "f_ptr": op, "xcl_ptr": op, "dx_ptr": acc, "x_ptr": acc,
                                         "scale_ptr": acc, "counts_ptr": "i32" if purge else acc},
                       dict(BLOCK_Q=t.rows, BLOCK_C=t.cols, BLOCK_M=t.red, **flags, GRAM=gram, COMBINE=combine,
                            PURGE=purge, PERSISTENT=persistent, TMA=False, BOX_W=1, F_T=False,
                            **({} if gram else f_layouts[layout])),
                       t.warps, t.stages, None, not persistent and not layout)
            if precision == "fp64":
                continue
            # the TMA back-projection (Tiles.tma) at VGG16's conv1_2 and conv3_3, with the purge's epilogue
            t = default_tiles("back", channels, dtype)._replace(tma=True)
            height, width = cp.position_box(t.rows, (224, 224) if channels == 64 else (56, 56))
            f_box = f"[1, 1, {t.cols}, {t.red}]" if sections_major else f"[1, 1, {t.red}, {t.cols}]"
            yield (f"back {precision} C={channels} TMA {height}×{width} box", cp._back_kernel,
                   {"s_ptr": f"tensordesc<{op}[1, {height}, {width}, {t.red}]>", "f_ptr": f"tensordesc<{op}{f_box}>",
                    "xcl_ptr": op, "dx_ptr": acc, "x_ptr": acc, "scale_ptr": acc, "counts_ptr": "i32"},
                   dict(BLOCK_Q=t.rows, BLOCK_C=t.cols, BLOCK_M=t.red, **flags, GRAM=False, COMBINE=True, PURGE=True,
                        PERSISTENT=False, TMA=True, BOX_W=width, F_T=sections_major), t.warps, t.stages, None, False)
        for gram, columns, persistent in ((False, 128, False), (False, 512, False), (True, 784, False),
                                          (False, 128, True)):  # section columns, or positions
            t = default_tiles("patch_gram" if gram else "responses", columns, dtype)
            default, persistent = not persistent, persistent or t.programs > 0  # as the default launch runs it
            yield (f"responses {precision} gram={gram}" + ("" if gram else f" M={columns}")
                   + (" persistent" if persistent else ""), cp._responses_kernel,
                   {"x_ptr": op, "f_ptr": op, "r_ptr": acc, "s_ptr": op},
                   dict(BLOCK_L=t.rows, BLOCK_M=t.cols, BLOCK_C=t.red, **flags, GRAM=gram, PERSISTENT=persistent,
                        TMA=False, BOX_W=1), t.warps, t.stages, None, default)
        if precision != "fp64":  # the TMA responses (Tiles.tma) at VGG16's conv1_2 and conv3_3
            for t, columns, out_w in ((tma_tiles(precision, 256, 128, 0), 128, 224), (tma_tiles(precision, 128, 256, 1), 512, 56)):
                height, width = cp.position_box(t.rows, (out_w, out_w))
                yield (f"responses {precision} M={columns} TMA {height}×{width} box" + (" persistent" if t.programs else ""),
                       cp._responses_kernel, {"x_ptr": f"tensordesc<{op}[1, {height}, {width}, {t.red}]>",
                                              "f_ptr": f"tensordesc<{op}[1, 1, {t.cols}, {t.red}]>", "r_ptr": acc, "s_ptr": op},
                       dict(BLOCK_L=t.rows, BLOCK_M=t.cols, BLOCK_C=t.red, **flags, GRAM=False,
                            PERSISTENT=t.programs > 0, TMA=True, BOX_W=width), t.warps, t.stages, None, False)
        yield f"pack {precision}", cp._pack_kernel, {"x_ptr": acc, "scale_ptr": acc, "out_ptr": op}, \
            dict(BLOCK_C=64, BLOCK_P=64), 4, 1, None, True
        for on_grid in (False, True) if precision == "tf32" else (False,):  # on the grid: the shifted filters'
            yield (f"stack {precision}" + (" on the padded grid" if on_grid else ""), cp._stack_kernel,
                   {"r_ptr": acc, "out_ptr": op}, dict(BLOCK=1024, INTERLEAVE=True, ON_GRID=on_grid), 4, 1, None, True)
        if precision == "tf32":
            yield (f"shifted copies {precision}", cp._shifted_copies_kernel, {"x_ptr": op, "out_ptr": op},
                   dict(BLOCK_F=64, BLOCK_C=64), 4, 1, None, True)
    for precision, (op, flags) in FIRST_LAYER_PRECISIONS.items():
        t = fl.tiles(64, 27, torch.float64 if op == "fp64" else torch.float32, cuda)  # VGG16's conv1_1
        yield (f"first layer sections {precision}", fl._sections_kernel,
               {"x_ptr": op, "w_ptr": op, "bounds_ptr": op, "r_ptr": op, "s_ptr": op},
               dict(sxw=1, srl=1, **t["sections"], **flags), 4, 3, FIRST_LAYER_ALIGNED, True)  # NCHW x and R: unit pixel strides
        yield (f"first layer back {precision}", fl._back_kernel,
               {"s_ptr": op, "w_ptr": op, "x_ptr": op, "bounds_ptr": op, "out_ptr": op},
               dict(sxw=1, **t["back"], **flags), 4, 3, FIRST_LAYER_ALIGNED, True)


def compile_launch(kernel, pointers: dict, constexprs: dict, warps: int, stages: int, arch: int, aligned_names=None):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    # the JIT compiles integer arguments equal to 1 as constants: the unit strides (R along its
    # positions, an NCHW input along its pixels, F along its channels); a constexpr given as None
    # is a runtime argument instead
    constexprs = {k: v for k, v in {**{n: 1 for n in UNIT_STRIDES if n in names}, **constexprs}.items()
                  if v is not None}
    signature = {n: "constexpr" if n in constexprs else pointers[n] if pointers.get(n, "").startswith("tensordesc")
                 else f"*{pointers[n]}" if n in pointers else "i32" for n in names}
    # what the JIT knows at VGG16's conv1–conv4 launches (it marks integer arguments that are
    # multiples of 16): pointers, strides, channel and section counts and the number of positions
    # are; without it 16-bit loads are not vectorised, so not copied asynchronously, and their
    # loop is not pipelined (conv5's 14² = 196 positions are not a multiple of 16)
    aligned_names = ALIGNED if aligned_names is None else aligned_names
    aligned = [n for n in names if signature[n].startswith("*")
               or (signature[n] == "i32" and (n.startswith("s") or n in aligned_names))]
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages})


def resources(compiled) -> tuple[int, int] | None:
    """Registers per thread and stack bytes (spilled registers) of a compiled kernel, read from
    its cubin by the cuobjdump that ships with Triton; None where that tool is missing."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return (int(found[1]), int(found[2])) if found else None


def copies(ptx: str, size: int) -> int:
    """Asynchronous global-to-shared copies of ``size`` bytes in a kernel's PTX (4-byte ones copy
    32-bit operands that are transposed on their way to shared memory, or not known aligned)."""
    return len(re.findall(rf"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], {hex(size)},", ptx))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability × 10 (90: H100/H200, 80: A100, "
                   "86/89/120: GPUs of 99 KiB shared memory per block)")
    p.add_argument("--defaults-only", action="store_true", help="only the launches a default run makes (not the TMA "
                   "or forced persistent ones, nor F in the other layout)")
    p.add_argument("--only", nargs="+", metavar="KERNEL", help="only the launches whose name starts so (e.g. responses)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compile_kernels: unset TRITON_INTERPRET (the interpreter compiles nothing)")
    if args.arch not in SHARED_MEMORY:
        p.error(f"--arch {args.arch}: one of {', '.join(map(str, SHARED_MEMORY))}")
    limit, failed, compiled_any = SHARED_MEMORY[args.arch], 0, False
    for name, kernel, pointers, constexprs, warps, stages, aligned, default in launches(args.arch):
        if (args.defaults_only and not default) or not name.startswith(tuple(args.only or [""])):
            continue
        compiled_any = True
        try:
            compiled = compile_launch(kernel, pointers, constexprs, warps, stages, args.arch, aligned)
        except Exception as e:  # report every launch, then fail
            failed += 1
            print(f"FAILED {name}: {type(e).__name__}: {str(e).strip()[:1500]}")
            continue
        if default and compiled.metadata.shared > limit:  # Triton would refuse the launch (OutOfResources)
            failed += 1
            print(f"FAILED {name}: needs {compiled.metadata.shared / 1024:.0f} KiB of shared memory, more than "
                  f"sm_{args.arch}'s {limit / 1024:.0f} KiB per block")
            continue
        ptx = compiled.asm["ptx"]
        usage = resources(compiled)
        print(f"ok {name}: shared memory {compiled.metadata.shared / 1024:.0f} KiB, "
              + (f"{usage[0]} registers {usage[1]} spilled, " if usage else "")
              + f"{ptx.count('wgmma.mma_async')} wgmma "
              f"{ptx.count('mma.sync')} mma.sync, {copies(ptx, 16)} 16-byte and {copies(ptx, 4)} 4-byte cp.async, "
              f"{ptx.count('cp.async.bulk.tensor')} TMA copies")
    if not compiled_any:
        p.error(f"--only {' '.join(args.only or [])}: no launch's name starts so")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
