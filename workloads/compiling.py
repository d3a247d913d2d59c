"""``torch.compile`` for a hot step, with CUDA graphs that can engage and a recompile limit that cannot hide.

Three things go wrong with a bare ``torch.compile(step, mode="reduce-overhead")`` on a decode step:

1. **No CUDA graphs.** The step writes into KV tensors it reaches through a plain object. Dynamo lifts them
   as ordinary graph inputs, and inductor's CUDA-graph trees refuse a graph that mutates an input that is
   neither a parameter nor a static input ("skipping cudagraphs due to mutated inputs"; torch source:
   ``torch/_inductor/cudagraph_utils.py``, ``check_for_mutation``). ``compile_step`` marks those tensors
   with ``torch._dynamo.mark_static_address``, which dynamo records on the graph's placeholders
   (``meta["tensor_dict"]["_dynamo_static_input_type"]``) and AOTAutograd turns into the static input
   indices that the check skips (``torch/_functorch/_aot_autograd/frontend_utils.py``).
2. **A shared recompile budget.** Dynamo keeps its compiled graphs, and counts them against
   ``torch._dynamo.config.recompile_limit`` (8 by default), per *code object* (``torch.compile``'s own
   docstring: "if you dynamically create multiple copies of a function, they will all share the same code
   cache"). Two decoders in one process (chat and agentic in one bench) would share one budget.
   ``compile_step`` compiles a copy of the function whose ``__code__`` is a fresh ``code.replace()`` copy,
   so each ``CompiledStep`` has its own cache and its own budget.
3. **A silent fall-back.** Past the limit dynamo logs one warning and runs every *new* shape eagerly from
   then on (``torch/_dynamo/convert_frame.py``: "torch._dynamo hit config.recompile_limit", then the frame
   is run with ``FrameAction.RUN_ONLY``), while the program goes on saying "compiled". ``CompiledStep``
   catches that warning for its own code object, counts the input signatures it was called with and the
   graphs dynamo holds for it, prints one line to stderr the first time, and ``report()`` says so.

Everything used from torch exists in 2.11 (the GPU machine) and 2.13 (the CPU development machine); the
few private helpers are read through ``getattr`` with a fallback, so a missing one costs a figure, not the
run. torch 2.13's ``torch.compile(recompile_limit=..., isolate_recompiles=...)`` would do part of this, but
2.11 has neither argument, so both versions take the same path here.
"""

from __future__ import annotations

import itertools
import logging
import re
import sys
import threading
import types
import weakref
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._dynamo  # not loaded by "import torch" alone; its config, counters and eval_frame are read here

# The message dynamo logs when a code object hits its limit; stable from torch 2.0 to 2.13
# (torch/_dynamo/convert_frame.py: "torch._dynamo hit config.%s (%s)\n   function: %s\n ...").
_LIMIT_HIT_PREFIX = "torch._dynamo hit config."
_DYNAMO_FRAME_LOGGER = "torch._dynamo.convert_frame"
_step_numbers = itertools.count(1)
_steps_by_code_name: "weakref.WeakValueDictionary[str, CompiledStep]" = weakref.WeakValueDictionary()
_hook_lock = threading.Lock()


def dynamo_recompile_limit() -> int:
    """Dynamo's graphs-per-code-object limit now: ``recompile_limit`` (torch >= 2.7) or ``cache_size_limit``."""
    config = torch._dynamo.config
    for option in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, option):
            return int(getattr(config, option))
    raise RuntimeError("this torch has neither torch._dynamo.config.recompile_limit nor cache_size_limit")


def _accumulated_limit_option() -> str | None:
    config = torch._dynamo.config
    for option in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, option):
            return option
    return None


