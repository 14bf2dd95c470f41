"""One benchmark run: finetui against the hand-written Hugging Face recipe, side by side, on the same machine.

    python bench/run_bench.py            # ~15-20 minutes on 2 cores; writes bench/RESULTS.md
    python bench/run_bench.py --quick    # a few minutes: smaller subsets, to check that it works

For each strategy (`full`, `lora`, `head`, `last_layers` with 2 blocks, `feature`) on `builtin:minilm-l6` and
the same seeded subset of Rotten Tomatoes, it runs `bench/baseline.py` (plain Trainer, everything padded to the
dataset's longest example, frozen layers recomputed every step) and then `finetui run`, each in its own child
process with the same batch size, learning rate and epochs; then `feature` once more (another C) to show the
cached embeddings. It also measures the fp32 matmul peak of this machine, `finetui inspect` on a Llama-2-70B
config, and the TUI's time to its first screen. Numbers from a loaded machine are noisy: the load average is
recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `engine` from this checkout
DATA = ROOT.parent / "shared" / "data" / "rotten_tomatoes"
LLAMA_7B = ROOT.parent / "shared" / "configs" / "meta-llama__Llama-2-7b-hf" / "config.json"
MODEL = "builtin:minilm-l6"
BATCH = 16
# strategy -> (epochs, learning rate); the same for the baseline and finetui.
PLANS = {"full": (1, 5e-5), "lora": (1, 1e-3), "head": (2, 1e-3), "last_layers": (2, 1e-4), "feature": (1, 0.0)}
TUI_PAINT = """
import asyncio, time
from tui.app import create_app
async def main():
    app = create_app(None)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        print(time.time())
asyncio.run(main())
"""


@dataclass
class Child:
    """One child process: what it printed, how long it ran, its peak RSS."""

    started: float
    wall_s: float
    peak_rss_mb: float
    stdout: str
    returncode: int
    stderr_file: Path


@dataclass
class Measured:
    samples_per_second: float = 0.0
    epoch2_s: float | None = None
    first_step_s: float | None = None
    peak_rss_mb: float = 0.0
    accuracy: float | None = None
    tokens_per_second: float | None = None
    wall_s: float = 0.0
    runtime_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def run_child(
    command: list[str], env: dict[str, str], log_dir: Path, name: str, *, kill_after_first_step: bool = False
) -> Child:
    """Run a command to completion (or, with `kill_after_first_step`, until it prints its first step event)."""
    stderr_file = log_dir / f"{name}.stderr"
    started = time.time()
    lines: list[str] = []
    with stderr_file.open("w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if kill_after_first_step and line.startswith('{"type": "step"'):
                process.send_signal(signal.SIGKILL)
                break
        process.stdout.close()
        _, status, usage = os.wait4(process.pid, 0)
    returncode = os.waitstatus_to_exitcode(status)
    if kill_after_first_step and returncode == -signal.SIGKILL:
        returncode = 0
    return Child(started, time.time() - started, usage.ru_maxrss / 1024, "".join(lines), returncode, stderr_file)


def matmul_peak_gflops() -> float:
    """Best fp32 torch.mm throughput on large square matrices, with all the cores this process may use."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    best = 0.0
    for size in (2048, 3072):
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)
        for _ in range(4):
            started = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size**3 / (time.perf_counter() - started) / 1e9)
    return best


