#!/usr/bin/env python3
"""The kernels' static numbers, read from the compiled code (docs/KERNEL-STATS.md).

Compiles kernels/*.cu as build.rs does (its flags are read from build.rs), once per real
architecture, and reads:

- from `ptxas -v`: registers, spill stores and loads, stack frame and static shared memory of
  every kernel;
- from the SASS (nvdisasm, with the line table that -lineinfo keeps): the main loop of each
  attention kernel (the loop that holds the most tensor-core MMAs), its instructions, and those
  on its two common paths with their MMAs: the prefill path and the decode path (few rows).
  Basic blocks whose instructions come mostly from a source region marked `static-check: cold`
  are on neither; `static-check: prefill` and `static-check: decode` regions are on one only.

From these it derives instructions per MMA (the prefill loop), instructions per byte of K and V
(decode: the busiest warp's instructions per key tile over the tile's bytes), the pipeline
stages each kernel runs with and thread blocks per SM from registers and shared memory (the
launcher's choice and shared memory, mirrored from TileShape in
src/cuda/segmented_attention/occupancy.rs). The decode tile's kernels have no prefill path.

  --write   rewrites the table in docs/KERNEL-STATS.md
  --check   compares with that table: fails on any spill, on a kernel missing from the table, and
            on an attention kernel's common-path loop (instructions, or instructions per MMA) that
            grew by more than --margin (default 5%)
  (neither) prints the table
"""

import argparse
import concurrent.futures
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"
DOC = ROOT / "docs" / "KERNEL-STATS.md"
BEGIN = "<!-- kernel-stats: begin (scripts/kernel-stats.sh --write) -->"
END = "<!-- kernel-stats: end -->"

# Keys per tile of the attention kernels (kernels/tile_walk.cuh); per tile shape (PrefillTile,
# WideTile, DecodeTile in kernels/segmented_attention.cu): packed query rows, warps and the most
# pipeline stages.
BLOCK_N = 64
SHAPES = {
    "prefill": dict(rows=64, warps=4, max_stages=2),
    "wide": dict(rows=128, warps=8, max_stages=2),
    "decode": dict(rows=16, warps=4, max_stages=4),
}

# Per-SM limits of the real architectures built: registers, warps, thread blocks, shared memory
# per SM and per block (bytes), and the shared memory the runtime reserves per block.
ARCH_LIMITS = {
    "sm_80": dict(regs=65536, warps=64, ctas=32, smem_sm=167936, smem_block=166912, reserved=1024),
    "sm_90a": dict(regs=65536, warps=64, ctas=32, smem_sm=233472, smem_block=232448, reserved=1024),
}

ATTENTION = re.compile(r"^segmented_attention_(decode_|wide_)?(bf16|f16)_d(\d+)$")


def die(msg):
    print(f"kernel-stats: {msg}", file=sys.stderr)
    sys.exit(1)


def build_flags():
    """nvcc's flags and real architectures, as build.rs passes them."""
    text = (ROOT / "build.rs").read_text()
    flags = None
    for m in re.finditer(r"\[([^\[\]]*)\]", text):
        items = re.findall(r'"([^"]*)"', m.group(1))
        if "-O3" in items:
            flags = items
    if not flags:
        die("cannot find nvcc's flags (a [...] list with -O3) in build.rs")
    archs = re.findall(r'"-gencode=arch=(compute_\w+),code=(sm_\w+)"', text)
    if not archs:
        die("cannot find the real architectures (-gencode=...,code=sm_XX) in build.rs")
    return flags, archs


def region_lines(kind):
    """(file, line) pairs inside `static-check: KIND begin` ... `end` markers of kernels/."""
    lines = set()
    for path in sorted(KERNELS.glob("*.cu*")):
        start = None
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if f"static-check: {kind} begin" in line:
                if start is not None:
                    die(f"{path.name}:{n}: a {kind} begin inside another")
                start = n
            elif f"static-check: {kind} end" in line:
                if start is None:
                    die(f"{path.name}:{n}: a {kind} end without a begin")
                lines.update((path.name, k) for k in range(start, n + 1))
                start = None
        if start is not None:
            die(f"{path.name}:{start}: a {kind} begin without an end")
    return lines


