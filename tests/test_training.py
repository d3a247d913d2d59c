"""The training workload on CPU (tiny preset): learning, checkpoints and resume, DDP and accumulation
equivalence, what it reports, MFU arithmetic (steady steps only, the peak by device name), async
checkpoints, config errors, and the up-front refusal of a run that cannot fit on its device."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from wattledger.workloads import training
from wattledger.workloads.common import RunOptions
from wattledger.workloads.memory_plan import GIB, WontFitError
from wattledger.workloads.model import PRESETS, build_model
from wattledger.workloads.reporter import TRAIN_ACTIVITY, Reporter
from wattledger.workloads.training import (
    WARMUP_STEPS,
    SyntheticTokens,
    TrainingConfig,
    add_arguments,
    check_memory_fits,
    config_from_args,
    default_peak_flops,
    load_checkpoint,
    main,
    make_optimizer,
    run,
    save_checkpoint,
    steady_state_throughput,
)

TINY = PRESETS["tiny"]
CPU = torch.device("cpu")


def _options() -> RunOptions:
    return RunOptions(preset="tiny", device="cpu", seed=0, duration_s=120.0)


def _train(reporter: Reporter | None = None, **fields) -> dict:
    fields.setdefault("log_every", 0)
    return run(TrainingConfig(**fields), _options(), reporter or Reporter("training", [0]))


def _checkpoint_tensors(path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"]


def _loopback_env(port: int) -> dict[str, str]:
    loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), "lo")
    # Gloo picks its interface from the host name unless told: keep every connection on loopback.
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": loopback}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- data ---------------------------------------------------------------------------------------------


def test_synthetic_shards_concatenate_to_the_global_batch():
    data = SyntheticTokens(TINY.vocab_size, 32, seed=3)
    whole = data.batch(step=5, rank=0, world=1, batch_size=8)
    ranks = torch.cat([data.batch(5, rank=r, world=2, batch_size=4) for r in range(2)])
    micro = torch.cat([data.batch(5, rank=0, world=1, batch_size=4, micro_step=m) for m in range(2)])
    assert whole.shape == (8, 33) and whole.dtype == torch.long
    assert torch.equal(ranks, whole) and torch.equal(micro, whole)
    assert torch.equal(data.batch(5, 0, 1, 8), whole)  # a pure function of (seed, step, index)
    assert not torch.equal(data.batch(6, 0, 1, 8), whole)


def test_synthetic_stream_follows_its_table_nine_times_in_ten():
    data = SyntheticTokens(TINY.vocab_size, 64, seed=0)
    tokens = data.batch(0, 0, 1, 256)
    follows = (data.table[tokens[:, :-1]] == tokens[:, 1:]).float().mean().item()
    assert follows == pytest.approx(0.9 + 0.1 / TINY.vocab_size, abs=0.01)
    assert 0 < data.loss_floor_nats() < 1.5


# -- learning -----------------------------------------------------------------------------------------


def test_loss_falls_on_the_synthetic_task():
    summary = _train(max_steps=30, log_every=1)
    losses = [loss for _, loss in summary["loss_log"]]
    assert len(losses) == 30 and summary["steps"] == 30
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 5.5  # about ln(512) = 6.24 at random init
    assert last < first - 2.5, losses
    assert summary["loss_first"] == losses[0] and summary["loss_last"] == losses[-1]


# -- checkpoints and resume ---------------------------------------------------------------------------


def test_save_then_load_restores_every_tensor(tmp_path):
    config = TrainingConfig()
    model = build_model(TINY, CPU, torch.float32, seed=0)
    optimizer = make_optimizer(model, config, CPU)
    data = SyntheticTokens(TINY.vocab_size, 32, seed=0)
    for step in range(2):
        tokens = data.batch(step, 0, 1, 4)
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    path = save_checkpoint(str(tmp_path / "c.pt"), model, optimizer, step=2)
    assert os.listdir(tmp_path) == ["c.pt"]  # the temporary file was renamed, not left behind

    fresh = build_model(TINY, CPU, torch.float32, seed=1)
    fresh_optimizer = make_optimizer(fresh, config, CPU)
    assert load_checkpoint(path, fresh, fresh_optimizer) == 2
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    assert saved["state"].keys() == loaded["state"].keys()
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)


def test_resumed_run_matches_uninterrupted_run_bitwise(tmp_path):
    whole = _train(max_steps=6, checkpoint_every=6, checkpoint_dir=str(tmp_path / "whole"), batch_size=4,
                   seq_len=32)
    first = _train(max_steps=3, checkpoint_every=3, checkpoint_dir=str(tmp_path / "first"), batch_size=4,
                   seq_len=32)
    resumed = _train(max_steps=6, checkpoint_every=6, checkpoint_dir=str(tmp_path / "resumed"), batch_size=4,
                     seq_len=32, resume_from=first["checkpoint_last_path"])
    assert (resumed["step_start"], resumed["steps"]) == (3, 3)
    expected = torch.load(whole["checkpoint_last_path"], weights_only=True)
    got = torch.load(resumed["checkpoint_last_path"], weights_only=True)
    assert got["step"] == expected["step"] == 6
    for name, tensor in expected["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for index, state in expected["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(got["optimizer"]["state"][index][key], value), (index, key)


def test_async_checkpoint_works_or_falls_back_with_a_reason(tmp_path):
    folder = tmp_path / "async"
    summary = _train(max_steps=4, checkpoint_every=2, checkpoint_mode="async", checkpoint_dir=str(folder),
                     batch_size=4, seq_len=32)
    assert summary["checkpoint_count"] == 2 and summary["checkpoint_stall_seconds"] > 0
    assert summary["checkpoint_mode_used"] in ("async", "sync")
    if summary["checkpoint_mode_used"] == "sync":
        reason = summary["checkpoint_fallback_reason"]
        assert reason and "\n" not in reason
        return
    assert summary["checkpoint_fallback_reason"] is None
    assert os.listdir(folder) == ["step_00000004"]  # only the newest complete checkpoint is kept
    # The async snapshot holds the state at step 4 exactly, though training ran on while it was written.
    reference = _train(max_steps=4, checkpoint_every=4, checkpoint_dir=str(tmp_path / "sync"), batch_size=4,
                       seq_len=32)
    model = build_model(TINY, CPU, torch.float32, seed=5)
    optimizer = make_optimizer(model, TrainingConfig(), CPU)
    assert load_checkpoint(summary["checkpoint_last_path"], model, optimizer) == 4
    for name, tensor in _checkpoint_tensors(reference["checkpoint_last_path"]).items():
        assert torch.equal(model.state_dict()[name], tensor), name


# -- equivalences -------------------------------------------------------------------------------------


def test_grad_accumulation_matches_a_larger_batch(tmp_path):
    accumulated = _train(max_steps=3, checkpoint_every=3, checkpoint_dir=str(tmp_path / "a"), batch_size=4,
                         seq_len=32, grad_accum_steps=2)
    large = _train(max_steps=3, checkpoint_every=3, checkpoint_dir=str(tmp_path / "b"), batch_size=8, seq_len=32)
    assert accumulated["tokens_per_step"] == large["tokens_per_step"] == 256
    got, expected = (_checkpoint_tensors(s["checkpoint_last_path"]) for s in (accumulated, large))
    initial = build_model(TINY, CPU, torch.float32, seed=0).state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=2e-5, rtol=1e-4)
        if name.endswith("q.weight"):
            assert not torch.equal(tensor, initial[name])  # it did train


def _ddp_worker(rank: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(_loopback_env(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
    reporter = Reporter("training", [rank], keep_spans=True)
    summary = run(TrainingConfig(max_steps=3, checkpoint_every=3, checkpoint_dir=folder, batch_size=4, seq_len=32,
                                 log_every=0), _options(), reporter)
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as handle:
        json.dump({"summary": summary, "tokens": reporter.tokens["trained"],
                   "compute_spans": sum(1 for s in reporter.spans if s.kind == "compute")}, handle)


@pytest.mark.slow  # two spawned ranks that import torch and rendezvous over gloo
def test_two_gloo_ranks_match_one_process_with_twice_the_batch(tmp_path):
    folder = tmp_path / "ddp"
    folder.mkdir()
    torch.multiprocessing.spawn(_ddp_worker, args=(_free_port(), str(folder)), nprocs=2, join=True)
    single = _train(max_steps=3, checkpoint_every=3, checkpoint_dir=str(tmp_path / "one"), batch_size=8,
                    seq_len=32)
    reports = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    ddp = reports[0]["summary"]
    assert ddp["world_size"] == 2 and ddp["steps"] == 3 and ddp["tokens"]["trained"] == 3 * 8 * 32
    for report in reports:  # each rank reports its own share
        assert report["tokens"] == 3 * 4 * 32 and report["compute_spans"] == 3
    got = _checkpoint_tensors(folder / "step_00000003.pt")
    for name, tensor in _checkpoint_tensors(single["checkpoint_last_path"]).items():
        torch.testing.assert_close(got[name], tensor, atol=2e-5, rtol=1e-4)
    assert ddp["loss_first"] == pytest.approx(single["loss_first"], rel=1e-5)


# -- what it reports ----------------------------------------------------------------------------------


def test_reporter_gets_trained_tokens_and_spans():
    reporter = Reporter("training", [0], keep_spans=True)
    summary = _train(reporter, max_steps=4, batch_size=4, seq_len=32, grad_accum_steps=2, checkpoint_every=2)
    assert reporter.tokens["trained"] == 4 * 4 * 32 * 2 == summary["tokens"]["trained"]
    compute = [s for s in reporter.spans if s.kind == "compute"]
    checkpoint = [s for s in reporter.spans if s.kind == "checkpoint"]
    assert len(compute) == 4 and all(s.activity == TRAIN_ACTIVITY for s in compute)
    assert len(checkpoint) == summary["checkpoint_count"] == 2
    assert summary["checkpoint_last_path"] is None  # a temporary folder: removed at the end
    ordered = sorted(reporter.spans, key=lambda s: s.start_ns)
    assert all(a.end_ns <= b.start_ns for a, b in itertools.pairwise(ordered))  # one loop: no overlap
    assert summary["step_time_seconds"]["mean"] == pytest.approx(sum(s.seconds for s in compute) / 4)
    assert 0 < summary["goodput"] <= 1
    assert summary["checkpoint_stall_seconds"] == pytest.approx(sum(s.seconds for s in checkpoint))


def test_mfu_is_6n_plus_attention_flops_times_steady_tokens_per_second_over_peak():
    reporter = Reporter("training", [0], keep_spans=True)
    summary = _train(reporter, max_steps=3, batch_size=4, seq_len=32, peak_flops=1e12)
    n = TINY.matmul_params()
    per_token = 6 * n + 12 * TINY.layers * TINY.heads * TINY.head_dim * 32
    assert summary["flops_per_token"] == per_token == TINY.training_flops_per_token(32)
    step_seconds = [s.seconds for s in reporter.spans if s.kind == "compute"]
    steady = step_seconds[WARMUP_STEPS:]  # eager: only the first step is warm-up
    assert (summary["steady_steps"], summary["warmup_steps_excluded"]) == (len(steady), WARMUP_STEPS) == (2, 1)
    assert summary["tokens_per_second"] == pytest.approx(len(steady) * 4 * 32 / sum(steady), rel=1e-9)
    assert summary["tokens_per_second_all_steps"] == pytest.approx(3 * 4 * 32 / sum(step_seconds), rel=1e-9)
    assert summary["mfu"] == pytest.approx(per_token * summary["tokens_per_second"] / 1e12, rel=1e-12)
    assert summary["mfu_all_steps"] == pytest.approx(per_token * summary["tokens_per_second_all_steps"] / 1e12,
                                                     rel=1e-12)
    assert summary["mfu_peak_flops"] == 1e12 and "6N + 12*L*H*Q*T" in summary["mfu_formula"]
    assert "steady steps" in summary["mfu_formula"] and summary["mfu_note"] is None


def test_a_slow_first_step_and_compile_steps_stay_out_of_the_mfu():
    # An injected series: a 5 s first step (CUDA set-up), a 3 s recompile at the fourth, 0.1 s otherwise.
    seconds = [5.0, 0.1, 0.1, 3.0, 0.1]
    compiled = [True, False, False, True, False]
    figures = steady_state_throughput(seconds, compiled, tokens_per_step=1000, flops_per_token=6e9,
                                      peak_flops=1e15, world=1)
    assert (figures["steady_steps"], figures["warmup_steps_excluded"]) == (3, 2)
    assert figures["tokens_per_second"] == pytest.approx(1000 / 0.1)
    assert figures["mfu"] == pytest.approx(6e9 * 1000 / 0.1 / 1e15)
    assert figures["tokens_per_second_all_steps"] == pytest.approx(5000 / sum(seconds))
    assert figures["mfu_all_steps"] < figures["mfu"] / 10  # what the first and compile steps did to it
    # Eager (no compile steps): only the first step is left out, however slow the others are.
    eager = steady_state_throughput([5.0, 0.2, 0.1], [False] * 3, 1000, 6e9, 1e15, world=2)
    assert eager["tokens_per_second"] == pytest.approx(2000 / 0.3)
    assert eager["mfu"] == pytest.approx(6e9 * eager["tokens_per_second"] / 2e15)


def test_mfu_of_a_run_of_warm_up_steps_only_is_null_with_a_reason():
    figures = steady_state_throughput([5.0], [False], 1000, 6e9, 1e15, world=1)
    assert figures["mfu"] is None and figures["tokens_per_second"] is None
    assert figures["mfu_all_steps"] == pytest.approx(6e9 * 200 / 1e15)
    assert "warm-up" in figures["mfu_note"] and "\n" not in figures["mfu_note"]


def test_steps_in_which_dynamo_compiles_are_marked_as_compile_steps(monkeypatch):
    # Graphs "compiled" during the first and third steps (the counter torch keeps, here driven by the test).
    counts = iter([0, 1, 1, 1, 1, 2, 2, 2])
    monkeypatch.setattr(training, "_dynamo_graph_count", lambda: next(counts))
    monkeypatch.setattr(torch, "compile", lambda model, **_: model)  # the wiring, not the compiler, is tested
    options = RunOptions(preset="tiny", device="cpu", seed=0, duration_s=120.0, compile=True)
    summary = run(TrainingConfig(max_steps=4, batch_size=2, seq_len=16, log_every=0), options,
                  Reporter("training", [0]))
    assert (summary["steady_steps"], summary["warmup_steps_excluded"]) == (2, 2)


def test_dynamo_graph_counter_counts_a_real_compile():
    compiled = torch.compile(lambda x: x * 2 + 1, backend="eager")  # dynamo traces; no inductor codegen
    before = training._dynamo_graph_count()
    compiled(torch.ones(3))
    after_first = training._dynamo_graph_count()
    compiled(torch.ones(3))
    assert before is not None and after_first == before + 1
    assert training._dynamo_graph_count() == after_first  # the second call reuses the graph


def test_mfu_is_null_with_a_reason_without_a_known_peak():
    summary = _train(max_steps=1, batch_size=2, seq_len=16)
    assert summary["mfu"] is None and summary["mfu_peak_flops"] is None
    assert "--peak-tflops" in summary["mfu_note"]


@pytest.mark.parametrize("name, peak", [
    # Dense bf16: half the datasheets' "with sparsity" figures (H100: 1,979 SXM, 1,513 PCIe, 1,671 NVL;
    # H200: 1,979 SXM, 1,671 NVL). An H200 NVL must not get the SXM part's peak.
    ("NVIDIA H200 NVL", 835e12), ("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", None),
])
def test_default_peak_comes_from_the_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    flops, note = default_peak_flops(torch.device("cuda"))
    assert flops == peak
    assert (note is None) == (peak is not None)


# -- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"batch_size": 0}, {"seq_len": -1}, {"grad_accum_steps": 0}, {"lr": 0.0}, {"lr": float("nan")},
    {"weight_decay": -0.1}, {"checkpoint_every": -1}, {"checkpoint_mode": "sometimes"}, {"peak_flops": 0.0},
    {"max_steps": 0}, {"log_every": 1.5}, {"resume_from": "/nonexistent/step_1.pt"},
])
def test_bad_config_values_raise_one_line(fields):
    with pytest.raises(ValueError) as err:
        TrainingConfig(**fields).validate()
    assert "\n" not in str(err.value) and str(err.value)


def test_sequence_longer_than_the_model_raises_before_training():
    with pytest.raises(ValueError, match="exceeds"):
        _train(max_steps=1, seq_len=TINY.max_seq_len + 1)


def test_arguments_build_the_config():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(
        ["--batch-size", "2", "--seq-len", "16", "--grad-accum", "3", "--checkpoint-every", "5",
         "--checkpoint-mode", "async", "--peak-tflops", "989", "--max-steps", "7"]))
    assert (config.batch_size, config.seq_len, config.grad_accum_steps) == (2, 16, 3)
    assert (config.checkpoint_every, config.checkpoint_mode, config.max_steps) == (5, "async", 7)
    assert config.peak_flops == pytest.approx(989e12)
    with pytest.raises(ValueError, match="checkpoint_mode"):
        config_from_args(parser.parse_args(["--checkpoint-mode", "later"]))


def test_main_prints_the_summary_json(capsys):
    assert main(["--device", "cpu", "--max-steps", "2", "--batch-size", "2", "--seq-len", "16",
                 "--log-every", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and summary["world_size"] == 1
    assert main(["--device", "cpu", "--grad-accum", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def _rank_logs(log_dir) -> str:
    """Each rank's stderr as torchrun's --redirects wrote it, for a failure's message."""
    parts = []
    for path in sorted(log_dir.rglob("stderr.log")):
        parts.append(f"--- {path.relative_to(log_dir)} ---\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(parts) or "(no rank logs)"


@pytest.mark.integration
def test_torchrun_two_ranks_from_the_command_line(tmp_path):
    # Robust on a busy host: one OpenMP thread per rank (conftest sets OMP_NUM_THREADS for every
    # subprocess; two ranks each spinning a thread per core starve each other), every connection on
    # loopback, a bound of minutes rather than seconds, and the ranks' own stderr kept (--redirects), so a
    # failing rank (rank 1 was once seen killed by SIGABRT under load) says why in the assertion message.
    env = dict(os.environ, **_loopback_env(_free_port()), OMP_NUM_THREADS="1")
    port = env.pop("MASTER_PORT")
    env.pop("MASTER_ADDR")
    log_dir = tmp_path / "logs"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", port, "--log-dir", str(log_dir), "--redirects", "2",
         "-m", "wattledger.workloads.training", "--preset", "tiny", "--device", "cpu",
         "--max-steps", "2", "--batch-size", "2", "--seq-len", "16", "--log-every", "0"],
        check=False, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:] + "\n" + _rank_logs(log_dir)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["tokens"]["trained"] == 2 * 2 * 2 * 16


