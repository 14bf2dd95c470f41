"""The freeze map's memory estimate against the measured peak, for every strategy, two models, batches and lengths.

    python bench/memory.py                 # all 48 cases (about an hour on 2 busy cores); writes bench/MEMORY.md
    python bench/memory.py --quick         # MiniLM only, one batch size and length
    python bench/memory.py --only lora     # cases whose name contains "lora"

Each case is a short `finetui run` (2 optimizer steps; `feature` embeds its data once) in a child process of its
own, so one case's freed memory is never another's. The child reports the run's `summary.json` `memory`
(estimated, measured, ratio) and the estimate's parts. On a CUDA machine the same cases run on the GPU
(`train.device=auto`) and the measured figure is the device's peak reserved memory; on a CPU it is the peak
resident memory above the process's baseline before the model loaded (engine.training.memory).

Every example is longer than the sequence length (sentences of the bundled quickstart data joined until they
are), so every batch is exactly batch x length tokens, as the estimate assumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
QUICKSTART = ROOT / "presets" / "data" / "quickstart" / "train.jsonl"
STRATEGIES = ("full", "lora", "qlora", "head", "last_layers", "feature")
MODELS = {  # model -> (batch sizes, sequence lengths)
    "builtin:minilm-l6": ((8, 32), (64, 256)),
    "builtin:smollm2-135m": ((2, 4), (64, 128)),
}
TOLERANCE = (0.8, 1.25)
STEPS = 2  # the second step is the first with AdamW's states: the peak


@dataclass(frozen=True)
class Case:
    model: str
    strategy: str
    batch: int
    length: int

    @property
    def name(self) -> str:
        return f"{self.model.removeprefix('builtin:')}/{self.strategy}/b{self.batch}xs{self.length}"

    @property
    def task(self) -> str:
        return "causal" if "smollm2" in self.model and self.strategy != "feature" else "classification"


def long_examples(folder: Path, count: int, words: int, seed: int = 0) -> Path:
    """Texts of at least `words` words made of quickstart sentences, with their labels."""
    rows = [json.loads(line) for line in QUICKSTART.read_text(encoding="utf-8").splitlines()]
    rng = random.Random(seed)
    path = folder / f"long-{count}.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for index in range(count):
            text: list[str] = []
            while len(text) < words:
                text.extend(rng.choice(rows)["text"].split())
            label = ("negative", "positive")[index % 2]
            out.write(json.dumps({"text": " ".join(text), "label": label}) + "\n")
    return path


def case_overrides(case: Case, data: Path, validation: Path, output: Path) -> list[str]:
    settings = {
        "name": json.dumps(case.name.replace("/", "-")),
        "model.id": json.dumps(case.model),
        "model.task": case.task,
        "strategy.kind": case.strategy,
        "data.train": json.dumps(str(data)),
        "data.validation": json.dumps(str(validation)),
        "data.max_length": case.length,
        "data.template": "none",
        "train.batch_size": case.batch,
        "train.eval_batch_size": case.batch,
        "train.max_steps": STEPS,
        "train.logging_steps": 1,
        "train.save_steps": STEPS,
        "train.output_dir": json.dumps(str(output)),
    }
    return [f"{key}={value}" for key, value in settings.items()]


def run_case(overrides: list[str]) -> dict:
    """In the child: one run; its memory record, estimate parts and step peaks as one JSON line."""
    from engine.api import run_training
    from engine.config import build_config
    from engine.events import FreezeMapReady, Step
    from engine.sinks import ListSink

    sink = ListSink()
    result = run_training(build_config({}, overrides), sink)
    if result.status != "finished":
        return {"error": result.summary.get("error")}
    estimate = sink.of_type(FreezeMapReady)[0].freeze_map["memory"]
    steps = [step.memory_peak_bytes for step in sink.of_type(Step)]
    return {"memory": result.summary["memory"], "estimate": estimate, "step_peaks": steps}


def load_average() -> float:
    return os.getloadavg()[0]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}"


def cases(args: argparse.Namespace) -> list[Case]:
    """Smallest batch and length first for every model and strategy, then the largest, then the mixed ones: a bench
    cut short still covers every strategy."""
    found = []
    for variant in ((0, 0), (1, 1), (0, 1), (1, 0)):
        for model, (batches, lengths) in MODELS.items():
            if args.quick and ("minilm" not in model or variant != (0, 0)):
                continue
            for strategy in STRATEGIES:
                case = Case(model, strategy, batches[variant[0]], lengths[variant[1]])
                if args.only is None or args.only in case.name:
                    found.append(case)
    return found


def table(rows: list[tuple[Case, dict, float]]) -> list[str]:
    mib = 2**20
    lines = [
        "| model | strategy | batch x length | estimate MiB | measured MiB | estimate / measured | within 0.8-1.25 "
        "| weights / grads / AdamW / activations / overhead MiB | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, result, load in rows:
        head = f"| {case.model.removeprefix('builtin:')} | {case.strategy} | {case.batch} x {case.length} |"
        if "memory" not in result:
            error = (str(result.get("error", "")).strip().splitlines() or [""])[-1][-100:]
            lines.append(f"{head} failed: {error} | | | | | | {load:.1f} |")
            continue
        memory, parts = result["memory"], result["estimate"]
        ratio = memory["ratio"]
        inside = "yes" if TOLERANCE[0] <= ratio <= TOLERANCE[1] else "**no**"
        split = " / ".join(
            f"{parts.get(key, 0) / mib:.0f}"
            for key in ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "overhead_bytes")
        )
        lines.append(
            f"{head} {memory['estimated'] / mib:.0f} | {memory['measured'] / mib:.0f} | {ratio:.2f} | {inside} "
            f"| {split} | {load:.1f} |"
        )
    return lines


def write_report(path: Path, rows: list[tuple[Case, dict, float]], started: float, total: int) -> None:
    measured = [result["memory"]["ratio"] for _, result, _ in rows if "memory" in result]
    inside = sum(TOLERANCE[0] <= ratio <= TOLERANCE[1] for ratio in measured)
    import torch

    where = "GPU (peak reserved memory, largest device)" if torch.cuda.is_available() else "CPU"
    where += ", from a baseline taken just before the model loads"
    text = [
        "# Memory: the freeze map's estimate against the measured peak",
        "",
        f"- Machine: {machine()}; measured on the {where}.",
        f"- Written by `python bench/memory.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"{len(rows)} of {total} cases, {time.time() - started:.0f} s. The machine is shared: the load column is the "
        "1-minute load average when each case started (memory is far less sensitive to load than time).",
        f"- Each case: `finetui run` in a fresh process, {STEPS} optimizer steps (the second is the first with "
        "AdamW's states), every example longer than the sequence length, eval batch = batch, fp32; `feature` embeds "
        "its data once and fits the classifier. SmolLM2 trains as a causal LM, except `feature` (classification).",
        f"- Within {TOLERANCE[0]}-{TOLERANCE[1]}x: **{inside} of {len(measured)}** measured cases.",
        "",
        *table(rows),
        "",
    ]
    path.write_text("\n".join(text), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "MEMORY.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_case(json.loads(args.child))), flush=True)
        return
    rows: list[tuple[Case, dict, float]] = []
    started = time.time()
    todo = cases(args)
    with tempfile.TemporaryDirectory(prefix="finetui-memory-bench-") as scratch:
        folder = Path(scratch)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "FINETUI_CACHE": str(folder / "cache")}
        for case in todo:
            for cached in ("tokenised", "features"):  # a cache hit would skip work (and memory) the estimate counts
                shutil.rmtree(folder / "cache" / cached, ignore_errors=True)
            data = long_examples(folder, 2 * case.batch * STEPS, case.length * 2)
            validation = long_examples(folder, case.batch, case.length * 2, seed=1)
            overrides = case_overrides(case, data, validation, folder / "runs")
            load = load_average()
            child = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(overrides)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                env=env,
            )
            line = next((text for text in child.stdout.splitlines() if text.startswith("RESULT ")), None)
            result = json.loads(line.removeprefix("RESULT ")) if line else {"error": child.stderr[-2000:]}
            rows.append((case, result, load))
            print(case.name, json.dumps(result), flush=True)
            write_report(args.out, rows, started, len(todo))  # after each case: a long bench leaves its part
            shutil.rmtree(folder / "runs", ignore_errors=True)


if __name__ == "__main__":
    main()
