"""Model benchmark: prefill and decode tokens/s per preset on this device, and what span reporting costs.

    python tests/benchmarks/bench_model.py                      # tiny and 125m on CPU; every preset on a GPU
    python tests/benchmarks/bench_model.py --presets 1b 8b --decode-batches 1 128 --compile

Prints figures; asserts nothing. On CUDA it also measures device-to-device copy bandwidth and reports
decode at each batch as a fraction of the HBM roofline (a step's bytes from workloads/roofline.py: weights,
gathered embedding rows and the KV history attended; / step time / copy bandwidth).

Decode is also set beside a plain-torch decode loop of the same shape (``plain_decode``: a preallocated
cache read through slice views, the simplest correct code), as this repo's tokens/s over the plain loop's,
measured in alternating rounds (``--rounds``) and printed as the median with the range.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from wattledger.agent.accounting import Accounting
from wattledger.workloads import roofline
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


def timed_decode(step, first_tokens: list[int], steps: int, device, reporter: AccountingReporter | None = None,
                 batch: int = 1) -> float:
    """Seconds ``steps`` decode steps take after 3 warm-up steps (and compilation); ``step(tokens) -> logits``."""
    next_tokens = first_tokens
    for _ in range(3):
        next_tokens = step(next_tokens).argmax(-1).tolist()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step_start = time.monotonic_ns()
        # .tolist() is the per-step sync a server needs anyway (it streams the tokens): spans end after it.
        next_tokens = step(next_tokens).argmax(-1).tolist()
        if reporter is not None:
            reporter.span("compute", step_start, time.monotonic_ns(), DECODE_ACTIVITY)
            reporter.add_tokens("generated", batch)
    return time.perf_counter() - started


def decode_figures(model, config, dtype, batch: int, context: int, steps: int, seconds: float) -> dict:
    # Context attended per step: the prompt, the 3 warm-up tokens and on average half the timed ones, plus
    # the new token itself.
    attended = context + 3 + steps // 2 + 1
    step_bytes = roofline.decode_step_bytes(config, [attended] * batch, torch.finfo(dtype).bits // 8)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"batch": batch, "context": context, "tokens_per_s": batch * steps / seconds,
            "step_ms": 1000 * seconds / steps, "weight_bytes": weight_bytes, "step_bytes": step_bytes.total,
            "kv_bytes": step_bytes.kv_cache}


@torch.no_grad()
def decode(model, config, device, dtype, batch: int, context: int, steps: int, compile: bool,
           reporter: AccountingReporter | None = None) -> dict:
    """Decode ``steps`` tokens for ``batch`` sequences after a ``context``-token prefill (static decoder)."""
    cache = KVCache(config, batch + 1, context + steps + 8, device, dtype)
    decoder = StaticDecoder(model, cache, compile=compile)
    slots = list(range(batch))
    prompt = torch.randint(0, config.vocab_size, (batch, context), device=device)
    first = model.forward_cached(prompt, [context] * batch, slots, cache).argmax(-1).tolist()
    seconds = timed_decode(lambda tokens: decoder.step(tokens, slots), first, steps, device, reporter, batch)
    return decode_figures(model, config, dtype, batch, context, steps, seconds)


@torch.no_grad()
def dynamic_decode(model, config, device, dtype, batch: int, context: int, steps: int) -> dict:
    """The same decode through ``forward_cached`` (the eager serving path: no buckets, no spare slot)."""
    cache = KVCache(config, batch, context + steps + 8, device, dtype)
    slots = list(range(batch))
    prompt = torch.randint(0, config.vocab_size, (batch, context), device=device)
    first = model.forward_cached(prompt, [context] * batch, slots, cache).argmax(-1).tolist()

    def step(tokens):
        column = torch.tensor(tokens, dtype=torch.long)[:, None].to(device)
        return model.forward_cached(column, [1] * batch, slots, cache)

    seconds = timed_decode(step, first, steps, device)
    return decode_figures(model, config, dtype, batch, context, steps, seconds)


@torch.no_grad()
def plain_decode(model, config, device, dtype, batch: int, context: int, steps: int) -> dict:
    """The reference: the simplest correct decode loop of the same shape, on the same weights.

    One preallocated K/V tensor per layer stack, every sequence at the same length, so the new keys go in
    with a slice assignment and attention reads the slice ``[:, :, :length]`` (a view) without a mask.
    """
    max_len = context + steps + 8
    shape = (config.layers, batch, config.kv_heads, max_len, config.head_dim)
    keys, values = torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)
    length = 0

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        nonlocal length
        start, new = length, tokens.shape[1]
        positions = torch.arange(start, start + new, device=device)
        cos, sin = model.rope_cos[positions][None, None], model.rope_sin[positions][None, None]
        x = model.embedding(tokens)
        for layer, block in enumerate(model.blocks):
            q, k, v = block.attention.project(block.attention_norm(x), cos, sin)
            keys[layer, :, :, start:start + new] = k
            values[layer, :, :, start:start + new] = v
            out = F.scaled_dot_product_attention(q, keys[layer, :, :, :start + new], values[layer, :, :, :start + new],
                                                 is_causal=start == 0, enable_gqa=True)
            x = x + block.attention.o(out.transpose(1, 2).reshape(batch, new, -1))
            x = x + block.ffn(block.ffn_norm(x))
        length += new
        return model.lm_head(model.norm(x[:, -1]))

    prompt = torch.randint(0, config.vocab_size, (batch, context), device=device)
    first = forward(prompt).argmax(-1).tolist()
    step = lambda tokens: forward(torch.tensor(tokens, dtype=torch.long)[:, None].to(device))  # noqa: E731
    seconds = timed_decode(step, first, steps, device)
    return decode_figures(model, config, dtype, batch, context, steps, seconds)


def against_plain(model, config, device, dtype, batch: int, context: int, steps: int, rounds: int) -> dict:
    """This repo's decode (static decoder and forward_cached) over the plain loop's tokens/s, per round.

    The three run in turns, ``rounds`` times, so a noisy neighbour slows all three alike: each round's
    ratio compares runs made seconds apart. All three eager, as the plain loop is (a compiled decoder per
    round would recompile every round).
    """
    ratios: dict[str, list[float]] = {"static": [], "dynamic": []}
    plain_rates = []
    for _ in range(rounds):
        plain = plain_decode(model, config, device, dtype, batch, context, steps)["tokens_per_s"]
        plain_rates.append(plain)
        ratios["static"].append(decode(model, config, device, dtype, batch, context, steps, False)["tokens_per_s"]
                                / plain)
        ratios["dynamic"].append(dynamic_decode(model, config, device, dtype, batch, context, steps)["tokens_per_s"]
                                 / plain)
    return {"batch": batch, "rounds": rounds, "plain_tokens_per_s": sorted(plain_rates)[rounds // 2],
            **{f"{name}_ratio": _spread(values) for name, values in ratios.items()}}


def _spread(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"median": ordered[len(ordered) // 2], "min": ordered[0], "max": ordered[-1], "all": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--presets", nargs="*", default=None)
    parser.add_argument("--decode-batches", nargs="*", type=int, default=[1, 8])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of decode beside the plain loop (0: skip)")
    parser.add_argument("--skip-span-cost", action="store_true", help="leave out the span-reporting figure")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 is steadier on a shared machine")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = default_dtype(device)
    presets = args.presets or (["tiny", "125m", "1b", "8b"] if device.type == "cuda" else ["tiny", "125m"])
    bandwidth = copy_bandwidth_bytes_per_s(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    results: dict = {"device": f"{device} ({name})", "dtype": str(dtype), "torch": torch.__version__,
                     "threads": torch.get_num_threads(),
                     "copy_bandwidth_gb_per_s": bandwidth / 1e9 if bandwidth else None, "presets": {}}
    for preset in presets:
        config = model_config(preset)
        model = build_model(config, device, dtype).eval()
        context = min(512, config.max_seq_len // 4)
        row = {"prefill": prefill(model, config, device, dtype, context, 1, 3), "decode": []}
        for batch in args.decode_batches:
            figures = decode(model, config, device, dtype, batch, context, args.steps, args.compile)
            if bandwidth:
                figures["hbm_roofline_fraction"] = figures["step_bytes"] / (figures["step_ms"] / 1000) / bandwidth
            row["decode"].append(figures)
        if args.rounds:
            row["against_plain"] = [against_plain(model, config, device, dtype, batch, context, args.steps, args.rounds)
                                    for batch in args.decode_batches]
        results["presets"][preset] = row
        del model
    if not args.skip_span_cost:
        results["span_reporting"] = span_reporting_cost(presets[0], device, dtype, args.compile)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print_results(results, dtype, bandwidth)


def span_reporting_cost(preset: str, device, dtype, compile: bool) -> dict:
    """What span reporting costs on the decode hot path: the same loop with and without an in-process reporter."""
    config = model_config(preset)
    model = build_model(config, device, dtype).eval()
    bare = decode(model, config, device, dtype, 1, 64, 400, compile)
    accounting = Accounting([0])
    reporter = AccountingReporter(accounting, "bench", [0])
    reporter.start()
    reported = decode(model, config, device, dtype, 1, 64, 400, compile, reporter=reporter)
    reporter.stop()
    return {"preset": preset, "bare_step_ms": bare["step_ms"], "reported_step_ms": reported["step_ms"],
            "overhead_us_per_step": 1000 * (reported["step_ms"] - bare["step_ms"])}


def print_results(results: dict, dtype, bandwidth: float | None) -> None:
    print(f"device: {results['device']}, {dtype}, torch {torch.__version__}, {results['threads']} threads"
          + (f", copy bandwidth {results['copy_bandwidth_gb_per_s']:.0f} GB/s" if bandwidth else ""))
    for preset, row in results["presets"].items():
        p = row["prefill"]
        print(f"{preset:>5}: prefill {p['tokens_per_s']:,.0f} tok/s ({p['prompt_tokens']} tokens, batch 1)")
        for d in row["decode"]:
            roofline = f", {100 * d['hbm_roofline_fraction']:.0f}% of HBM roofline" if "hbm_roofline_fraction" in d else ""
            print(f"       decode batch {d['batch']:>3}: {d['tokens_per_s']:,.0f} tok/s, {d['step_ms']:.2f} ms/step{roofline}")
        for c in row.get("against_plain", []):
            static, dynamic = c["static_ratio"], c["dynamic_ratio"]
            print(f"       decode batch {c['batch']:>3} / plain-torch loop ({c['plain_tokens_per_s']:,.0f} tok/s): "
                  f"static decoder {static['median']:.2f} [{static['min']:.2f}-{static['max']:.2f}], "
                  f"forward_cached {dynamic['median']:.2f} [{dynamic['min']:.2f}-{dynamic['max']:.2f}] "
                  f"(median [range] of {c['rounds']} rounds)")
    if "span_reporting" not in results:
        return
    s = results["span_reporting"]
    print(f"span reporting on decode ({s['preset']}, batch 1): {s['bare_step_ms']:.3f} ms/step bare, "
          f"{s['reported_step_ms']:.3f} ms/step reported ({s['overhead_us_per_step']:+.1f} us/step)")


if __name__ == "__main__":
    main()
