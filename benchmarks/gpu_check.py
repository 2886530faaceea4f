"""GPU check of the training stack (chapter 7): precision choice, gpu tests, throughput, MFU and peak memory.

Prints the device and the precision `choose_precision` picks for it, runs the ``gpu``-marked tests, then trains a
GPT-2 124M-shaped GPT on random tokens in bf16 autocast and in fp16 + GradScaler (and with activation checkpointing
and ``torch.compile``), reporting tokens/s, MFU and peak memory against `estimate_memory`; then FSDP via ``torchrun``
over the GPUs present when there are at least 2. One table at the end; ``--out`` also writes JSON.

    .venv/bin/python benchmarks/gpu_check.py [--quick] [--out gpu_check.json]   # about 4 min on an H100 (--quick: 2)
    .venv/bin/python benchmarks/gpu_check.py --cpu-dry-run                        # tiny sizes on the CPU, < 1 min

Every step is `Trainer.train_step` (the package's loop: autocast, GradScaler, clipping, AdamW) on a batch already on
the device, timed by `measure_throughput` (median of ``--steps`` synchronised steps after ``--warmup``). MFU (PaLM,
Appendix B) divides tokens/s x `flops_per_token(config, n_ctx=T, head=True, full_attention=True)` by the datasheet
peak of this GPU for the step's dtype (`gpu_peak_flops`), or, for a GPU the table lacks and on the CPU, by the FLOP/s
of a large matmul measured here; as in PaLM, recomputation is not counted, so checkpointing lowers MFU. Peak memory
is ``torch.cuda.max_memory_allocated`` over the timed steps minus what was allocated before the model existed;
`estimate_memory` leaves out the loss's float32 (B (T-1), V) gradient buffers in flight early in the backward, about
3 GiB at B 8 x 1024 with GPT-2's 50,257 tokens, so expect the ratio above 1 there (tests/training/test_gpu.py checks
the estimate on a shape where they are small).
A section that fails is reported as such and the others still run; with ``--out`` the JSON is rewritten after every
section, so a run cut short keeps what it measured. ``--budget-s`` skips what would not fit in the time left.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# run as a script, benchmarks/ comes first on sys.path, and benchmarks/tokenizers.py would shadow the tokenizers package
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

import torch  # noqa: E402

from companion.models import GPT, GPTConfig  # noqa: E402
from companion.objectives import causal_lm_loss  # noqa: E402
from companion.runtime import Precision, choose_precision, cuda_has_native_bf16, seed_everything  # noqa: E402
from companion.scaling import flops_per_token  # noqa: E402
from companion.training import TrainConfig, Trainer  # noqa: E402
from companion.training.memory import estimate_memory, gib  # noqa: E402
from companion.training.throughput import (  # noqa: E402
    gpu_model,
    gpu_peak_flops,
    measure_matmul_peak,
    measure_throughput,
    mfu,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DRY_CONFIG = GPTConfig.tiny()  # 2 layers, width 64, context 64, vocabulary 256
PYTEST_ARGS = ["-m", "gpu", "tests/training/test_gpu.py", "tests/test_runtime.py", "-q"]


def log(message: str) -> None:
    """Progress on stderr (the table at the end goes to stdout)."""
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ settings
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps and no torch.compile (about 2 min)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run every section on the CPU with a tiny GPT and a few steps (checks the script)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here (default: print only)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 8; dry run 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence T (default 1024; dry run 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 30, --quick 8, dry 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before timing (default 3; dry run 2)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="add a torch.compile run (default: on, off with --quick and --cpu-dry-run)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="add an activation-checkpointing run (default: on)")
    parser.add_argument("--tests", action=argparse.BooleanOptionalAction, default=True,
                        help="run `pytest -m gpu tests/training/test_gpu.py tests/test_runtime.py -q` (default: on)")
    parser.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=True,
                        help="FSDP via torchrun over the GPUs present if >= 2; 2 gloo ranks in a dry run (default: on)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip sections that would not fit in this many seconds (default 450, --quick 150, dry 55)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads in a dry run")
    parser.add_argument("--fsdp-worker", type=Path, default=None,
                        help="internal: run as one torchrun rank of the FSDP section, rank 0 writes JSON here")
    args = parser.parse_args(argv)
    dry, quick = args.cpu_dry_run, args.quick
    args.batch_size = args.batch_size or (2 if dry else 8)
    args.seq_len = args.seq_len or (DRY_CONFIG.n_ctx if dry else 1024)
    args.steps = args.steps or (2 if dry else 8 if quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if dry else 3)
    args.compile = args.compile if args.compile is not None else not (dry or quick)
    args.budget_s = args.budget_s or (55.0 if dry else 150.0 if quick else 450.0)
    for name in ("batch_size", "seq_len", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive int, got {getattr(args, name)}")
    return args


def model_config(args: argparse.Namespace) -> GPTConfig:
    config = DRY_CONFIG if args.cpu_dry_run else GPTConfig.gpt2_small()
    if not 2 <= args.seq_len <= config.n_ctx:
        raise SystemExit(f"--seq-len must be in [2, {config.n_ctx}] for this model, got {args.seq_len}")
    return config


def device_for(args: argparse.Namespace) -> torch.device:
    if args.cpu_dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-dry-run to check the script on the CPU")
    return torch.device("cuda")


def precision_for(name: str, device: torch.device) -> Precision:
    """The step's precision; on the CPU fp16 + GradScaler is built directly (choose_precision refuses it there)."""
    if device.type == "cpu" and name == "fp16":
        return Precision(device, torch.float16, grad_scaler=True)
    return choose_precision(device, name)