def parameter_counts() -> dict[str, int]:
    """MiniLM-L6 classifier parameters: all matmul ones (non-embedding), the top 2 blocks + head, and the part of
    them that finetui's cached `last_layers` runs at every token (block -2, the keys and values of block -1)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from engine.models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(MODEL).path, num_labels=2)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    top = sum(count(block) for block in model.bert.encoder.layer[-2:]) + count(model.bert.pooler)
    last = model.bert.encoder.layer[-1].attention.self
    return {
        "total": count(model),
        "matmul": count(model) - count(model.bert.embeddings),
        "top": top + count(model.classifier),
        "top_per_token": count(model.bert.encoder.layer[-2]) + count(last.key) + count(last.value),
    }


def write_subsets(folder: Path, train: int, validation: int) -> tuple[Path, Path]:
    """Seeded random subsets of the shared train/validation files (split on "\\n" only: the text holds U+0085)."""
    paths = []
    for name, count in (("train", train), ("validation", validation)):
        lines = [line for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").split("\n") if line.strip()]
        random.Random(42).shuffle(lines)
        path = folder / f"{name}.jsonl"
        path.write_text("\n".join(lines[:count]) + "\n", encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def epoch_seconds(step_times: list[float]) -> float | None:
    """Training time of an epoch from the end times of its steps: the mean step gap times the step count.

    The gap before the epoch's first step (evaluation and checkpoint of the previous epoch) is left out.
    """
    if len(step_times) < 2:
        return None
    return (step_times[-1] - step_times[0]) * len(step_times) / (len(step_times) - 1)


def run_baseline(kind: str, train: Path, validation: Path, env: dict[str, str], work: Path) -> Measured:
    from engine.models import resolve_model

    epochs, lr = PLANS[kind]
    command = [sys.executable, "bench/baseline.py", "--model", resolve_model(MODEL).path, "--train", str(train)]
    command += ["--validation", str(validation), "--strategy", kind, "--epochs", str(epochs), "--lr", str(lr)]
    command += ["--batch-size", str(BATCH), "--output-dir", str(work / f"baseline-{kind}")]
    child = run_child(command, env, work, f"baseline-{kind}")
    if child.returncode != 0:
        raise SystemExit(f"baseline {kind} failed: see {child.stderr_file}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    measured = Measured(
        samples_per_second=result["samples_per_second"],
        peak_rss_mb=child.peak_rss_mb,
        accuracy=result["accuracy"],
        wall_s=child.wall_s,
        runtime_s=result["runtime_s"],
    )
    measured.notes.append(f"padded to {result['padded_length']} tokens")
    if "steps" in result:
        steps = result["steps"]
        measured.first_step_s = result["first_step_time"] - child.started
        epoch1 = [t for t, epoch in steps if epoch <= 1.0 + 1e-9]
        step_s = (epoch1[-1] - epoch1[0]) / max(1, len(epoch1) - 1)
        measured.tokens_per_second = result["real_tokens_per_epoch"] / (epoch1[-1] - epoch1[0] + step_s)
        if epochs >= 2:
            measured.epoch2_s = epoch_seconds([t for t, epoch in steps if epoch > 1.0 + 1e-9])
    return measured


def run_finetui(kind: str, train: Path, validation: Path, env: dict[str, str], work: Path, *extra: str) -> Measured:
    epochs, lr = PLANS[kind]
    command = [sys.executable, "-m", "engine.cli", "run", "--json", "--output-dir", str(work / "runs")]
    settings = {
        "model.id": MODEL,
        "strategy.kind": kind,
        "strategy.layers": 2,
        "data.train": str(train),
        "data.validation": str(validation),
        "data.max_length": 128,
        "train.batch_size": BATCH,
        "train.epochs": epochs,
        "train.logging_steps": 1,
        **({"train.lr": lr} if lr else {}),
    }
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    for item in extra:
        command += ["--set", item]
    child = run_child(command, env, work, f"finetui-{kind}{'-rerun' if extra else ''}")
    events = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    finished = [event for event in events if event["type"] == "run_finished"]
    if child.returncode != 0 or not finished:
        raise SystemExit(f"finetui {kind} failed (exit {child.returncode}): see {child.stderr_file}")
    summary = finished[0]["summary"]
    steps = [event for event in events if event["type"] == "step"]
    measured = Measured(
        samples_per_second=summary.get("train_samples_per_second") or 0.0,
        peak_rss_mb=child.peak_rss_mb,
        accuracy=(summary.get("validation") or {}).get("accuracy"),
        wall_s=child.wall_s,
        runtime_s=summary.get("train_runtime_s") or 0.0,
    )
    for event in events:
        if event["type"] == "log" and ("from the cache" in event["message"] or "once" in event["message"]):
            measured.notes.append(event["message"])
    if steps:
        measured.first_step_s = steps[0]["time"] - child.started
        epoch1 = [step for step in steps if step["epoch"] <= 1.0 + 1e-9]
        measured.tokens_per_second = epoch1[-1]["tokens_per_second"]
        if epochs >= 2:
            measured.epoch2_s = epoch_seconds([step["time"] for step in steps if step["epoch"] > 1.0 + 1e-9])
    return measured


def inspect_70b(env: dict[str, str], work: Path) -> tuple[Child, str]:
    """`finetui inspect` on Llama-2-70B's shape (the 7B config with 70B's sizes: 80 layers, 8192 wide, GQA 8)."""
    config = json.loads(LLAMA_7B.read_text(encoding="utf-8"))
    config.update(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8
    )
    folder = work / "llama-2-70b-config"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    command = [sys.executable, "-m", "engine.cli", "inspect", "--model", str(folder), "--strategy", "lora", "--json"]
    child = run_child(command, env, work, "inspect-70b")
    try:
        total = f"{json.loads(child.stdout)['total_params']:,} parameters"
    except (ValueError, KeyError, TypeError):
        total = f"exit {child.returncode}"
    return child, total


def tui_first_paint(env: dict[str, str], work: Path) -> float | None:
    child = run_child([sys.executable, "-c", TUI_PAINT], env | {"TERM": "xterm-256color"}, work, "tui")
    try:
        return float(child.stdout.strip().splitlines()[-1]) - child.started
    except (ValueError, IndexError):
        return None


def machine() -> str:
    import torch
    import transformers

    cpu = platform.processor() or "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    cores = len(os.sched_getaffinity(0))
    return f"{cpu}, {cores} cores{gpu}, torch {torch.__version__}, transformers {transformers.__version__}"


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(ours: float | None, theirs: float | None, invert: bool = False) -> float | None:
    if not ours or not theirs:
        return None
    return theirs / ours if invert else ours / theirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small subsets: checks the bench in a few minutes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--only", nargs="*", choices=list(PLANS), help="run only these strategies")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (runs, logs; kept on a failure)")
    args = parser.parse_args()
    n_train, n_validation = (320, 160) if args.quick else (1600, 500)
    work = Path(tempfile.mkdtemp(prefix="finetui-bench-"))
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FINETUI_CACHE": str(work / "cache"),  # cold caches: first runs pay for tokenising and embedding
    }
    (work / "cache").mkdir()
    load_before = os.getloadavg()
    started = time.time()
    print(f"bench: work folder {work}; load average {load_before[0]:.2f}", flush=True)
    train, validation = write_subsets(work, n_train, n_validation)
    peak = matmul_peak_gflops()
    params = parameter_counts()
    print(f"fp32 matmul peak {peak:.1f} GFLOP/s; parameters {params}", flush=True)

    results: dict[str, tuple[Measured, Measured]] = {}
    for kind in args.only or list(PLANS):
        baseline = run_baseline(kind, train, validation, env, work)
        ours = run_finetui(kind, train, validation, env, work)
        results[kind] = (baseline, ours)
        print(
            f"{kind}: baseline {baseline.samples_per_second:.1f}/s, finetui {ours.samples_per_second:.1f}/s", flush=True
        )
    rerun = (
        run_finetui("feature", train, validation, env, work, "strategy.classifier_c=0.5")
        if "feature" in results
        else None
    )
    inspect_child, inspect_total = inspect_70b(env, work)
    paint = tui_first_paint(env, work)
    load_after = os.getloadavg()

    # FLOPs per real token of the trained path: 6N for forward + backward of N matmul parameters, 2N for a
    # forward-only part, 4N where gradients flow to activations but not to the (frozen) weights (LoRA).
    flops_per_token = {
        "full": (6 * params["matmul"], 6 * params["matmul"]),
        "lora": (4 * params["matmul"], 4 * params["matmul"]),
        "last_layers": (2 * params["matmul"] + 4 * params["top"], 6 * params["top_per_token"]),
    }
    lines = [
        f"# finetui benchmark ({'quick' if args.quick else 'full'})",
        "",
        f"- Machine: {machine()}",
        f"- Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}; "
        f"bench total {time.time() - started:.0f} s",
        f"- Data: Rotten Tomatoes, seeded subsets of {n_train} train / {n_validation} validation rows; {MODEL}; "
        f"batch {BATCH}; same epochs and learning rate on both sides; fp32 on CPU.",
        f"- fp32 matmul peak (torch.mm, 2048-3072 square, best of 4): **{peak:.1f} GFLOP/s**",
        "- Baseline: `bench/baseline.py`, a plain HF Trainer as the seed recipes write it (pad to the dataset's "
        "longest, frozen layers recomputed every step, default optimizer, no length grouping).",
        "- samples/s: HF's `train_samples_per_second` on both sides (epochs x examples / train runtime, evaluation "
        "at each epoch end included). Epoch 2: the second epoch's steps only (mean step gap x steps; no evaluation "
        "or checkpoint). First step: from process launch to the end of the first optimizer step (for finetui's "
        "head/last_layers it includes building the frozen-layer cache). Peak RSS: the child process (wait4).",
        "- Useful FLOP/s = FLOPs per real (non-padding) token x real tokens/s over epoch 1, with "
        f"N = {params['matmul']:,} "
        f"matmul (non-embedding) parameters and N_top = {params['top']:,} (2 blocks + head): full 6N; lora 4N "
        "(forward 2N + activation gradients 2N); last_layers baseline 2N + 4N_top, cached "
        f"6 x {params['top_per_token']:,} (block -2 and the keys and values of block -1: the rest of the last block "
        "and the head run for the first token only and are left out, ~3 % of the work; the one-off forward that "
        "builds the cache is not in it either).",
        "",
        "| strategy | baseline samples/s | finetui samples/s | ratio | epoch 2 s (base / finetui) | epoch-2 speed-up "
        "| first step s (base / finetui) | peak RSS MB (base / finetui) | val. accuracy (base / finetui) "
        "| useful GFLOP/s (base / finetui) | % of peak (finetui) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, (baseline, ours) in results.items():
        flops = flops_per_token.get(kind)
        base_gf = flops[0] * baseline.tokens_per_second / 1e9 if flops and baseline.tokens_per_second else None
        ours_gf = flops[1] * ours.tokens_per_second / 1e9 if flops and ours.tokens_per_second else None
        lines.append(
            f"| {kind} | {baseline.samples_per_second:.1f} | {ours.samples_per_second:.1f} "
            f"| {fmt(ratio(ours.samples_per_second, baseline.samples_per_second), '.2f')}x "
            f"| {fmt(baseline.epoch2_s)} / {fmt(ours.epoch2_s)} "
            f"| {fmt(ratio(ours.epoch2_s, baseline.epoch2_s, True), '.1f')}x "
            f"| {fmt(baseline.first_step_s)} / {fmt(ours.first_step_s)} "
            f"| {baseline.peak_rss_mb:.0f} / {ours.peak_rss_mb:.0f} "
            f"| {fmt(baseline.accuracy, '.3f')} / {fmt(ours.accuracy, '.3f')} "
            f"| {fmt(base_gf)} / {fmt(ours_gf)} | {fmt(100 * ours_gf / peak if ours_gf else None, '.0f')} |"
        )
    lines.append("")
    if rerun is not None:
        first = results["feature"][1]
        lines.append(
            f"- `feature` rerun (C=0.5, embeddings and tokens from the cache): embed+fit {rerun.runtime_s:.2f} s vs "
            f"{first.runtime_s:.2f} s first run (**{fmt(ratio(rerun.runtime_s, first.runtime_s, True), '.0f')}x**); "
            f"whole process {rerun.wall_s:.1f} s vs {first.wall_s:.1f} s; accuracy {fmt(rerun.accuracy, '.3f')}."
        )
    lines.append(
        f"- `finetui inspect` Llama-2-70B shape, LoRA ({inspect_total}): {inspect_child.wall_s:.1f} s, "
        f"peak RSS {inspect_child.peak_rss_mb:.0f} MB."
    )
    lines.append(f"- TUI first screen (Textual `run_test`, headless, from process launch): {fmt(paint, '.2f')} s.")
    for kind, (baseline, ours) in results.items():
        for note in baseline.notes + ours.notes:
            lines.append(f"- {kind}: {note}")
    lines += ["", "## Targets (issue 4)", ""]
    targets = []
    for kind in ("full", "lora"):
        if kind in results:
            value = ratio(results[kind][1].samples_per_second, results[kind][0].samples_per_second) or 0.0
            targets.append((f"`{kind}` samples/s >= 1.8x baseline", f"{value:.2f}x", value >= 1.8))
    for kind in ("head", "last_layers"):
        if kind in results:
            value = ratio(results[kind][1].epoch2_s, results[kind][0].epoch2_s, True) or 0.0
            targets.append((f"`{kind}` epoch 2 >= 5x faster than recomputing", f"{value:.1f}x", value >= 5))
    if rerun is not None:
        value = ratio(rerun.runtime_s, results["feature"][1].runtime_s, True) or 0.0
        targets.append(("`feature` rerun >= 10x faster (embed + fit)", f"{value:.0f}x", value >= 10))
    if "full" in results and results["full"][1].tokens_per_second:
        share = 100 * flops_per_token["full"][1] * results["full"][1].tokens_per_second / 1e9 / peak
        targets.append(("`full` >= 50 % of the fp32 matmul peak", f"{share:.0f} %", share >= 50))
    noise = 2 * (2 * 0.25 / n_validation) ** 0.5  # two standard errors of a difference of two accuracies near 0.5
    for kind, (baseline, ours) in results.items():
        if baseline.accuracy is not None and ours.accuracy is not None:
            gap = abs(ours.accuracy - baseline.accuracy)
            name = f"`{kind}` accuracy equals the baseline's within noise (|diff| <= {noise:.3f})"
            targets.append((name, f"{gap:.3f}", gap <= noise))
    lines += ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if met else 'NO'} |" for name, value, met in targets]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)  # ~1.6 GB of runs and caches


if __name__ == "__main__":
    main()