# -- on a simulated device's time (issue 14) ------------------------------------------------------------


@pytest.fixture
def device_time():
    from wattledger.workloads import device_time as module

    return module


class _FakeWall:
    """An injected wall clock that moves only when slept on (so the CPU's own time never shows)."""

    def __init__(self):
        self.now_ns = 10**12
        self.slept_s = 0.0

    def __call__(self) -> int:
        return self.now_ns

    def sleep(self, seconds: float) -> None:
        self.slept_s += seconds
        self.now_ns += round(seconds * 1e9)


def _simulated_run(steps: int, **fields):
    from wattledger.workloads.common import SimulatedTiming
    from wattledger.workloads.paced_clock import PacedClock

    wall = _FakeWall()
    reporter = Reporter("training", [0], keep_spans=True)
    options = RunOptions(preset="tiny", device="cpu", seed=0, duration_s=120.0,
                         simulation=SimulatedTiming(device="h100-sxm-80gb", timing_preset="8b"))
    summary = run(TrainingConfig(max_steps=steps, log_every=0, **fields), options, reporter,
                  paced_clock=PacedClock(wall_ns=wall, sleep_s=wall.sleep))
    return summary, reporter, wall


def test_simulated_steps_take_the_device_time_and_count_the_simulated_tokens(device_time):
    from wattledger.workloads.common import SimulatedTiming

    sim = training.simulated_training(SimulatedTiming(device="h100-sxm-80gb", timing_preset="8b"))
    summary, reporter, wall = _simulated_run(3)
    compute = [s for s in reporter.spans if s.kind == "compute"]
    assert len(compute) == 3
    for span in compute:
        assert span.end_ns - span.start_ns == round(sim.step.seconds * 1e9)
        assert span.activity == sim.step.activity
    assert [b.start_ns for b in compute[1:]] == [a.end_ns for a in compute[:-1]]  # back to back
    # 8b does not fit one H100 for AdamW training: 1b at its default 4 x 2048 (x 8 micro-steps) is simulated,
    # and said so; the tokens counted are the simulated step's.
    assert (sim.timing_config.name, sim.batch_size, sim.seq_len, sim.grad_accum_steps) == ("1b", 4, 2048, 8)
    assert reporter.tokens["trained"] == 3 * 4 * 2048 * 8 == summary["tokens"]["trained"]
    # Headroom for a loaded CPU (SIMULATED_GRAD_ACCUM_STEPS' comment): a step well above 0.84 s of tiny CPU work.
    assert 0.8 < sim.step.seconds < 0.95
    simulated = summary["simulated_device"]
    assert simulated["timing_preset"] == "1b" and simulated["timing_preset_requested"] == "8b"
    assert "does not fit" in simulated["timing_note"] and simulated["computed_preset"] == "tiny"
    assert simulated["shapes"] == ("computed: tiny 8 x 64 per step, timing and tokens: 1b 4 x 2048 x 8 accum on "
                                   "H100 SXM")
    assert simulated["device_busy_seconds"] == pytest.approx(3 * sim.step.seconds)
    assert simulated["max_lag_seconds"] == 0 and wall.slept_s == pytest.approx(3 * sim.step.seconds, rel=1e-6)
    assert summary["step_time_seconds"]["mean"] == pytest.approx(sim.step.seconds, rel=1e-6)
    assert simulated["mfu_simulated"] == pytest.approx(summary["mfu"], rel=1e-6)