def raise_recompile_limit(graphs: int) -> int:
    """Let one code object hold ``graphs`` graphs; returns the limit now in force.

    Dynamo's limit is one global value applied to each code object separately (torch 2.11 has no
    per-function limit), so this raises the global ``recompile_limit`` (and ``accumulated_recompile_limit``,
    the cap on all of one code object's entries, 256 by default) to at least ``graphs``. It never lowers
    them: other compiled code in the process keeps at least the budget it had.
    """
    config = torch._dynamo.config
    option = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if dynamo_recompile_limit() < graphs:
        setattr(config, option, graphs)
    accumulated = _accumulated_limit_option()
    if accumulated is not None and getattr(config, accumulated) < graphs:
        setattr(config, accumulated, graphs)
    return dynamo_recompile_limit()


def check_bucket_count(buckets: Iterable[Hashable], limit: int) -> None:
    """Raise ``ValueError`` (one line) when a step would need more graphs than ``limit`` allows.

    ``buckets`` are the distinct static shapes the step can be called with: batch sizes, or
    ``(batch, history)`` pairs when two dimensions are bucketed. With ``dynamic=False`` each one is a graph
    of its own, and dynamo runs every shape past ``limit`` eagerly.
    """
    distinct = set(buckets)
    if limit < 1:
        raise ValueError(f"the recompile limit must be at least 1, got {limit}")
    if len(distinct) > limit:
        raise ValueError(f"{len(distinct)} shape buckets need {len(distinct)} compiled graphs, but the recompile "
                         f"limit is {limit}: use fewer buckets or a limit of at least {len(distinct)}")


def _fresh_function(fn: Callable, code_name: str) -> Callable:
    """A copy of ``fn`` (a function or bound method) whose code object is new, so dynamo caches it apart."""
    if isinstance(fn, types.MethodType):
        return types.MethodType(_fresh_function(fn.__func__, code_name), fn.__self__)
    if not isinstance(fn, types.FunctionType):
        raise TypeError(f"compile_step takes a function or a bound method, not {type(fn).__name__}")
    changes = {"co_name": code_name}
    if hasattr(fn.__code__, "co_qualname"):  # Python >= 3.11
        changes["co_qualname"] = code_name
    copy = types.FunctionType(fn.__code__.replace(**changes), fn.__globals__, code_name, fn.__defaults__,
                              fn.__closure__)
    copy.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else None
    copy.__dict__.update(fn.__dict__)
    copy.__module__, copy.__doc__ = fn.__module__, fn.__doc__
    return copy


def _code_of(fn: Callable) -> types.CodeType:
    return fn.__func__.__code__ if isinstance(fn, types.MethodType) else fn.__code__


def _mark_static(tensors: Sequence[torch.Tensor]) -> int:
    """Mark each tensor as a static input (fixed address: no copy into a CUDA graph, mutation allowed)."""
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"static_tensors must be tensors, got {type(tensor).__name__}")
    mark = getattr(torch._dynamo, "mark_static_address", None)
    if mark is None:  # absent before torch 2.1; the step still compiles, without CUDA graphs
        return 0
    for tensor in tensors:
        # guard=False: no data-pointer guard, so swapping a tensor re-records a CUDA graph, not a recompile.
        mark(tensor, guard=False)
    return len(tensors)


def is_static_input(tensor: torch.Tensor) -> bool:
    """Whether dynamo will treat ``tensor`` as a static input (the attribute mark_static_address sets)."""
    return getattr(tensor, "_dynamo_static_input_type", None) is not None


