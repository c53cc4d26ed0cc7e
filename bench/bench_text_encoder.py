"""Load time, encode time and memory of text encoders on CPU, per dtype (ella_core.dtypes names).

T5: random weights with flan-t5-xl's encoder shapes (d_model 2048, d_ff 5120, 24 layers, 32 heads x 64,
vocab 32128, gated-gelu; fewer layers with --layers) are written once as an fp16 safetensors folder (the
README's recipe, with `wo` in fp32 as transformers keeps it) with ComfyUI's T5 tokenizer.
GGUF (--gguf FILE, default $ELLA_SMOLLM2_GGUF): a real quantised LLM, which transformers de-quantises at load.
Each (model, dtype) runs in a fresh subprocess so its memory is its own: "weights" is the bytes of the loaded
module's tensors (what it takes on the GPU, and in RAM when offloaded); after loading and encoding once, "private"
is the process's anonymous resident memory and "mapped" its resident file pages (the safetensors file is
memory-mapped: clean page cache the kernel can drop), torch's own included: the row "baseline" is a process that
imported everything and loaded nothing; "peak" is the high-water mark (VmHWM) of the two together.

    python bench/bench_text_encoder.py [--layers 24] [--threads 2] [--dtypes fp32,bf16,fp16,fp8_e4m3fn]
                                       [--gguf FILE] [--gguf-dtypes bf16,fp16,fp8_e4m3fn] [--no-t5]
"""

from __future__ import annotations

import argparse
import json
import os
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
            kept = key.endswith("DenseReluDense.wo.weight")  # fp32 in the recipe's file (_keep_in_fp32_modules)
            state[key] = (torch.randn(param.shape, generator=generator) * std).to(torch.float32 if kept else torch.float16)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    tokenizer = Path(os.environ["COMFYUI_PATH"]) / "comfy" / "text_encoders" / "t5_tokenizer"
    for item in tokenizer.iterdir():
        shutil.copy(item, folder / item.name)


def _status_gib(field: str) -> float:
    """VmHWM (peak), RssAnon (private) or RssFile (mapped files) of this process, from /proc/self/status
    (unlike ru_maxrss, VmHWM is not inherited from the parent process)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def _memory() -> dict:
    return {"anon_gib": _status_gib("RssAnon"), "file_gib": _status_gib("RssFile"), "peak_gib": _status_gib("VmHWM")}


def measure(folder: str, dtype: str, threads: int) -> dict:
    """Runs in the child process."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    import transformers  # noqa: F401  (imported before the baseline, like the loader needs it)

    from ella_core.text_encoder import load_text_encoder

    if dtype == "baseline":
        return {"dtype": dtype, "ran_in": "-", "weights_gib": 0.0, **_memory()}
    start = time.perf_counter()
    enc = load_text_encoder(folder, dtype=dtype)
    load_s = time.perf_counter() - start
    tensors = [*enc.model.parameters(), *enc.model.buffers()]
    weights = sum(t.numel() * t.element_size() for t in tensors) / 2**30
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = enc.encode(PROMPT, max_length=128)
        times.append(time.perf_counter() - start)
    return {
        "dtype": dtype, "ran_in": str(out.dtype).replace("torch.", ""), "load_s": load_s, "encode_first_s": times[0],
        "encode_s": times[1], "dropped": out.dropped[0], "overflow": out.overflow_recomputed,
        "weights_gib": weights, **_memory(),
    }  # fmt: skip


def run_children(source: str, dtypes: list[str], threads: int) -> list[dict]:
    rows = []
    for dtype in ["baseline", *dtypes]:
        cmd = [sys.executable, __file__, "--child", source, dtype, "--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f"{dtype}: failed\n{done.stderr[-2000:]}")
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'dtype':11} {'ran in':9} {'weights GiB':>11} {'private GiB':>11} {'mapped GiB':>10} {'peak GiB':>9} "
          f"{'load s':>7} {'1st encode s':>13} {'encode s':>9}")  # fmt: skip
    for r in rows:
        memory = f"{r['weights_gib']:11.2f} {r['anon_gib']:11.2f} {r['file_gib']:10.2f} {r['peak_gib']:9.2f}"
        if r["dtype"] == "baseline":
            print(f"{'baseline':11} {'-':9} {memory}")
            continue
        print(f"{r['dtype']:11} {r['ran_in']:9} {memory} "
              f"{r['load_s']:7.2f} {r['encode_first_s']:13.2f} {r['encode_s']:9.2f}"
              + ("  (fp16 overflow, recomputed in fp32)" if r["overflow"] else ""))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", default="fp32,bf16,fp16,fp8_e4m3fn")
    parser.add_argument("--gguf", default=os.environ.get("ELLA_SMOLLM2_GGUF"), help="a .gguf LLM ('' to skip)")
    parser.add_argument("--gguf-dtypes", default="bf16,fp16,fp8_e4m3fn")
    parser.add_argument("--no-t5", action="store_true", help="only the GGUF part")
    parser.add_argument("--child", nargs=2, metavar=("SOURCE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.threads)))
        return
    import torch
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads")
    if not args.no_t5:
        with tempfile.TemporaryDirectory(prefix="ella_bench_t5xl_") as tmp:
            start = time.perf_counter()
            write_model(Path(tmp), args.layers)
            size = (Path(tmp) / "model.safetensors").stat().st_size / 2**30
            print(f"\nT5 encoder, flan-t5-xl widths, {args.layers} layers: fp16 file {size:.2f} GiB "
                  f"(written in {time.perf_counter() - start:.1f} s)")  # fmt: skip
            print_rows(run_children(tmp, args.dtypes.split(","), args.threads))
        print("encode: one prompt, fixed mode, 128 tokens (truncated from a longer prompt)")
    if args.gguf:
        size = Path(args.gguf).stat().st_size / 2**30
        print(f"\nGGUF {Path(args.gguf).name}: file {size:.3f} GiB; transformers de-quantises it at load")
        print_rows(run_children(args.gguf, args.gguf_dtypes.split(","), args.threads))


if __name__ == "__main__":
    main()
