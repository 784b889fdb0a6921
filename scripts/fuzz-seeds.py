#!/usr/bin/env python3
"""Writes the fuzz targets' seed corpora: OUT/<target>/<name> for every target of fuzz/.

Usage: fuzz-seeds.py MODEL.gguf OUT [KQUANTS.json]

Seeds come from the real model's header (its metadata and tensor directory, the vocabulary cut
to a few hundred tokens so that one run stays fast) and from the test fixtures (the k-quant blocks
of ape-llama/tests/fixtures/kquants.json). Every seed is a well-formed input that the code under test
accepts, so the fuzzer starts from the deep paths, not from the first check.
"""

import json
import os
import random
import struct
import sys

# GGUF metadata value types.
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f",
          BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
# ggml tensor types: id -> (values per block, bytes per block).
GGML = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20),
        "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144), "Q6_K": (14, 256, 210), "BF16": (30, 1, 2)}
BLOCK = {tid: (vals, size) for tid, vals, size in GGML.values()}


class Reader:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, fmt):
        v = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self):
        n = self.take("<Q")
        s = self.data[self.pos:self.pos + n]
        self.pos += n
        return s

    def value(self, ty):
        if ty == STR:
            return self.string()
        if ty == ARR:
            elem, n = self.take("<I"), self.take("<Q")
            return (elem, [self.value(elem) for _ in range(n)])
        return self.take(SCALAR[ty])


def read_header(path):
    """The metadata [(key, type, value)] and tensor directory [(name, dims, type)] of a GGUF."""
    with open(path, "rb") as f:
        data = f.read(8 << 20)  # the header of the default model is ~1.5 MB
    r = Reader(data)
    assert r.data[:4] == b"GGUF", "not a GGUF file"
    r.pos = 4
    r.take("<I")
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    kv = []
    for _ in range(n_kv):
        key = r.string().decode()
        ty = r.take("<I")
        kv.append((key, ty, r.value(ty)))
    tensors = []
    for _ in range(n_tensors):
        name = r.string().decode()
        dims = [r.take("<Q") for _ in range(r.take("<I"))]
        ty = r.take("<I")
        r.take("<Q")
        tensors.append((name, dims, ty))
    return kv, tensors


def put_value(out, ty, v):
    if ty == STR:
        out += struct.pack("<Q", len(v)) + v
    elif ty == ARR:
        elem, items = v
        out += struct.pack("<IQ", elem, len(items))
        for x in items:
            put_value(out, elem, x)
    else:
        out += struct.pack(SCALAR[ty], v)