class _LimitHitHandler(logging.Handler):
    """Routes dynamo's "hit config.recompile_limit" warning to the CompiledStep whose code object it names."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to report
            return
        if not message.startswith(_LIMIT_HIT_PREFIX):
            return
        for code_name, step in list(_steps_by_code_name.items()):
            if f"'{code_name}'" in message:
                # The limit line and dynamo's "last reason" (the guard that failed), without the advice.
                lines = [line.strip() for line in message.splitlines()]
                step._limit_hit("; ".join(line for line in lines if line.startswith(("torch._dynamo hit",
                                                                                      "last reason"))))


def _install_limit_hook() -> None:
    """Attach the handler once; checked on every new step because torch._logging.set_logs may reset loggers."""
    logger = logging.getLogger(_DYNAMO_FRAME_LOGGER)
    with _hook_lock:
        if not any(isinstance(handler, _LimitHitHandler) for handler in logger.handlers):
            logger.addHandler(_LimitHitHandler(level=logging.WARNING))


def _cache_entry_count(code: types.CodeType) -> int | None:
    """How many graphs dynamo holds for ``code`` (its cache entries), or None where torch cannot say."""
    entries = getattr(torch._dynamo.eval_frame, "_debug_get_cache_entry_list", None)
    if entries is None:
        return None
    try:
        return len(entries(code))
    except Exception:  # a private helper: a change of signature costs this figure only
        return None


def _cudagraph_skips() -> int:
    """Inductor's running count of graphs it refused to CUDA-graph (torch/_inductor/cudagraph_utils.py)."""
    return int(torch._dynamo.utils.counters["inductor"]["cudagraph_skips"])


def _compile_attempts() -> int:
    """Dynamo's running count of frames it was asked to compile (a cache miss on some code object)."""
    return int(torch._dynamo.utils.counters["frames"]["total"])


def _ran_compiled(graph_added: bool | None, compile_attempted: bool, limit_hit: bool) -> bool:
    """Whether a call with a new input signature ran a compiled graph.

    ``graph_added``: dynamo holds one more graph for the step than before the call (None: torch cannot
    say). ``compile_attempted``: dynamo's frame counter moved, so no graph's guards accepted the call.
    ``limit_hit``: dynamo reported this step's limit hit, during this call or before.
    """
    if graph_added:
        return True
    if compile_attempted:  # dynamo tried and added nothing: it hit the limit (or gave up) and ran eagerly
        return graph_added is None and not limit_hit
    # No attempt: an existing graph accepted the call, or the limit was hit before and dynamo no longer tries
    # (FrameAction.RUN_ONLY). A new signature with no dynamic dimension needs a graph of its own, so it is
    # counted as eager: this never claims compiled for a call that was not.
    return not limit_hit


def _dynamic_dimensions(tensor: torch.Tensor) -> set[int]:
    """Dimensions marked with torch._dynamo.mark_dynamic / maybe_mark_dynamic (attributes they set)."""
    dims: set[int] = set()
    for attribute in ("_dynamo_dynamic_indices", "_dynamo_weak_dynamic_indices"):
        dims |= set(getattr(tensor, attribute, ()))
    return dims


