"""Encode + decode throughput of a visual tokenizer, and the FLOP/s it implies.

    python scripts/bench_tokenizer.py [--tokenizer DIR | --size shapes] [--batch-size 64] [--repeats 7]

Times `encode` (pixel + semantic encoders, quantizer) and `decode` (pixel decoder) at one batch
size under bf16 autocast (fp32 where bf16 is unsupported), counts their FLOPs with torch's
FlopCounterMode, and measures the machine's dense bf16 matmul peak in the same run, so the
utilisation figure compares like with like. Prints medians over --repeats runs.
"""

from __future__ import annotations

import argparse
import json

import torch
from perf import count_flops, measure_matmul_peak, median, time_call

from mllm.runtime import autocast, resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", help="trained tokenizer folder (default: a fresh --size model)")
    parser.add_argument("--size", default="shapes", help="named size when no --tokenizer is given")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    args = parser.parse_args()

    from tokenizer_vision import DualCodebookTokenizer

    torch.manual_seed(0)
    if args.tokenizer:
        tokenizer = DualCodebookTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = DualCodebookTokenizer.from_name(args.size).eval()
    precision = resolve_precision(args.precision, "cpu")
    size = tokenizer.image_size
    pixels = torch.rand(args.batch_size, 3, size, size) * 2 - 1
    with torch.no_grad(), autocast(precision):
        codes = tokenizer.encode(pixels)
        encode_flops = count_flops(lambda: tokenizer.encode(pixels))
        decode_flops = count_flops(lambda: tokenizer.decode(codes))
        encode_s = median(time_call(lambda: tokenizer.encode(pixels), repeats=args.repeats))
        decode_s = median(time_call(lambda: tokenizer.decode(codes), repeats=args.repeats))
    peak = measure_matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
    total_s = encode_s + decode_s
    result = {
        "batch_size": args.batch_size,
        "image_size": size,
        "grid": list(tokenizer.grid_size),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "encode_images_per_s": args.batch_size / encode_s,
        "decode_images_per_s": args.batch_size / decode_s,
        "encode_decode_images_per_s": args.batch_size / total_s,
        "gflop_per_image": (encode_flops + decode_flops) / args.batch_size / 1e9,
        "achieved_gflop_per_s": (encode_flops + decode_flops) / total_s / 1e9,
        "matmul_peak_gflop_per_s": peak / 1e9,
    }
    result["fraction_of_peak"] = result["achieved_gflop_per_s"] / result["matmul_peak_gflop_per_s"]
    print(json.dumps(result, indent=2))
    print(f"encode+decode {result['encode_decode_images_per_s']:.0f} images/s at batch {args.batch_size}; "
          f"{result['achieved_gflop_per_s']:.1f} GFLOP/s = {100 * result['fraction_of_peak']:.1f}% of the measured "
          f"{precision} matmul peak ({result['matmul_peak_gflop_per_s']:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()