def write_gguf(kv, tensors, align=32, version=3):
    """GGUF bytes: metadata [(key, type, value)], tensors [(name, dims, type, data)]."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kv)))
    for key, ty, v in kv:
        put_value(out, STR, key.encode())
        out += struct.pack("<I", ty)
        put_value(out, ty, v)
    data = bytearray()
    for name, dims, ty, blob in tensors:
        data += b"\0" * (-len(data) % align)
        put_value(out, STR, name.encode())
        out += struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, len(data))
        data += blob
    out += b"\0" * (-len(out) % align)
    return bytes(out + data)


def cut_vocab(kv, n):
    """The metadata with the vocabulary cut to its first n tokens (and the merges that stay
    within them), special ids outside it moved inside."""
    tokens = next(v for k, _, v in kv if k == "tokenizer.ggml.tokens")[1][:n]
    keep = set(tokens)
    out = []
    for key, ty, v in kv:
        if key == "tokenizer.ggml.tokens":
            v = (STR, tokens)
        elif key == "tokenizer.ggml.token_type":
            v = (v[0], v[1][:n])
        elif key == "tokenizer.ggml.merges":
            merges = []
            for m in v[1]:
                a, _, b = m.partition(b" ")
                if a in keep and b in keep and a + b in keep:
                    merges.append(m)
            v = (STR, merges)
        elif key.endswith("_token_id") and isinstance(v, int) and v >= n:
            v = n - 1
        elif key == "llama.vocab_size":
            v = n
        out.append((key, ty, v))
    return out


def f16(x):
    return struct.pack("<e", x)


def blocks(ty, n_values, rng):
    """Plausible bytes of n_values values of ggml type ty: random quants, small finite scales."""
    vals, size = BLOCK[ty]
    if ty == 0:
        return b"".join(struct.pack("<f", rng.uniform(-1, 1)) for _ in range(n_values))
    if ty in (1, 30):
        return bytes(rng.getrandbits(8) & 0xBF if i % 2 else rng.getrandbits(8)
                     for i in range(2 * n_values))
    out = bytearray()
    for _ in range(n_values // vals):
        b = bytearray(rng.getrandbits(8) for _ in range(size))
        if ty in (2, 3, 8):
            b[0:2] = f16(0.02)
            if ty == 3:
                b[2:4] = f16(-0.1)
        elif ty == 12:
            b[0:2], b[2:4] = f16(0.01), f16(0.005)
        elif ty == 14:
            b[208:210] = f16(0.003)
        out += b
    return bytes(out)


def shrunk_model(kv, directory, rng, version=3):
    """The real model's metadata and tensor types at a tiny shape: 2 layers, dim 32, 2 heads of
    16, 1 KV head, FFN 64, the vocabulary cut to 64; every tensor present with plausible data."""
    d, heads, kv_heads, ffn, layers, vocab = 32, 2, 1, 64, 2, 64
    size = {"llama.embedding_length": d, "llama.attention.head_count": heads,
            "llama.attention.head_count_kv": kv_heads, "llama.feed_forward_length": ffn,
            "llama.block_count": layers, "llama.context_length": 256,
            "llama.rope.dimension_count": d // heads}
    meta = [(k, ty, size.get(k, v)) for k, ty, v in cut_vocab(kv, vocab)]
    kvd = kv_heads * d // heads
    shapes = {"token_embd.weight": [d, vocab], "output.weight": [d, vocab],
              "output_norm.weight": [d], "attn_norm.weight": [d], "ffn_norm.weight": [d],
              "attn_q.weight": [d, d], "attn_k.weight": [d, kvd], "attn_v.weight": [d, kvd],
              "attn_output.weight": [d, d], "ffn_gate.weight": [d, ffn],
              "ffn_up.weight": [d, ffn], "ffn_down.weight": [ffn, d]}
    tensors = []
    for name, _, ty in directory:
        parts = name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= layers:
            continue
        dims = shapes[".".join(parts[2:]) if parts[0] == "blk" else name]
        n = 1
        for x in dims:
            n *= x
        if BLOCK[ty][0] > dims[0]:
            ty = 8  # a k-quant row wider than the tiny shape: Q8_0 instead
        tensors.append((name, dims, ty, blocks(ty, n, rng)))
    return write_gguf(meta, tensors, version=version)


def one_tensor_files(kquants, rng):
    """A file per ggml type, each with one tensor (and the k-quant fixtures' real blocks)."""
    out = {}
    for tname, (ty, vals, _) in GGML.items():
        n = max(vals, 32) * 2
        blob = blocks(ty, n, rng)
        if tname in kquants:
            blob = bytes.fromhex(kquants[tname]["bytes"])
            n = len(blob) // BLOCK[ty][1] * vals
        meta = [("general.architecture", STR, b"llama"), ("general.alignment", U32, 32)]
        dims = [n] if n < 512 else [vals, n // vals]
        out[f"type-{tname}"] = write_gguf(meta, [(f"t.{tname}", dims, ty, blob)])
    return out


def safetensors_file(tensors, metadata=None):
    """safetensors bytes: tensors [(name, dtype, shape, data)]."""
    header, offset, data = {}, 0, b""
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, dtype, shape, blob in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        data += blob
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds(rng):
    def raw(n, width):
        return bytes(rng.getrandbits(8) for _ in range(n * width))

    p = "model.layers.0.self_attn."
    return {
        "f32": safetensors_file([("model.norm.weight", "F32", [8],
                                  b"".join(struct.pack("<f", 1.0) for _ in range(8)))]),
        "mixed": safetensors_file([
            (p + "q_proj.weight", "BF16", [8, 8], raw(64, 2)),
            (p + "k_proj.weight", "F16", [4, 8], raw(32, 2)),
            ("model.embed_tokens.weight", "F32", [6, 8], raw(48, 4)),
        ], {"format": "pt"}),
        "unsupported-dtype": safetensors_file([("lm_head.weight", "I32", [2, 2], raw(4, 4))]),
        "empty-tensor": safetensors_file([("x", "F16", [0, 4], b""), ("y", "BF16", [1], raw(1, 2))]),
        "no-tensors": safetensors_file([]),
    }


def config_seeds(kv):
    meta = {k: v for k, _, v in kv}

    def m(key):
        return meta[f"llama.{key}"]

    smollm = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": m("embedding_length"), "intermediate_size": m("feed_forward_length"),
        "num_attention_heads": m("attention.head_count"),
        "num_key_value_heads": m("attention.head_count_kv"),
        "num_hidden_layers": m("block_count"), "max_position_embeddings": m("context_length"),
        "rms_norm_eps": m("attention.layer_norm_rms_epsilon"), "rope_theta": m("rope.freq_base"),
        "vocab_size": len(meta["tokenizer.ggml.tokens"][1]),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id", 1),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id", 2),
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "rope_scaling": None,
    }
    llama3 = {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
        "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "vocab_size": 128256, "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }
    minimal = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
               "num_hidden_layers": 1, "rms_norm_eps": 1e-6, "max_position_embeddings": 32,
               "vocab_size": 10}
    return {name: json.dumps(c, indent=2).encode()
            for name, c in [("smollm2", smollm), ("llama3", llama3), ("minimal", minimal)]}