def _signature_of(value: Any) -> Hashable:
    """What dynamo specialises on with ``dynamic=False``: a tensor's shape (but not its dimensions marked
    dynamic, one graph serves all their sizes), dtype and device; a plain value itself."""
    if isinstance(value, torch.Tensor):
        dynamic = _dynamic_dimensions(value)
        shape = tuple(None if dim in dynamic else size for dim, size in enumerate(value.shape))
        return ("tensor", shape, value.dtype, value.device.type)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_signature_of(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return ("unhashable", type(value).__name__)
    return ("value", value)


def _clone_tensors(out: Any) -> Any:
    """Copies of the output tensors: CUDA-graph trees reuse output memory on the next replay, and a caller
    that kept last step's logits would read overwritten memory (or trip the trees' overwrite check)."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, tuple):
        return tuple(_clone_tensors(o) for o in out)
    if isinstance(out, list):
        return [_clone_tensors(o) for o in out]
    return out


@dataclass
class _Tally:
    """What a CompiledStep has seen: signatures (compiled or eager), calls, and dynamo's limit warning."""

    signatures: dict[Hashable, bool] = field(default_factory=dict)  # signature -> ran a compiled graph
    calls: int = 0
    eager_calls: int = 0
    cudagraph_skips: int = 0
    limit_message: str | None = None
    warned: bool = False


class CompiledStep:
    """A compiled step that knows whether it really ran compiled. Call it like the function it wraps.

    Made by ``compile_step``. ``report()`` gives what the step did so far; ``summary()`` one line of it.
    """

    def __init__(self, fn: Callable, *, name: str, device_type: str, mode: str | None, backend: str | Callable,
                 static_inputs: int, dynamic: bool, fullgraph: bool, inference: bool):
        self.name = name
        self.device_type = device_type
        self.mode = mode
        self.backend = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")
        self.static_inputs = static_inputs
        function_name = getattr(fn, "__name__", type(fn).__name__)
        self.code_name = f"{function_name}__{re.sub(r'[^0-9A-Za-z_]', '_', name)}_{next(_step_numbers)}"
        self._fresh = _fresh_function(fn, self.code_name)
        self.code = _code_of(self._fresh)
        self._compiled = torch.compile(self._fresh, backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph)
        if inference:
            # Traced with autograd on, a serving step compiles a training graph, and its first in-place write
            # makes the cache require grad, so the next call fails a guard and recompiles (seen on CPU).
            self._compiled = torch.no_grad()(self._compiled)
        # CUDA-graph trees own the memory of their outputs (see _clone_tensors); other modes do not.
        self._cuda_graphs = mode == "reduce-overhead"
        self._tally = _Tally()
        _install_limit_hook()
        _steps_by_code_name[self.code_name] = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        signature = (_signature_of(args), _signature_of(tuple(sorted(kwargs.items()))))
        tally = self._tally
        tally.calls += 1
        if signature in tally.signatures:
            out, ran_compiled = self._known_call(signature, args, kwargs)
        else:
            out, ran_compiled = self._first_call(signature, args, kwargs)
        if not ran_compiled:
            tally.eager_calls += 1
        return _clone_tensors(out) if self._cuda_graphs else out

    def _known_call(self, signature: Hashable, args: tuple, kwargs: dict) -> tuple[Any, bool]:
        """Call with a signature seen before: it runs as it did then, unless it had to recompile."""
        tally = self._tally
        message_before = tally.limit_message
        skips_before = _cudagraph_skips() if self._cuda_graphs else 0
        out = self._compiled(*args, **kwargs)
        if self._cuda_graphs:  # a new size of a dynamic dimension records a new CUDA graph, maybe refused
            tally.cudagraph_skips += _cudagraph_skips() - skips_before
        # A known signature can still recompile (a guard on something else failed) and meet the limit.
        if tally.limit_message is not message_before:
            tally.signatures[signature] = False
        return out, tally.signatures[signature]

    def _first_call(self, signature: Hashable, args: tuple, kwargs: dict) -> tuple[Any, bool]:
        """Call with a signature not seen before, and tell whether dynamo compiled a graph or ran eagerly."""
        tally = self._tally
        graphs_before, attempts_before, skips_before = _cache_entry_count(self.code), _compile_attempts(), \
            _cudagraph_skips()
        out = self._compiled(*args, **kwargs)
        graphs_after = _cache_entry_count(self.code)
        tally.cudagraph_skips += _cudagraph_skips() - skips_before
        grew = None if graphs_before is None or graphs_after is None else graphs_after > graphs_before
        ran_compiled = _ran_compiled(grew, _compile_attempts() > attempts_before, tally.limit_message is not None)
        tally.signatures[signature] = ran_compiled
        if not ran_compiled:
            self._limit_hit(tally.limit_message or f"no graph for a new input signature ({len(tally.signatures)} "
                                                   f"seen, recompile limit {dynamo_recompile_limit()})")
        return out, ran_compiled

    def _limit_hit(self, message: str) -> None:
        tally = self._tally
        if tally.limit_message is None:
            tally.limit_message = message
        if not tally.warned:
            tally.warned = True
            print(f"wattledger: {self.name}: torch.compile hit its recompile limit "
                  f"({dynamo_recompile_limit()} graphs); new shapes run eagerly from here on "
                  "(use fewer shape buckets or a higher recompile_limit)", file=sys.stderr)

    def report(self) -> dict[str, Any]:
        """What the step did so far.

        ``compiled``: at least one graph and no call ran eagerly; ``graphs``: graphs dynamo holds for this
        step (None where torch cannot say); ``recompiles``: graphs after the first; ``limit``: dynamo's
        graphs-per-code-object limit now; ``fell_back_to_eager``: the limit was hit and some shape ran
        eagerly; ``cudagraph_skips``: graphs inductor refused to CUDA-graph during this step's calls.
        """
        tally = self._tally
        graphs = _cache_entry_count(self.code)
        compiled_signatures = sum(tally.signatures.values())
        fell_back = tally.limit_message is not None or tally.eager_calls > 0
        known_graphs = graphs if graphs is not None else compiled_signatures
        return {
            "name": self.name, "device_type": self.device_type, "mode": self.mode, "backend": self.backend,
            "compiled": known_graphs > 0 and not fell_back, "graphs": graphs,
            "recompiles": max(known_graphs - 1, 0), "limit": dynamo_recompile_limit(),
            "fell_back_to_eager": fell_back, "limit_message": tally.limit_message,
            "signatures": len(tally.signatures), "eager_signatures": len(tally.signatures) - compiled_signatures,
            "calls": tally.calls, "eager_calls": tally.eager_calls, "static_inputs": self.static_inputs,
            "cudagraph_skips": tally.cudagraph_skips,
        }

    def summary(self) -> str:
        """One line for a run's output: compiled, partly eager, or not called yet."""
        r = self.report()
        graphs = "?" if r["graphs"] is None else r["graphs"]
        if r["calls"] == 0:
            return f"{self.name}: compiled lazily, not called yet"
        if r["fell_back_to_eager"]:
            return (f"{self.name}: partly eager: {graphs} graphs, then the recompile limit ({r['limit']}) was hit; "
                    f"{r['eager_calls']} of {r['calls']} calls ran eagerly")
        return f"{self.name}: compiled ({r['mode'] or r['backend']}): {graphs} graphs, limit {r['limit']}"


def inductor_mode(device_type: str) -> str:
    """``reduce-overhead`` (CUDA graphs) on CUDA; ``default`` elsewhere, where there are no CUDA graphs."""
    return "reduce-overhead" if device_type == "cuda" else "default"


def compile_step(fn: Callable, *, device_type: str, static_tensors: Sequence[torch.Tensor], name: str,
                 recompile_limit: int | None = None, inference: bool = False, backend: str | Callable = "inductor",
                 dynamic: bool = False, fullgraph: bool = False) -> CompiledStep:
    """Compile ``fn`` (a function or bound method) as a hot step with its own recompile budget.

    ``static_tensors``: tensors the step reads or writes in place through attributes or closures (a KV
    cache), marked static so CUDA graphs can engage. ``recompile_limit``: graphs this step may hold (raises
    dynamo's global limit to it if lower, see ``raise_recompile_limit``); None keeps dynamo's limit.
    ``inference``: every call runs under ``torch.no_grad()`` (a decode step; not a training step).
    ``backend`` other than "inductor" (tests: "aot_eager" or a callable) gets no mode. Compilation itself
    happens lazily, at the first call of each shape.
    """
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    if recompile_limit is not None:
        if recompile_limit < 1:
            raise ValueError(f"recompile_limit must be at least 1, got {recompile_limit}")
        raise_recompile_limit(recompile_limit)
    static_inputs = _mark_static(list(static_tensors))
    mode = inductor_mode(device_type) if backend == "inductor" else None
    return CompiledStep(fn, name=name, device_type=device_type, mode=mode, backend=backend,
                        static_inputs=static_inputs, dynamic=dynamic, fullgraph=fullgraph, inference=inference)


def cuda_graph_status(step: CompiledStep) -> dict[str, Any]:
    """Whether CUDA graphs engaged for ``step`` after it has been called (call each shape twice first).

    ``verdict``: "not applicable" (not CUDA, or a mode without CUDA graphs), "not called yet", "engaged"
    (graphs compiled and inductor refused none), or "skipped" (inductor refused at least one: with
    ``TORCH_LOGS=cudagraphs`` it logs why, e.g. "mutated inputs").
    """
    r = step.report()
    if step.device_type != "cuda" or step.mode != "reduce-overhead":
        return {"verdict": "not applicable", "reason": f"device {step.device_type}, mode {step.mode}",
                "cudagraph_skips": None}
    if r["calls"] == 0:
        return {"verdict": "not called yet", "reason": None, "cudagraph_skips": 0}
    if r["cudagraph_skips"] > 0 or not r["compiled"]:
        reason = "inductor refused a graph" if r["cudagraph_skips"] else "the step did not run compiled"
        return {"verdict": "skipped", "reason": reason, "cudagraph_skips": r["cudagraph_skips"]}
    return {"verdict": "engaged", "reason": None, "cudagraph_skips": 0}


def count_cuda_graph_launches(run: Callable[[], Any], calls: int = 3) -> int | None:
    """How many CUDA graphs ``run()`` launched over ``calls`` calls, read from the profiler (the
    ``cudaGraphLaunch`` runtime calls CUPTI records); None without CUDA or where the profiler fails.

    The direct evidence for the GPU check: a step that replays a graph launches one per call.
    """
    if not torch.cuda.is_available():
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                run()
            torch.cuda.synchronize()
        # startswith: CUPTI's own names carry a version suffix (cudaGraphLaunch_v10000) that kineto drops.
        return sum(event.count for event in prof.key_averages() if event.key.startswith("cudaGraphLaunch"))
    except Exception:  # the profiler is optional evidence; the counters above still answer
        return None


def cuda_graph_self_check(rows: int = 4, width: int = 256) -> dict[str, dict[str, Any]]:
    """On CUDA: compile a tiny step that writes a cache in place, once with the cache marked static and
    once without (the control), and say for each whether CUDA graphs engaged.

    Expected: "static" engaged with one graph launch per call, "control" skipped (inductor's "mutated
    inputs"): the A/B that shows marking is what makes graphs engage. Costs two small inductor compiles
    (seconds). Without CUDA: {"static": {"verdict": "not applicable"}, ...}, nothing compiled.
    """
    if not torch.cuda.is_available():
        return {case: {"verdict": "not applicable", "reason": "no CUDA device"} for case in ("static", "control")}
    return {case: _self_check_case(case == "static", "cuda", "inductor", rows, width) for case in ("static", "control")}


def _self_check_case(mark_static: bool, device: str, backend: str | Callable, rows: int, width: int) -> dict:
    """One case of cuda_graph_self_check (``device``/``backend`` let the suite run it on the CPU)."""
    holder = types.SimpleNamespace(keys=torch.zeros(4 * rows, width, device=device))

    def write_then_read(values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        holder.keys[slots] = values
        return holder.keys.sum(0)

    case = "static" if mark_static else "control"
    step = compile_step(write_then_read, device_type="cuda", name=f"cuda graph self-check ({case})",
                        static_tensors=[holder.keys] if mark_static else [], inference=True, backend=backend)
    values = torch.ones(rows, width, device=device)
    slots = torch.arange(rows, device=device)
    for _ in range(3):  # cudagraph trees: warm-up, record, replay
        step(values, slots)
    launches = count_cuda_graph_launches(lambda: step(values, slots), calls=3)
    return {**cuda_graph_status(step), "graph_launches_in_3_calls": launches, "graphs": step.report()["graphs"]}