def compile_arch(nvcc, flags, virt, real, unity, out_dir):
    cubin = out_dir / f"kernels_{real}.cubin"
    cmd = [nvcc, "-cubin", *flags, f"-gencode=arch={virt},code={real}", f"-I{KERNELS}",
           "-Xptxas", "-v", "-o", str(cubin), str(unity)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        die(f"nvcc failed for {real}:\n{r.stdout}{r.stderr}")
    return cubin, r.stdout + r.stderr


def parse_ptxas(text):
    """{kernel: {regs, spill_st, spill_ld, stack, smem}} from ptxas -v."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            cur = out.setdefault(m.group(1), dict(regs=0, spill_st=0, spill_ld=0, stack=0, smem=0))
            continue
        m = re.search(r"Function properties for (\w+)", line)
        if m:
            cur = out.get(m.group(1))  # device functions called from kernels are not tabled
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return out


INSN = re.compile(r"^\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^(\.L_x_\d+):")
LINE = re.compile(r'line (\d+)')
FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')


def parse_sass(text):
    """{function: [(addr, insn text, frozenset of (file name, line))]} and {label: addr}."""
    funcs, labels = {}, {}
    cur, pending_labels, chain = None, [], frozenset()
    new_chain = []
    for line in text.splitlines():
        m = re.match(r"^\.text\.(\w+):", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            chain, new_chain, pending_labels = frozenset(), [], []
            continue
        if cur is None:
            continue
        m = LABEL.match(line)
        if m:
            pending_labels.append(m.group(1))
            continue
        if line.lstrip().startswith("//##"):
            new_chain.extend((Path(f).name, int(n)) for f, n in FILE_LINE.findall(line))
            continue
        m = INSN.match(line)
        if m:
            if new_chain:
                chain, new_chain = frozenset(new_chain), []
            addr = int(m.group(1), 16)
            for lab in pending_labels:
                labels[lab] = addr
            pending_labels = []
            cur.append((addr, m.group(2), chain))
    return funcs, labels


def main_loop(insns, labels):
    """(first, last) index of the backward-branch loop holding the most HMMAs, or None."""
    index = {addr: i for i, (addr, _, _) in enumerate(insns)}
    best = None
    for i, (_, text, _) in enumerate(insns):
        m = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", text)
        if not m or m.group(1) not in labels:
            continue
        j = index.get(labels[m.group(1)])
        if j is None or j > i:
            continue
        mmas = sum(1 for k in range(j, i + 1) if opcode(insns[k][1]).startswith("HMMA"))
        key = (mmas, -(i - j))
        if mmas and (best is None or key > best[0]):
            best = (key, j, i)
    return None if best is None else (best[1], best[2])


def basic_blocks(body, labels):
    """The instructions split where a branch lands or leaves."""
    targets = set(labels.values())
    blocks, cur = [], []
    for x in body:
        if cur and x[0] in targets:
            blocks.append(cur)
            cur = []
        cur.append(x)
        if opcode(x[1]) in ("BRA", "EXIT", "RET", "BRX", "JMP"):
            blocks.append(cur)
            cur = []
    if cur:
        blocks.append(cur)
    return blocks


def is_in(block, region):
    """A block most of whose instructions come from a marked region (a few hoisted from such a
    region into another block leave that block where it is)."""
    return 2 * sum(1 for x in block if x[2] & region) > len(block)


def opcode(text):
    t = text.strip()
    if t.startswith("@"):
        t = t.split(None, 1)[1]
    return t.split(None, 1)[0]


def occupancy(regs, smem_static, smem_dynamic, threads, arch):
    lim = ARCH_LIMITS[arch]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    warps_by_regs = (lim["regs"] // per_warp) // 4 * 4
    warps = threads // 32
    by_regs = warps_by_regs // warps
    smem = smem_static + smem_dynamic
    if smem > lim["smem_block"]:
        return 0
    by_smem = lim["smem_sm"] // (smem + lim["reserved"]) if smem else lim["ctas"]
    return min(by_regs, by_smem, lim["warps"] // warps, lim["ctas"])


def smem_bytes(shape, d, stages):
    """An attention kernel's dynamic shared memory (TileShape::smem_bytes): plain, with shifts."""
    plain = (SHAPES[shape]["rows"] + 2 * stages * BLOCK_N) * d * 2
    return plain, plain + SHAPES[shape]["warps"] * 16 * d * 2


def choose_stages(shape, blocks_per_sm):
    """TileShape::choose_stages: the most key tiles in flight per SM (blocks x (stages - 1)),
    among the depths that keep 2 blocks per SM where any does; fewer stages on a tie."""
    options = [(s, blocks_per_sm(s)) for s in range(2, SHAPES[shape]["max_stages"] + 1)]
    several = any(b >= 2 for _, b in options)
    best = (2, 0)
    for s, b in options:
        if several and b < 2:
            continue
        if b * (s - 1) > best[1]:
            best = (s, b * (s - 1))
    return best[0]


def measure(nvcc):
    flags, archs = build_flags()
    bindir = Path(nvcc).parent
    nvdisasm = bindir / "nvdisasm"
    if not nvdisasm.exists():
        die(f"no nvdisasm beside {nvcc}: run scripts/install-nvcc.sh (it installs the pinned one)")
    cold = region_lines("cold")
    prefill_only = region_lines("prefill")
    decode_only = region_lines("decode")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kernel-stats-") as tmp:
        tmp = Path(tmp)
        unity = tmp / "kernels.cu"
        unity.write_text("".join(f'#include "{p}"\n' for p in sorted(KERNELS.glob("*.cu"))))
        with concurrent.futures.ThreadPoolExecutor(len(archs)) as pool:
            built = list(pool.map(lambda a: compile_arch(nvcc, flags, a[0], a[1], unity, tmp), archs))
        for (virt, arch), (cubin, log) in zip(archs, built):
            if arch not in ARCH_LIMITS:
                die(f"no per-SM limits for {arch}: add them to ARCH_LIMITS")
            info = parse_ptxas(log)
            r = subprocess.run([str(nvdisasm), "-gi", "-c", str(cubin)], capture_output=True, text=True)
            if r.returncode != 0:
                die(f"nvdisasm failed on {cubin.name}: {r.stderr}")
            funcs, labels = parse_sass(r.stdout)
            for name in sorted(info):
                k = info[name]
                row = dict(kernel=name, arch=arch, regs=k["regs"], spill=k["spill_st"] + k["spill_ld"],
                           stack=k["stack"], smem=k["smem"])
                m = ATTENTION.match(name)
                if m:
                    shape = (m.group(1) or "prefill_").rstrip("_")
                    d = int(m.group(3))
                    insns = funcs.get(name)
                    if not insns:
                        die(f"no SASS for {name} ({arch})")
                    loop = main_loop(insns, labels)
                    if loop is None:
                        die(f"no loop with MMAs in {name} ({arch})")
                    body = insns[loop[0]:loop[1] + 1]
                    blocks = [b for b in basic_blocks(body, labels) if not is_in(b, cold)]
                    hot = [x for b in blocks if not is_in(b, decode_only) for x in b]
                    dec = [x for b in blocks if not is_in(b, prefill_only) for x in b]
                    mma_all = sum(1 for x in body if opcode(x[1]).startswith("HMMA"))
                    mma = sum(1 for x in hot if opcode(x[1]).startswith("HMMA"))
                    dec_mma = sum(1 for x in dec if opcode(x[1]).startswith("HMMA"))
                    def ctas(dynamic):
                        return occupancy(k["regs"], k["smem"], dynamic,
                                         SHAPES[shape]["warps"] * 32, arch)
                    stages = choose_stages(shape, lambda s: ctas(smem_bytes(shape, d, s)[0]))
                    stages_sh = choose_stages(shape, lambda s: ctas(smem_bytes(shape, d, s)[1]))
                    plain = smem_bytes(shape, d, stages)[0]
                    shifted = smem_bytes(shape, d, stages_sh)[1]
                    kv_bytes = BLOCK_N * d * 2 * 2
                    if shape == "decode":
                        # One path: every block of the loop that is not cold.
                        dec = [x for b in blocks for x in b]
                        dec_mma = sum(1 for x in dec if opcode(x[1]).startswith("HMMA"))
                        mma = 0
                    no_decode = shape == "wide"  # no decode path: few rows run on one warp
                    row.update(
                        loop_all=len(body), loop=len(hot) if mma else None, mma=mma,
                        mma_all=mma_all, per_mma=len(hot) / mma if mma else None,
                        dec=None if no_decode else len(dec), dec_mma=dec_mma,
                        per_byte=None if no_decode else len(dec) / kv_bytes,
                        dyn=f"{plain // 1024}/{shifted // 1024}",
                        ctas=f"{ctas(plain)}/{ctas(shifted)}",
                        stages=f"{stages}/{stages_sh}",
                    )
                rows.append(row)
    return rows


HEADER = ("| kernel | arch | registers | spill bytes | stack bytes | static smem | dynamic smem KiB "
          "(plain/shifts) | CTAs per SM (plain/shifts) | loop instructions (all) | prefill path "
          "instructions | prefill MMAs | instructions per MMA | decode path instructions | decode "
          "MMAs | instructions per K+V byte | pipeline stages (plain/shifts) |")
OTHER_HEADER = "| kernel | arch | registers | spill bytes | stack bytes | static smem |"


def fmt_row(r):
    cells = [f"`{r['kernel']}`", r["arch"], r["regs"], r["spill"], r["stack"], r["smem"]]
    if "loop" in r:
        none = r["loop"] is None  # the decode tile: no prefill path
        nodec = r["dec"] is None  # the wide tile: no decode path
        cells += [r["dyn"], r["ctas"], r["loop_all"], "-" if none else r["loop"],
                  "-" if none else r["mma"], "-" if none else f"{r['per_mma']:.2f}",
                  "-" if nodec else r["dec"], "-" if nodec else r["dec_mma"],
                  "-" if nodec else f"{r['per_byte']:.4f}", r["stages"]]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(rows):
    def one(header, rs):
        return [header, "|" + "---|" * header.count(" | ") + "---|"] + [fmt_row(r) for r in rs]
    rows = sorted(rows, key=lambda r: (r["kernel"], r["arch"]))
    attention = [r for r in rows if "loop" in r]
    other = [r for r in rows if "loop" not in r]
    return "\n".join(one(HEADER, attention) + ["", "Every other kernel:", ""] + one(OTHER_HEADER, other))


def read_table():
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        die(f"{DOC} has no table between its markers; run with --write")
    body = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 6 or not cells[0].startswith("`"):
            continue
        r = dict(kernel=cells[0].strip("`"), arch=cells[1])
        if len(cells) >= 16:
            num = lambda c, f: None if c == "-" else f(c)
            r.update(loop=num(cells[9], int), per_mma=num(cells[11], float), dec=num(cells[12], int))
        rows[(r["kernel"], r["arch"])] = r
    return rows


def write_table(rows):
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        die(f"{DOC} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(f"{head}{BEGIN}\n{table(rows)}\n{END}{tail}")


def check(rows, margin):
    recorded = read_table()
    failures, notes = [], []
    for r in rows:
        key = (r["kernel"], r["arch"])
        if r["spill"]:
            failures.append(f"{r['kernel']} ({r['arch']}) spills {r['spill']} bytes")
        if key not in recorded:
            failures.append(f"{r['kernel']} ({r['arch']}) is not in {DOC.name}: run --write")
            continue
        old = recorded[key]
        if "loop" not in r or "loop" not in old:
            continue
        for what, now, then in (("prefill path instructions", r["loop"], old["loop"]),
                                ("instructions per MMA", r["per_mma"], old["per_mma"]),
                                ("decode path instructions", r["dec"], old["dec"])):
            if (now is None) != (then is None):
                failures.append(f"{r['kernel']} ({r['arch']}): {what} {now}, the table has {then}")
            elif now is None:
                continue
            elif now > then * (1 + margin) + 1e-9:
                failures.append(f"{r['kernel']} ({r['arch']}): {what} {now:g}, the table has {then:g} "
                                f"(more than {margin:.0%} over)")
            elif now < then * (1 - margin) - 1e-9:
                notes.append(f"{r['kernel']} ({r['arch']}): {what} {now:g}, down from {then:g}: "
                             f"record it with --write")
    for n in notes:
        print(f"note: {n}")
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return not failures


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvcc", default=os.environ.get("NVCC"), help="the pinned nvcc (default $NVCC)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    ap.add_argument("--margin", type=float, default=0.05)
    args = ap.parse_args()
    if not args.nvcc:
        die("no nvcc: pass --nvcc or set $NVCC (scripts/kernel-stats.sh finds the pinned one)")
    rows = measure(args.nvcc)
    if args.write:
        write_table(rows)
        print(table(rows))
        print(f"written to {DOC.relative_to(ROOT)}")
    elif args.check:
        ok = check(rows, args.margin)
        n = sum(1 for r in rows if "loop" in r)
        print(f"{len(rows)} kernel builds, {n} attention main loops: "
              + ("no spills, no loop grown past the table" if ok else "FAILED"))
        sys.exit(0 if ok else 1)
    else:
        print(table(rows))


if __name__ == "__main__":
    main()
