"""Load time, encode time and peak memory of a flan-t5-xl-shaped encoder on CPU, per dtype.

Random weights with flan-t5-xl's encoder shapes (d_model 2048, d_ff 5120, 24 layers, 32 heads x 64,
vocab 32128, gated-gelu) are written once as an fp16 safetensors folder (like the released fp16 file) with
ComfyUI's T5 tokenizer; then each dtype runs in a fresh subprocess so its peak RSS is its own.

    python bench/bench_text_encoder.py [--layers 24] [--threads 2] [--dtypes fp32,bf16,fp16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAN_T5_XL = dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_heads=32, num_layers=24,
                  feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, is_encoder_decoder=False, use_cache=False)  # fmt: skip
PROMPT = ("a highly detailed photograph of an old lighthouse on a rocky cliff at sunset, waves crashing, "
          "seagulls in a golden sky, dramatic clouds, ") * 6  # fmt: skip


def write_model(folder: Path, layers: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**{**FLAN_T5_XL, "num_layers": layers})
    with torch.device("meta"):
        skeleton = T5EncoderModel(config)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for key, param in skeleton.state_dict().items():
        if key == "encoder.embed_tokens.weight":
            continue  # tied to shared.weight, as in the released files
        if param.ndim == 1:  # layer norms
            state[key] = torch.ones(param.shape, dtype=torch.float16)
        else:  # fan-in scaled so random activations stay in fp16 range
            std = 1.0 if key == "shared.weight" else param.shape[-1] ** -0.5
            state[key] = (torch.randn(param.shape, generator=generator) * std).to(torch.float16)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    tokenizer = Path(os.environ["COMFYUI_PATH"]) / "comfy" / "text_encoders" / "t5_tokenizer"
    for item in tokenizer.iterdir():
        shutil.copy(item, folder / item.name)


def measure(folder: str, dtype: str, threads: int) -> dict:
    """Runs in the child process."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from ella_core.text_encoder import load_text_encoder

    start = time.perf_counter()
    enc = load_text_encoder(folder, dtype=dtype)
    load_s = time.perf_counter() - start
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = enc.encode(PROMPT, max_length=128)
        times.append(time.perf_counter() - start)
    return {
        "dtype": dtype, "ran_in": str(out.dtype).replace("torch.", ""), "load_s": load_s, "encode_first_s": times[0],
        "encode_s": times[1], "dropped": out.dropped[0], "overflow": out.overflow_recomputed,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="fp32,bf16,fp16")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.threads)))
        return
    import torch

    with tempfile.TemporaryDirectory(prefix="ella_bench_t5xl_") as tmp:
        start = time.perf_counter()
        write_model(Path(tmp), args.layers)
        size = (Path(tmp) / "model.safetensors").stat().st_size / 2**30
        print(f"wrote a flan-t5-xl-shaped encoder ({args.layers} layers, fp16 file {size:.2f} GiB) in "
              f"{time.perf_counter() - start:.1f} s; torch {torch.__version__}, {args.threads} threads")  # fmt: skip
        rows = []
        for dtype in args.dtypes.split(","):
            cmd = [sys.executable, __file__, "--child", tmp, dtype, "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(f"{dtype}: failed\n{done.stderr[-2000:]}")
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"\n{'dtype':6} {'ran in':9} {'load s':>7} {'1st encode s':>13} {'encode s':>9} {'peak RSS GiB':>13}")
    for r in rows:
        print(f"{r['dtype']:6} {r['ran_in']:9} {r['load_s']:7.2f} {r['encode_first_s']:13.2f} {r['encode_s']:9.2f} "
              f"{r['peak_rss_gib']:13.2f}" + ("  (fp16 overflow, recomputed in fp32)" if r["overflow"] else ""))  # fmt: skip
    print("encode: one prompt, fixed mode, 128 tokens (truncated from a longer prompt)")


if __name__ == "__main__":
    main()