def test_a_simulated_checkpoint_stalls_for_the_simulated_state_over_the_stated_bandwidth(device_time):
    summary, reporter, _ = _simulated_run(2, checkpoint_every=2)
    (stall,) = [s for s in reporter.spans if s.kind == "checkpoint"]
    params = PRESETS["1b"].total_params()
    expected_s = params * training.CHECKPOINT_BYTES_PER_PARAM / training.SIMULATED_CHECKPOINT_BYTES_PER_S["sync"]
    assert (stall.end_ns - stall.start_ns) / 1e9 == pytest.approx(expected_s, abs=1e-9)
    assert summary["checkpoint_stall_seconds"] == pytest.approx(expected_s, abs=1e-9)


def test_a_simulated_run_ends_on_the_simulated_schedule(device_time):
    from wattledger.workloads.common import SimulatedTiming
    from wattledger.workloads.paced_clock import PacedClock

    sim = training.simulated_training(SimulatedTiming())
    wall = _FakeWall()
    options = RunOptions(preset="tiny", device="cpu", seed=0, duration_s=3.5 * sim.step.seconds,
                         simulation=SimulatedTiming())
    summary = run(TrainingConfig(log_every=0), options, Reporter("training", [0]),
                  paced_clock=PacedClock(wall_ns=wall, sleep_s=wall.sleep))
    assert summary["steps"] == 4  # the step whose device time reaches the deadline is the last


def test_a_timing_preset_that_fits_is_simulated_as_asked_and_an_unknown_device_is_refused(device_time):
    from wattledger.workloads.common import SimulatedTiming

    fitting = training.simulated_training(SimulatedTiming(device="h100-sxm-80gb", timing_preset="125m"))
    assert fitting.timing_config.name == "125m" and fitting.fit_note is None
    assert (fitting.batch_size, fitting.seq_len) == training.DEFAULT_BATCH_SHAPE["125m"]
    with pytest.raises(ValueError):
        training.simulated_training(SimulatedTiming(device="a100-40gb", timing_preset="8b"))
