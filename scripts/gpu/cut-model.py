#!/usr/bin/env python3
"""Cuts a Llama GGUF (v2/v3) down to its first N transformer blocks, so the real model fits in what
travels to the GPU machine (64 MiB). Stdlib only.

    python3 scripts/gpu/cut-model.py IN.gguf OUT.gguf N

Keeps every metadata key/value (tokenizer included) byte for byte, except `llama.block_count`,
which becomes N (in its original integer type); keeps every tensor outside `blk.*`
(token_embd.weight, output_norm.weight, ...) and the tensors of blocks 0..N-1, with their data
copied unchanged and re-laid at multiples of `general.alignment` (default 32). The result is a
smaller, well-formed model: it answers differently, but GPU and CPU forward passes on it can be
compared exactly as on the whole model.
"""
import os
import re
import struct
import sys

# ggml type id -> (elements per block, bytes per block), for the tensor byte sizes.
GGML_TYPES = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 36),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    30: (1, 2),  # BF16
}
# Metadata value type id -> struct format of a scalar (8 = string, 9 = array are handled apart).
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class Reader:
    def __init__(self, f):
        self.f = f

    def take(self, n):
        b = self.f.read(n)
        if len(b) != n:
            sys.exit("cut-model: the file ends early (truncated GGUF?)")
        return b

    def u32(self):
        return struct.unpack("<I", self.take(4))[0]

    def u64(self):
        return struct.unpack("<Q", self.take(8))[0]

    def string(self):
        return self.take(self.u64())

    def skip_value(self, ty):
        """Reads past one value of type `ty` and returns its raw bytes."""
        if ty in SCALARS:
            return self.take(struct.calcsize(SCALARS[ty]))
        if ty == 8:
            n = self.take(8)
            return n + self.take(struct.unpack("<Q", n)[0])
        if ty == 9:
            head = self.take(12)
            item_ty, count = struct.unpack("<IQ", head)
            if item_ty in SCALARS:  # a fixed-size array: one read
                return head + self.take(count * struct.calcsize(SCALARS[item_ty]))
            return head + b"".join(self.skip_value(item_ty) for _ in range(count))
        sys.exit(f"cut-model: unknown metadata value type {ty}")


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    src, dst, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
    size = os.path.getsize(src)
    with open(src, "rb") as f:
        r = Reader(f)
        if r.take(4) != b"GGUF":
            sys.exit(f"cut-model: {src} is not a GGUF file")
        version = r.u32()
        if version not in (2, 3):
            sys.exit(f"cut-model: GGUF version {version} (2 or 3 expected)")
        n_tensors, n_kv = r.u64(), r.u64()

        kvs = []  # (key bytes, value type, raw value bytes)
        alignment, blocks = 32, None
        for _ in range(n_kv):
            key = r.string()
            ty = r.u32()
            raw = r.skip_value(ty)
            if key == b"general.alignment":
                alignment = struct.unpack(SCALARS[ty], raw)[0]
            if key == b"llama.block_count":
                if ty not in SCALARS or ty in (6, 7, 12):
                    sys.exit(f"cut-model: llama.block_count has type {ty}, not an integer")
                blocks = struct.unpack(SCALARS[ty], raw)[0]
                raw = struct.pack(SCALARS[ty], keep)
            kvs.append((key, ty, raw))
        if blocks is None:
            sys.exit("cut-model: no llama.block_count (not a Llama GGUF?)")
        if not 1 <= keep <= blocks:
            sys.exit(f"cut-model: N = {keep}, but the model has {blocks} blocks")

        tensors = []  # (name, dims, type, offset)
        for _ in range(n_tensors):
            name = r.string()
            dims = [r.u64() for _ in range(r.u32())]
            tensors.append((name, dims, r.u32(), r.u64()))
        data_start = -(-f.tell() // alignment) * alignment

        # Byte sizes from the type; an unknown type gets the gap to the next tensor's data.
        ends = sorted({t[3] for t in tensors} | {size - data_start})
        nbytes = {}
        for name, dims, ty, off in tensors:
            gap = ends[ends.index(off) + 1] - off
            n = 1
            for d in dims:
                n *= d
            if ty in GGML_TYPES:
                per, bpb = GGML_TYPES[ty]
                if n % per:
                    sys.exit(f"cut-model: {name.decode()}: {n} elements, not whole blocks of {per}")
                nbytes[name] = n // per * bpb
                if nbytes[name] > gap:
                    sys.exit(f"cut-model: {name.decode()}: {nbytes[name]} bytes overrun the next tensor")
            else:
                nbytes[name] = gap

        def kept(name):
            m = re.match(rb"blk\.(\d+)\.", name)
            return m is None or int(m.group(1)) < keep

        out_tensors, offset = [], 0
        for name, dims, ty, off in tensors:
            if kept(name):
                out_tensors.append((name, dims, ty, off, offset))
                offset = -(-(offset + nbytes[name]) // alignment) * alignment

        head = bytearray(b"GGUF")
        head += struct.pack("<IQQ", version, len(out_tensors), len(kvs))
        for key, ty, raw in kvs:
            head += struct.pack("<Q", len(key)) + key + struct.pack("<I", ty) + raw
        for name, dims, ty, _, new_off in out_tensors:
            head += struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
            head += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ty, new_off)
        head += bytes(-len(head) % alignment)

        with open(dst, "wb") as out:
            out.write(head)
            for name, _, _, off, new_off in out_tensors:
                out.write(bytes(len(head) + new_off - out.tell()))
                f.seek(data_start + off)
                out.write(r.take(nbytes[name]))
    print(f"{dst}: {keep} of {blocks} blocks, {len(out_tensors)} of {n_tensors} tensors, "
          f"{os.path.getsize(dst)} bytes")


if __name__ == "__main__":
    main()
