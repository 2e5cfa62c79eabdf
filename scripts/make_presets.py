#!/usr/bin/env python3
"""Writes the layer_types presets of docs/design.md §1 for the tiny, small and TinyLlama-1.1B shapes
into configs/. Run it after changing a shape or a preset; the JSON files are committed."""
import json
import os

SHAPES = {
    "tiny": dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
                 intermediate_size=1024),
    "small": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, num_key_value_heads=6,
                  intermediate_size=2048),
    "tinyllama-1.1b": dict(num_hidden_layers=22, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                           intermediate_size=5632),
}


def identity(L):
    return [str(i) for i in range(L)]


def sandwich(L, w):
    """w warmup layers, half at the bottom and half at the top; the rest attend to the top-most
    non-warmup layer."""
    bottom, top = w // 2, w - w // 2
    target = L - top - 1
    return [str(i) if i < bottom or i > target else str(target) for i in range(L)]


def cla(L):
    return [str(i - i % 2) for i in range(L)]


def yoco(L):
    half = L // 2
    return [f"{i}s" if i < half else str(half) for i in range(L)]


def sandwich_middle(L):
    mid = L // 2 - 1
    return [str(i) if i in (0, L - 1) else str(mid) for i in range(L)]


PRESETS = {
    "llama": identity,
    "lckv-w2": lambda L: sandwich(L, 2),
    "lckv-w10": lambda L: sandwich(L, 10),
    "cla": cla,
    "yoco": yoco,
    "sandwich-middle": sandwich_middle,
}


def main():
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
    for shape, dims in SHAPES.items():
        for name, make in PRESETS.items():
            L = dims["num_hidden_layers"]
            if name == "lckv-w10" and L <= 10:
                continue  # needs more than 10 layers
            cfg = {
                "architectures": ["LCKVLlamaForCausalLM"],
                "model_type": "lckv-llama",
                "vocab_size": 32000,
                **dims,
                "hidden_act": "silu",
                "max_position_embeddings": 2048,
                "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0,
                "tie_word_embeddings": False,
                "initializer_range": 0.02,
                "bos_token_id": 1,
                "eos_token_id": 2,
                "layer_types": "_".join(make(L)),
                "forward_passes": 7,
                "backward_passes": 2,
                "sliding_window": 1024,
            }
            path = os.path.join(out_dir, f"{shape}-{name}.json")
            with open(path, "w") as f:
                json.dump(cfg, f, indent=2)
                f.write("\n")
            print(path, cfg["layer_types"])


if __name__ == "__main__":
    main()
