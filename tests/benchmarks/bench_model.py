"""Model benchmark: prefill and decode tokens/s per preset on this device, and what span reporting costs.

    python tests/benchmarks/bench_model.py                      # tiny and 125m on CPU; every preset on a GPU
    python tests/benchmarks/bench_model.py --presets 1b 8b --decode-batches 1 128 --compile

Prints figures; asserts nothing. On CUDA it also measures device-to-device copy bandwidth and reports
decode at each batch as a fraction of the HBM roofline (weight bytes per step / step time / copy bandwidth).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from wattledger.agent.accounting import Accounting
from wattledger.workloads.model import KVCache, StaticDecoder, build_model, default_dtype, model_config, pick_device
from wattledger.workloads.reporter import DECODE_ACTIVITY, AccountingReporter


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth_bytes_per_s(device: torch.device) -> float | None:
    """Device-to-device copy bandwidth (read + write bytes per second), the decode roofline's denominator."""
    if device.type != "cuda":
        return None
    source = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    synchronize(device)
    return 2 * source.numel() * 10 / (time.perf_counter() - started)


@torch.no_grad()
def prefill(model, config, device, dtype, prompt_tokens: int, batch: int, repeats: int) -> dict:
    cache = KVCache(config, batch, prompt_tokens, device, dtype)
    tokens = torch.randint(0, config.vocab_size, (batch, prompt_tokens), device=device)
    model.forward_cached(tokens, [prompt_tokens] * batch, list(range(batch)), cache)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        for slot in range(batch):
            cache.reset(slot)
        model.forward_cached(tokens, [prompt_tokens] * batch, list(range(batch)), cache)
    synchronize(device)
    seconds = (time.perf_counter() - started) / repeats
    return {"batch": batch, "prompt_tokens": prompt_tokens, "tokens_per_s": batch * prompt_tokens / seconds}


@torch.no_grad()
def decode(model, config, device, dtype, batch: int, context: int, steps: int, compile: bool,
           reporter: AccountingReporter | None = None) -> dict:
    """Decode ``steps`` tokens for ``batch`` sequences after a ``context``-token prefill (static decoder)."""
    cache = KVCache(config, batch + 1, context + steps + 8, device, dtype)
    decoder = StaticDecoder(model, cache, compile=compile)
    slots = list(range(batch))
    prompt = torch.randint(0, config.vocab_size, (batch, context), device=device)
    logits = model.forward_cached(prompt, [context] * batch, slots, cache)
    next_tokens = logits.argmax(-1).tolist()
    for _ in range(3):  # warm-up (and compilation)
        next_tokens = decoder.step(next_tokens, slots).argmax(-1).tolist()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step_start = time.monotonic_ns()
        # .tolist() is the per-step sync a server needs anyway (it streams the tokens): spans end after it.
        next_tokens = decoder.step(next_tokens, slots).argmax(-1).tolist()
        if reporter is not None:
            reporter.span("compute", step_start, time.monotonic_ns(), DECODE_ACTIVITY)
            reporter.add_tokens("generated", batch)
    seconds = time.perf_counter() - started
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"batch": batch, "context": context, "tokens_per_s": batch * steps / seconds,
            "step_ms": 1000 * seconds / steps, "weight_bytes": weight_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--presets", nargs="*", default=None)
    parser.add_argument("--decode-batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    device = pick_device(args.device)
    dtype = default_dtype(device)
    presets = args.presets or (["tiny", "125m", "1b", "8b"] if device.type == "cuda" else ["tiny", "125m"])
    bandwidth = copy_bandwidth_bytes_per_s(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    results: dict = {"device": f"{device} ({name})", "dtype": str(dtype), "torch": torch.__version__,
                     "copy_bandwidth_gb_per_s": bandwidth / 1e9 if bandwidth else None, "presets": {}}
    for preset in presets:
        config = model_config(preset)
        model = build_model(config, device, dtype).eval()
        context = min(512, config.max_seq_len // 4)
        row = {"prefill": prefill(model, config, device, dtype, context, 1, 3), "decode": []}
        for batch in args.decode_batches:
            figures = decode(model, config, device, dtype, batch, context, args.steps, args.compile)
            if bandwidth:
                figures["hbm_roofline_fraction"] = figures["weight_bytes"] / (figures["step_ms"] / 1000) / bandwidth
            row["decode"].append(figures)
        results["presets"][preset] = row
        del model
    # What span reporting costs on the decode hot path: the same loop with and without an in-process reporter.
    config = model_config(presets[0])
    model = build_model(config, device, dtype).eval()
    bare = decode(model, config, device, dtype, 1, 64, 400, args.compile)
    accounting = Accounting([0])
    reporter = AccountingReporter(accounting, "bench", [0])
    reporter.start()
    reported = decode(model, config, device, dtype, 1, 64, 400, args.compile, reporter=reporter)
    reporter.stop()
    results["span_reporting"] = {
        "preset": presets[0], "bare_step_ms": bare["step_ms"], "reported_step_ms": reported["step_ms"],
        "overhead_us_per_step": 1000 * (reported["step_ms"] - bare["step_ms"]),
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"device: {results['device']}, {dtype}, torch {torch.__version__}"
          + (f", copy bandwidth {results['copy_bandwidth_gb_per_s']:.0f} GB/s" if bandwidth else ""))
    for preset, row in results["presets"].items():
        p = row["prefill"]
        print(f"{preset:>5}: prefill {p['tokens_per_s']:,.0f} tok/s ({p['prompt_tokens']} tokens, batch 1)")
        for d in row["decode"]:
            roofline = f", {100 * d['hbm_roofline_fraction']:.0f}% of HBM roofline" if "hbm_roofline_fraction" in d else ""
            print(f"       decode batch {d['batch']:>3}: {d['tokens_per_s']:,.0f} tok/s, {d['step_ms']:.2f} ms/step{roofline}")
    s = results["span_reporting"]
    print(f"span reporting on decode ({s['preset']}, batch 1): {s['bare_step_ms']:.3f} ms/step bare, "
          f"{s['reported_step_ms']:.3f} ms/step reported ({s['overhead_us_per_step']:+.1f} us/step)")


if __name__ == "__main__":
    main()