def chat_request_seeds():
    """Request bodies of `ape serve`: plain chat, documents with modes, streaming, a documents
    request, and a few near misses."""
    q = {"role": "user", "content": "Who founded the bakery?"}
    docs = [{"text": "The Lantern Bakery was founded by Mira Kovac.", "title": "Bakery"},
            "Esterhill is a town on the river Vel."]
    bodies = {
        "plain": {"model": "m", "messages": [q]},
        "documents-ape": {"messages": [{"role": "system", "content": "Be brief."}, q],
                          "documents": docs, "ape": {"mode": "ape", "temperature": 0.8, "scale": 0.9},
                          "max_tokens": 16, "temperature": 0, "seed": 7, "stop": ["\n\n", "END"]},
        "stream-parts": {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                         "stream": True, "stream_options": {"include_usage": True}, "top_p": 0.5},
        "turns": {"messages": [q, {"role": "assistant", "content": "Mira."}, q],
                  "documents": docs, "ape": {"mode": "block-attention"}},
        "documents-request": {"documents": docs, "ape": {"mode": "parallel"}, "system": "s"},
        "bad-mode": {"messages": [q], "ape": {"mode": "fast", "temperature": -1}},
    }
    return {name: json.dumps(b).encode() for name, b in bodies.items()}


def main():
    model, out = sys.argv[1], sys.argv[2]
    kquants = {}
    if len(sys.argv) > 3:
        with open(sys.argv[3]) as f:
            kquants = json.load(f)
    rng = random.Random(1)
    kv, directory = read_header(model)
    seeds = {
        "gguf": {
            # The real metadata and tensor directory, with no data after it.
            "real-directory": write_gguf(cut_vocab(kv, 64),
                                         [(n, d, t, b"") for n, d, t in directory]),
            "real-shrunk": shrunk_model(kv, directory, rng),
            "real-shrunk-v2": shrunk_model(kv, directory, rng, version=2),
            **one_tensor_files(kquants, rng),
        },
        "gguf_tokenizer": {
            f"real-metadata-{n}": write_gguf(cut_vocab(kv, n), []) for n in (64, 300)
        },
        "safetensors": safetensors_seeds(rng),
        "hf_config": config_seeds(kv),
        "chat_request": chat_request_seeds(),
    }
    for target, files in seeds.items():
        d = os.path.join(out, target)
        os.makedirs(d, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        print(f"{target}: {len(files)} seeds, {sum(map(len, files.values()))} bytes")


if __name__ == "__main__":
    main()