# ------------------------------------------------------------------ measurements
def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), capability=f"{props.major}.{props.minor}",
                    cuda=torch.version.cuda, gpus=torch.cuda.device_count(),
                    memory_gib=round(gib(props.total_memory), 1), native_bf16=cuda_has_native_bf16(device))
    else:
        import platform

        info.update(name=platform.processor() or platform.machine(), capability="n/a (CPU)", gpus=0,
                    threads=torch.get_num_threads())
    info["precision"] = choose_precision(device).describe()
    return info


def run_pytest(timeout: float) -> dict[str, Any]:
    """The gpu-marked tests in a subprocess; the summary line ("12 passed, 3 skipped in 41.2s") and the tail."""
    command = [sys.executable, "-m", "pytest", *PYTEST_ARGS]
    start = time.perf_counter()
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as proc:  # own session: a timeout kills torchrun's workers too
        try:
            output, _ = proc.communicate(timeout=timeout)
            returncode: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            returncode = None
    lines = [line for line in output.splitlines() if line.strip()]
    summary = next((line.strip("= ") for line in reversed(lines)
                    if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)), "no summary line")
    if returncode is None:
        summary = f"timed out after {timeout:.0f} s ({summary})"
    return {"command": " ".join(["pytest", *PYTEST_ARGS]), "returncode": returncode, "summary": summary,
            "seconds": round(time.perf_counter() - start, 1), "tail": lines[-40:]}


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return causal_lm_loss(model(batch["input_ids"]), batch["labels"])


def stack_rows(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = torch.stack(rows)  # (B, T)
    return {"input_ids": ids, "labels": ids}


def build_trainer(config: GPTConfig, args: argparse.Namespace, precision: Precision, *, checkpointing: bool = False,
                  compile: bool = False, parallel: str = "none") -> tuple[Trainer, dict[str, torch.Tensor]]:
    """A Trainer for ``config`` and one random batch of (batch_size, seq_len) tokens already on its device."""
    seed_everything(0)  # the same weights on every rank
    world = int(os.environ.get("WORLD_SIZE", "1")) if parallel != "none" else 1
    rows = [torch.randint(config.vocab_size, (args.seq_len,)) for _ in range(args.batch_size * world)]
    train = TrainConfig(max_steps=10_000, batch_size=args.batch_size, lr=3e-4, warmup_steps=0, progress=False,
                        device=str(precision.device), parallel=parallel, activation_checkpointing=checkpointing,
                        compile=compile)
    trainer = Trainer(GPT(config), train, rows, stack_rows, lm_loss, precision=precision)
    g = torch.Generator().manual_seed(1 + trainer.dist.rank)  # each rank its own tokens
    ids = torch.randint(config.vocab_size, (args.batch_size, args.seq_len), generator=g)  # (B, T)
    batch = {k: v.to(trainer.precision.device) for k, v in stack_rows(list(ids)).items()}
    return trainer, batch


def peak_flops(precision: Precision) -> tuple[float, str]:
    """MFU's denominator: the datasheet peak of this GPU for the dtype, else a measured large matmul."""
    if precision.device.type == "cuda":
        try:
            return gpu_peak_flops(precision.name), f"datasheet {gpu_model()}"
        except ValueError:
            pass
    n = 8192 if precision.device.type == "cuda" else 256
    return measure_matmul_peak(precision.dtype, n=n, repeats=5, device=precision.device), f"measured {n}^3 matmul"


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def time_steps(trainer: Trainer, batch: dict[str, torch.Tensor], args: argparse.Namespace,
               tokens_per_step: int) -> tuple[float, dict[str, float], float, int]:
    """(tokens/s, last step record, seconds of the warm-up steps, peak bytes allocated over the timed steps)."""
    device = trainer.precision.device
    last: dict[str, float] = {}

    def step() -> None:
        last.update(trainer.train_step([batch]))

    start = time.perf_counter()
    for _ in range(args.warmup):  # allocations, lazy AdamW state, autocast caches, compilation
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = time.perf_counter() - start
    rate = measure_throughput(step, tokens_per_step, warmup=0, repeats=args.steps, device=device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return rate, last, warmup_s, peak


def train_run(config: GPTConfig, args: argparse.Namespace, label: str, precision: Precision, *,
              checkpointing: bool = False, compile: bool = False) -> dict[str, Any]:
    device = precision.device
    release(device)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    trainer, batch = build_trainer(config, args, precision, checkpointing=checkpointing, compile=compile)
    tokens = args.batch_size * args.seq_len
    try:
        rate, last, warmup_s, peak = time_steps(trainer, batch, args, tokens)
        scale = trainer.scaler.get_scale() if trainer.scaler.is_enabled() else None
    finally:
        del trainer, batch
        if compile:
            torch._dynamo.reset()
        release(device)
    flops, source = peak_flops(precision)
    fpt = flops_per_token(config, n_ctx=args.seq_len, head=True, full_attention=True)
    estimate = estimate_memory(config, args.batch_size, args.seq_len, precision=precision.name,
                               checkpointing=checkpointing)
    row: dict[str, Any] = {
        "label": label, "precision": precision.describe(), "checkpointing": checkpointing, "compile": compile,
        "batch": [args.batch_size, args.seq_len], "tokens_per_s": round(rate, 1), "mfu": mfu(rate, fpt, flops),
        "peak_flops": flops, "peak_flops_source": source, "flops_per_token": fpt, "warmup_s": round(warmup_s, 2),
        "last_loss": last.get("loss"), "loss_finite": math.isfinite(last.get("loss", math.nan)),
        "grad_scale": scale, "estimate_bytes": estimate.total,
        "estimate": {"weights": estimate.weights, "grads": estimate.grads, "optimizer": estimate.optimizer,
                     "activations": estimate.activations},
    }
    if device.type == "cuda":
        row["peak_bytes"] = peak - baseline
        row["peak_over_estimate"] = (peak - baseline) / estimate.total
    return row


def runs_to_do(args: argparse.Namespace, device: torch.device) -> list[tuple[str, str, bool, bool, str | None]]:
    """(label, precision, checkpointing, compile, reason to skip or None)."""
    native = device.type == "cpu" or cuda_has_native_bf16(device)
    default16 = "bf16" if native else "fp16"
    no_bf16 = None if native else "no native bf16 on this GPU (compute capability < 8.0)"
    runs = [("bf16", "bf16", False, False, no_bf16), ("fp16 + GradScaler", "fp16", False, False, None)]
    if args.checkpointing:
        runs.append((f"{default16} + checkpointing", default16, True, False, None))
    if args.compile:
        runs.append((f"{default16} + torch.compile", default16, False, True, None))
    return runs


# ------------------------------------------------------------------ FSDP under torchrun
def fsdp_worker(args: argparse.Namespace) -> None:
    """One torchrun rank: FSDP2 over all ranks (NCCL on GPUs, gloo in a dry run), time the steps, gather peaks."""
    config = model_config(args)
    if args.cpu_dry_run:
        torch.set_num_threads(1)
        precision = Precision(torch.device("cpu"), torch.float32, grad_scaler=False)  # gloo reduces fp32 only
    else:
        precision = choose_precision("cuda")
    trainer, batch = build_trainer(config, args, precision, parallel="fsdp")
    ctx, device = trainer.dist, trainer.precision.device
    world = ctx.world_size
    rate, last, warmup_s, peak = time_steps(trainer, batch, args, args.batch_size * args.seq_len * world)
    peaks = ctx.gather(peak)
    if ctx.is_main:
        flops, source = peak_flops(trainer.precision)
        fpt = flops_per_token(config, n_ctx=args.seq_len, head=True, full_attention=True)
        estimate = estimate_memory(config, args.batch_size, args.seq_len, precision=trainer.precision.name,
                                   zero_stage=3, n_ranks=world)
        result = {"label": f"fsdp x {world}", "precision": trainer.precision.describe(), "ranks": world,
                  "backend": torch.distributed.get_backend(), "batch_per_rank": [args.batch_size, args.seq_len],
                  "tokens_per_s": round(rate, 1), "mfu": mfu(rate / world, fpt, flops), "peak_flops": flops,
                  "peak_flops_source": source, "last_loss": last.get("loss"), "warmup_s": round(warmup_s, 2),
                  "estimate_bytes_per_rank": estimate.total, "device": str(device)}
        if device.type == "cuda":
            result["peak_bytes_per_rank"] = peaks
            result["peak_over_estimate"] = max(peaks) / estimate.total
        args.fsdp_worker.write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_fsdp(args: argparse.Namespace, world: int, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fsdp.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                   str(Path(__file__).resolve()), "--fsdp-worker", str(out), "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        if args.cpu_dry_run:
            command.append("--cpu-dry-run")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) as proc:
            try:
                output, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                output, _ = proc.communicate()
                return {"error": f"torchrun timed out after {timeout:.0f} s", "tail": output.splitlines()[-30:]}
        if proc.returncode != 0 or not out.exists():
            errors = re.findall(r"^(?:\[rank\d+\]: )?(\w+(?:Error|Exception): .*)$", output, flags=re.MULTILINE)
            cause = f": {errors[0][:160]}" if errors else ""
            return {"error": f"torchrun exited with {proc.returncode}{cause}", "tail": output.splitlines()[-80:]}
        return json.loads(out.read_text())


# ------------------------------------------------------------------ report
def fmt_flops(flops: float) -> str:
    return f"{flops / 1e12:,.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.1f} GFLOP/s"


def fmt_bytes(n: float) -> str:
    return f"{gib(n):.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def fmt_rate(row: dict[str, Any]) -> str:
    text = f"{row['tokens_per_s']:,.0f} tok/s, MFU {100 * row['mfu']:.1f}% of {fmt_flops(row['peak_flops'])}"
    return text + f" ({row['peak_flops_source']})"


def fmt_memory(peak: int | None, estimate: int) -> str:
    if peak is None:
        return f"estimate {fmt_bytes(estimate)} (no allocator statistics on the CPU)"
    return f"peak {fmt_bytes(peak)} vs estimate {fmt_bytes(estimate)} ({peak / estimate:.2f}x)"


def table(results: dict[str, Any]) -> str:
    info = results["device"]
    rows = [("device", info["device"], f"{info['name']}, compute capability {info['capability']}, "
                                       f"{info['gpus']} GPU(s), torch {info['torch']}"),
            ("precision", "choose_precision()", info["precision"])]
    if "pytest" in results:
        rows.append(("tests", results["pytest"]["command"], results["pytest"]["summary"]))
    for run in results["runs"]:
        setting = f"{run['label']}, B {run.get('batch', ['?'])[0]} x {run.get('batch', ['?', '?'])[1]}"
        if "error" in run or "skipped" in run:
            rows.append(("train", setting, run.get("error") or f"skipped: {run['skipped']}"))
            continue
        rows.append(("train", setting, fmt_rate(run)))
        loss = f"loss {run['last_loss']:.3f}" + (f", grad scale {run['grad_scale']:g}" if run["grad_scale"] else "")
        rows.append(("", f"warm-up {run['warmup_s']:.1f} s, {loss}", fmt_memory(run.get("peak_bytes"),
                                                                                 run["estimate_bytes"])))
    fsdp = results.get("fsdp")
    if fsdp is not None:
        if "error" in fsdp or "skipped" in fsdp:
            rows.append(("fsdp", "torchrun", fsdp.get("error") or f"skipped: {fsdp['skipped']}"))
        else:
            rows.append(("fsdp", f"{fsdp['label']} ({fsdp['backend']}), B {fsdp['batch_per_rank'][0]} x "
                                 f"{fsdp['batch_per_rank'][1]} per rank", fmt_rate(fsdp)))
            peaks = fsdp.get("peak_bytes_per_rank")
            rows.append(("", fsdp["precision"], fmt_memory(max(peaks) if peaks else None,
                                                           fsdp["estimate_bytes_per_rank"]) + " per rank"))
    rows.append(("time", results["mode"], f"{results['elapsed_s']:.0f} s"))
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.fsdp_worker is not None:
        fsdp_worker(args)
        return 0
    start = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    device = device_for(args)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    config = model_config(args)
    mode = "cpu dry run" if args.cpu_dry_run else "quick" if args.quick else "full"
    results: dict[str, Any] = {"mode": mode, "device": device_info(device), "model": dataclasses.asdict(config),
                               "runs": [], "elapsed_s": 0.0}

    def save() -> None:
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2, default=str))

    log(f"{results['device']['name']}: {results['device']['precision']}; mode {mode}")
    save()
    if args.tests:
        log(f"pytest {' '.join(PYTEST_ARGS)}")
        results["pytest"] = run_pytest(timeout=max(60.0, min(300.0, left() - 30)))
        log(results["pytest"]["summary"])
        save()
    for label, name, checkpointing, compile, skip in runs_to_do(args, device):
        row: dict[str, Any] = {"label": label, "batch": [args.batch_size, args.seq_len]}
        needed = 120.0 if compile else 15.0
        if skip is None and left() < needed:
            skip = f"time budget: {left():.0f} s left of {args.budget_s:.0f}"
        if skip is not None:
            row["skipped"] = skip
        else:
            log(f"train {label}")
            try:
                row = train_run(config, args, label, precision_for(name, device), checkpointing=checkpointing,
                                compile=compile)
            except Exception as error:  # noqa: BLE001  (an OOM or a compile failure: report it, go on)
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
                row["traceback"] = traceback.format_exc().splitlines()[-12:]
                release(device)
            log(f"  {fmt_rate(row) if 'tokens_per_s' in row else row.get('error')}")
        results["runs"].append(row)
        save()
    if args.fsdp:
        world = 2 if args.cpu_dry_run else torch.cuda.device_count()
        if world < 2:
            results["fsdp"] = {"skipped": f"needs >= 2 GPUs, found {world}"}
        elif left() < 30:
            results["fsdp"] = {"skipped": f"time budget: {left():.0f} s left"}
        else:
            log(f"fsdp over {world} ranks")
            results["fsdp"] = run_fsdp(args, world, timeout=max(30.0, left()))
        save()
    save()
    print(table(results))
    failed = ("pytest" in results and results["pytest"]["returncode"] != 0) or any(
        "error" in r or ("loss_finite" in r and not r["loss_finite"]) for r in results["runs"]) or (
        "error" in results.get("fsdp", {}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
