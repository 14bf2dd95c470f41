"""Causal fine-tuning speed: finetui against the seed's own recipe, in turns, on the same machine.

    python bench/causal.py                       # 2 rounds of 2 x 4 runs of 4 steps; writes bench/CAUSAL.md
    python bench/causal.py --steps 2 --rounds 2  # what bench/CAUSAL.md holds (about an hour on the busy 2 cores)
    python bench/causal.py --quick               # one step, one round: checks that it works (gpu_check.sh)

The recipe is nestor-sun/llm `demo/fine-tune.py` written with what is installed (`bench/causal_recipe.py`: HF Trainer,
`DataCollatorForLanguageModeling`, per-batch padding, random order, loss on every token, LoRA r=64 / alpha 16 / dropout
0.1, batch 4 x 4, lr 2e-4, NF4 base for QLoRA). finetui runs `python -m engine.cli run` (the CLI in front of
`engine.api.run_training`) with the same settings as `--set` overrides (`FINETUI_SETTINGS`), plus what it does on its
own (length-grouped batches, and `data.packing` where this bench turns it on). Both train `builtin:smollm2-135m` on the
same seeded subset of `../shared/data/alpaca_5000` (Alpaca prompt + response as one text field) for one epoch (`--steps`
optimizer steps of 16 examples), each in its own child process, in turns: recipe LoRA, finetui LoRA, the recipe's
LoRA in finetui's length-grouped order (a control: in a run this short the order alone moves the validation loss, so
"equal loss" compares finetui with the recipe in the same order), recipe QLoRA, finetui QLoRA, then the next round
with the next seed.

Reported: real (non-padding) tokens/s and samples/s over the training steps, time from process launch to the first
training step, peak RSS, validation loss after the same examples (both sides score the same token ids), a split
of one optimizer step (data, forward, backward, optimizer) with the top operators of its forward and backward, the
start-up of a first and a second run against a process that only loads the model, and the load average.
On a machine with a CUDA GPU both sides train in bf16 and the table adds the peak GPU memory and finetui's
estimate of it (`bench/gpu_check.sh` runs `--quick` there; that path has not been run yet: no GPU here).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `engine` from this checkout

from run_bench import Child, machine, run_child  # noqa: E402  (bench/ is the script's folder on sys.path)

ALPACA = ROOT.parent / "shared" / "data" / "alpaca_5000" / "alpaca_5000.json"
MODEL = "builtin:smollm2-135m"
STRATEGIES = ("lora", "qlora")
EXAMPLES_PER_STEP = 16  # batch 4 x gradient accumulation 4, both sides
# The recipe's settings in finetui's terms. `data.template = "none"`: the text field as it is, loss on every token.
FINETUI_SETTINGS = {
    "model.task": "causal",
    "data.template": "none",
    "data.max_length": 512,
    "strategy.r": 64,
    "strategy.alpha": 16,
    "strategy.dropout": 0.1,
    "strategy.target_modules": "auto",
    "strategy.quant_type": "nf4",
    "strategy.double_quant": False,
    "train.batch_size": 4,
    "train.grad_accum": 4,
    "train.lr": 2e-4,
    "train.logging_steps": 1,
}
# What finetui adds on top of the recipe's settings in this bench.
FINETUI_SPEED = {"data.packing": True}
PROFILE_TOP = 8
GROUPED = "recipe, length-grouped"  # the control: the recipe in finetui's order (LoRA only)


@dataclass
class Measured:
    """One training run of one side."""

    side: str
    strategy: str
    seed: int
    tokens_per_second: float
    samples_per_second: float
    first_step_s: float  # process launch to the start of the first training step
    peak_rss_mb: float
    validation_loss: float
    padding_share: float | None = None
    gpu_peak_mb: float | None = None
    gpu_estimate_mb: float | None = None
    notes: list[str] = field(default_factory=list)


def write_subsets(folder: Path, n_train: int, n_validation: int) -> tuple[Path, Path]:
    """Seeded, disjoint train/validation subsets of Alpaca as JSON lines with one `text` field each."""
    from engine.data import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT

    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    random.Random(0).shuffle(rows)

    def text(row: dict[str, str]) -> str:
        prompt = (
            ALPACA_PROMPT_WITH_INPUT.format(instruction=row["instruction"], input=row["input"])
            if row["input"].strip()
            else ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])
        )
        return prompt + row["output"]

    paths = []
    for name, part in (("train", rows[:n_train]), ("validation", rows[-n_validation:])):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": text(row)}) + "\n" for row in part), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def finetui_command(strategy: str, train: Path, validation: Path, work: Path, **settings: Any) -> list[str]:
    command = [sys.executable, "-m", "engine.cli", "run", "--json", "--output-dir", str(work / "runs")]
    command += ["--model", MODEL, "--strategy", strategy]
    merged = {**FINETUI_SETTINGS, **FINETUI_SPEED, "data.train": str(train), "data.validation": str(validation)}
    for key, value in {**merged, **settings}.items():
        command += ["--set", f"{key}={_toml(value)}"]
    return command


def events_of(child: Child) -> list[dict[str, Any]]:
    return [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]


def train_begin(events: list[dict[str, Any]]) -> float | None:
    """Wall time at which training started: the first step event's time less its elapsed training time."""
    steps = [event for event in events if event["type"] == "step"]
    return steps[0]["time"] - steps[0]["elapsed_s"] if steps else None


def run_finetui(
    strategy: str, train: Path, validation: Path, steps: int, seed: int, env: dict[str, str], work: Path
) -> Measured:
    command = finetui_command(strategy, train, validation, work, **{"train.max_steps": steps, "train.seed": seed})
    child = run_child(command, env, work, f"finetui-{strategy}-{seed}")
    events = events_of(child)
    finished = [event for event in events if event["type"] == "run_finished"]
    if child.returncode != 0 or not finished:
        raise SystemExit(f"finetui {strategy} failed (exit {child.returncode}): see {child.stderr_file}")
    summary = finished[0]["summary"]
    last = [event for event in events if event["type"] == "step"][-1]
    memory = next((e["freeze_map"].get("memory") for e in events if e["type"] == "freeze_map"), None) or {}
    measured = Measured(
        side="finetui",
        strategy=strategy,
        seed=seed,
        tokens_per_second=last["tokens_per_second"],
        samples_per_second=last["samples_per_second"],
        first_step_s=(train_begin(events) or child.started) - child.started,
        peak_rss_mb=child.peak_rss_mb,
        validation_loss=summary["validation"]["loss"],
        gpu_peak_mb=last.get("gpu_peak_mb"),
        gpu_estimate_mb=memory.get("total_bytes", 0) / 2**20 if last.get("gpu_peak_mb") else None,
    )
    measured.notes += [e["message"] for e in events if e["type"] == "log" and "cache" in e["message"]]
    return measured


def run_recipe(
    strategy: str,
    train: Path,
    validation: Path,
    steps: int,
    seed: int,
    env: dict[str, str],
    work: Path,
    *,
    grouped: bool = False,
) -> Measured:
    from engine.models import resolve_model

    name = f"recipe-{strategy}-{seed}" + ("-grouped" if grouped else "")
    command = [sys.executable, "bench/causal_recipe.py", "--model", resolve_model(MODEL).path, "--strategy", strategy]
    command += ["--train", str(train), "--validation", str(validation), "--max-steps", str(steps)]
    command += ["--seed", str(seed), "--output-dir", str(work / name)] + (["--group-by-length"] if grouped else [])
    child = run_child(command, env, work, name)
    if child.returncode != 0:
        raise SystemExit(f"recipe {strategy} failed (exit {child.returncode}): see {child.stderr_file}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    return Measured(
        side=GROUPED if grouped else "recipe",
        strategy=strategy,
        seed=seed,
        tokens_per_second=result["real_tokens"] / result["train_s"],
        samples_per_second=result["examples"] / result["train_s"],
        first_step_s=result["train_begin"] - child.started,
        peak_rss_mb=child.peak_rss_mb,
        validation_loss=result["validation_loss"],
        padding_share=1 - result["real_tokens"] / result["padded_tokens"],
        gpu_peak_mb=result["gpu_peak_mb"],
    )


# --- start-up: a first and a second run against a process that only loads the model ---------------------------


def load_child(strategy: str) -> None:
    """Child: import what training imports, load the model as finetui does for `strategy`, print the timings."""
    started = time.time()
    import peft  # noqa: F401  (training imports it; part of the floor)
    import torch

    from engine.config import ModelConfig, StrategyConfig
    from engine.strategies import get_strategy

    imported = time.time()
    cuda = torch.cuda.is_available()
    get_strategy(StrategyConfig(kind=strategy, double_quant=False), "causal").load_model(
        ModelConfig(id=MODEL, task="causal"),
        num_labels=None,
        label_names=None,
        device="cuda" if cuda else "cpu",
        precision="bf16" if cuda else "fp32",
    )
    print(json.dumps({"imports_s": imported - started, "load_s": time.time() - imported}))


@dataclass
class StartUp:
    strategy: str
    floor_s: float  # launch -> model loaded, in a process that does nothing else
    load_s: float  # the model load alone (from_pretrained, 4-bit quantisation included)
    runs: dict[str, dict[str, float]]  # "first" / "second" -> phase -> seconds


def start_up(strategy: str, train: Path, validation: Path, env: dict[str, str], work: Path) -> StartUp:
    """Launch -> first training step for a run with empty caches, then again with the caches it left."""
    cache = work / f"cold-cache-{strategy}"
    cache.mkdir()
    env = env | {"FINETUI_CACHE": str(cache)}
    runs = {}
    for which in ("first", "second"):
        # One example per step: the time to the first step does not depend on the batch, and the step that ends
        # this run (the first `step` event) is then short.
        settings = {"train.max_steps": 2, "train.batch_size": 1, "train.grad_accum": 1}
        command = finetui_command(strategy, train, validation, work, **settings)
        child = run_child(command, env, work, f"startup-{strategy}-{which}", kill_after_first_step=True)
        events = events_of(child)
        begin = train_begin(events)
        if child.returncode != 0 or begin is None:
            raise SystemExit(f"finetui {strategy} start-up run failed: see {child.stderr_file}")
        started = next(e["time"] for e in events if e["type"] == "run_started")
        loading = next(e["time"] for e in events if e["type"] == "log" and e["message"].startswith("loading model"))
        ready = next(e["time"] for e in events if e["type"] == "freeze_map")
        runs[which] = {
            "total": begin - child.started,
            "launch, imports, config": started - child.started,
            "tokenizer + data": loading - started,
            "model + adapters + freeze map": ready - loading,
            "trainer set-up": begin - ready,
        }
    floor = run_child([sys.executable, "bench/causal.py", "--load-child", strategy], env, work, f"load-{strategy}")
    if floor.returncode != 0:
        raise SystemExit(f"model load child failed: see {floor.stderr_file}")
    timings = json.loads(floor.stdout.strip().splitlines()[-1])
    return StartUp(strategy, floor.wall_s, timings["load_s"], runs)


# --- where one optimizer step's time goes -------------------------------------------------------------------------


def profile_child(side: str, strategy: str, train: Path) -> None:
    """Child: one optimizer step (4 micro-batches of 4) of `side`, split into data, forward, backward, optimizer.

    Both sides take the same 16 examples (the first 16 of the train file): the recipe in the order given, padded per
    batch; finetui sorted by length into its micro-batches (what its length-grouped sampler does over a larger
    pool), packed when `data.packing` is on. One micro-batch warms up, one optimizer step is timed, then the first
    micro-batch runs once more under torch.profiler for the operator shares.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model, batches = _profile_setup(side, strategy, train)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda and not getattr(model, "is_loaded_in_4bit", False):
        model.to(device)  # a 4-bit model is loaded onto the GPU already; the Trainer moves the others
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4, fused=True)
    phases = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def micro_batch(collate: Any) -> None:
        t0 = clock()
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in collate().items()}
        t1 = clock()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(**batch).loss
        t2 = clock()
        (loss / len(batches)).backward()
        t3 = clock()
        for name, seconds in (("data", t1 - t0), ("forward", t2 - t1), ("backward", t3 - t2)):
            phases[name] += seconds

    micro_batch(batches[0])
    optimizer.zero_grad()
    phases.update(dict.fromkeys(phases, 0.0))
    for collate in batches:
        micro_batch(collate)
    t0 = clock()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    phases["optimizer"] = clock() - t0
    timed = dict(phases)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        micro_batch(batches[0])
    averages = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in averages)
    top = sorted(averages, key=lambda event: event.self_cpu_time_total, reverse=True)[:PROFILE_TOP]
    tokens = [collate() for collate in batches]
    print(
        json.dumps(
            {
                "phases": timed,
                "real_tokens": sum(_real_tokens(batch) for batch in tokens),
                "computed_tokens": sum(batch["input_ids"].numel() for batch in tokens),
                "top": [(event.key, event.self_cpu_time_total / total) for event in top],
            }
        )
    )


def _real_tokens(batch: dict[str, Any]) -> int:
    """Non-padding tokens of a batch (a packed batch has no attention mask and no padding)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def _profile_setup(side: str, strategy: str, train: Path) -> tuple[Any, list[Any]]:
    """The side's model and, for the 16 examples, one collate function per micro-batch."""
    import torch

    from engine.models import resolve_model

    cuda = torch.cuda.is_available()
    if side == "recipe":
        sys.path.insert(0, str(ROOT / "bench"))
        import causal_recipe as recipe
        from transformers import AutoTokenizer

        folder = resolve_model(MODEL).path
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.pad_token = tokenizer.eos_token
        rows = list(recipe.tokenise(tokenizer, recipe.read_texts(str(train)))["input_ids"])[:EXAMPLES_PER_STEP]
        collator = recipe.LabelsFromMask(tokenizer, mlm=False)
        groups = [rows[i : i + 4] for i in range(0, EXAMPLES_PER_STEP, 4)]
        model = recipe.load_model(folder, strategy, cuda=cuda)
        return model, [lambda g=g: collator([{"input_ids": ids} for ids in g]) for g in groups]

    from engine.config import build_config
    from engine.data import prepare_data
    from engine.models import load_tokenizer
    from engine.strategies import get_strategy
    from engine.training.session import use_fast_training_paths

    settings = {**FINETUI_SETTINGS, **FINETUI_SPEED, "data.train": str(train), "data.validation": str(train)}
    settings.update({"model.id": MODEL, "strategy.kind": strategy})
    config = build_config({}, [f"{key}={_toml(value)}" for key, value in settings.items()])
    tokenizer = load_tokenizer(config.model)
    prepared = prepare_data(config.data, task="causal", tokenizer=tokenizer, seed=config.train.seed, cache=True)
    rows = sorted((prepared.train[i] for i in range(EXAMPLES_PER_STEP)), key=lambda row: -len(row["input_ids"]))
    groups = [rows[i : i + 4] for i in range(0, EXAMPLES_PER_STEP, 4)]
    strategy_impl = get_strategy(config.strategy, "causal")
    device, precision = ("cuda", "bf16") if cuda else ("cpu", "fp32")
    model = strategy_impl.load_model(
        config.model, num_labels=None, label_names=None, device=device, precision=precision
    )
    model = strategy_impl.prepare(model)
    use_fast_training_paths(model, config, device)
    return model, [lambda g=g: prepared.collator(list(g)) for g in groups]


def _toml(value: Any) -> str:
    """A `--set` value as TOML: strings quoted, booleans lower-case."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else str(value)


def run_profile(side: str, strategy: str, train: Path, env: dict[str, str], work: Path) -> dict[str, Any]:
    command = [sys.executable, "bench/causal.py", "--profile-child", side, strategy, str(train)]
    child = run_child(command, env, work, f"profile-{side}-{strategy}")
    if child.returncode != 0:
        raise SystemExit(f"profile {side} {strategy} failed: see {child.stderr_file}")
    return json.loads(child.stdout.strip().splitlines()[-1])


# --- report ---------------------------------------------------------------------------------------------------------


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def speed_rows(results: list[Measured], strategy: str) -> list[str]:
    rows = []
    for side in ("recipe", "finetui", GROUPED):
        runs = [m for m in results if m.side == side and m.strategy == strategy]
        if not runs:
            continue
        gpu = ""
        if any(m.gpu_peak_mb for m in runs):
            estimate = median([m.gpu_estimate_mb or 0.0 for m in runs])
            gpu = f" | {median([m.gpu_peak_mb or 0.0 for m in runs]):.0f} / {estimate:.0f}"
        padding = median([m.padding_share for m in runs if m.padding_share is not None])
        rows.append(
            f"| {strategy} | {side} | **{median([m.tokens_per_second for m in runs]):.1f}** "
            f"({', '.join(f'{m.tokens_per_second:.1f}' for m in runs)}) "
            f"| {median([m.samples_per_second for m in runs]):.3f} "
            f"| {median([m.first_step_s for m in runs]):.1f} | {median([m.peak_rss_mb for m in runs]):.0f} "
            f"| {', '.join(f'{m.validation_loss:.4f}' for m in runs)} "
            f"| {'-' if padding != padding else f'{100 * padding:.0f} %'}{gpu} |"
        )
    return rows


def paired_ratios(results: list[Measured], numerator: tuple[str, str], denominator: tuple[str, str]) -> list[float]:
    """Per-seed ratios of tokens/s between two (side, strategy) pairs measured in the same round."""
    ratios = []
    for seed in sorted({m.seed for m in results}):
        top = [m for m in results if (m.side, m.strategy) == numerator and m.seed == seed]
        bottom = [m for m in results if (m.side, m.strategy) == denominator and m.seed == seed]
        if top and bottom:
            ratios.append(top[0].tokens_per_second / bottom[0].tokens_per_second)
    return ratios


def profile_rows(profiles: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    rows = []
    for (side, strategy), result in profiles.items():
        phases = result["phases"]
        step = sum(phases.values())
        split = " | ".join(f"{1000 * phases[name]:.0f} ({100 * phases[name] / step:.0f} %)" for name in phases)
        top = ", ".join(f"{name} {100 * share:.0f} %" for name, share in result["top"][:6])
        rows.append(
            f"| {strategy} | {side} | {result['real_tokens']} / {result['computed_tokens']} | {step:.2f} | {split} "
            f"| {top} |"
        )
    return rows


def report(args: argparse.Namespace, facts: dict[str, Any]) -> str:
    results: list[Measured] = facts["results"]
    ratios = {
        "lora": paired_ratios(results, ("finetui", "lora"), ("recipe", "lora")),
        "qlora": paired_ratios(results, ("finetui", "qlora"), ("recipe", "qlora")),
        "qlora/lora": paired_ratios(results, ("finetui", "qlora"), ("finetui", "lora")),
    }
    gaps = {f"{strategy} against the recipe": loss_gap(results, strategy) for strategy in STRATEGIES}
    gaps["lora against the recipe in finetui's length-grouped order"] = loss_gap(results, "lora", GROUPED)
    lines = [
        *header_lines(args, facts),
        *speed_lines(results, ratios, gaps, cuda=facts["cuda"]),
        *start_up_lines(facts["start_up"]),
        *profile_lines(facts["profiles"]),
        *target_lines(ratios, gaps, facts["start_up"]),
    ]
    return "\n".join(lines) + "\n"


def header_lines(args: argparse.Namespace, facts: dict[str, Any]) -> list[str]:
    settings = " ".join(f"`{key}={_toml(value)}`" for key, value in {**FINETUI_SETTINGS, **FINETUI_SPEED}.items())
    return [
        f"# Causal fine-tuning: finetui against the seed's recipe{' (quick check)' if args.quick else ''}",
        "",
        f"- Machine: {facts['machine']}",
        f"- Load before: `{facts['uptime_before']}`",
        f"- Load after: `{facts['uptime_after']}`; bench total {facts['total_s']:.0f} s",
        f"- Command: `python bench/causal.py {' '.join(sys.argv[1:])}`",
        f"- Model `{MODEL}` (134.5 M parameters, 30 layers); data: a seeded subset of `alpaca_5000` "
        f"({facts['n_train']} train / {facts['n_validation']} validation rows, Alpaca prompt + response as one "
        f"`text`), one epoch = {facts['steps']} optimizer steps of 4 x 4 examples; LoRA r=64, alpha 16, dropout 0.1 "
        "on q_proj/v_proj; lr 2e-4, linear schedule; QLoRA: NF4 base without double quantisation, compute in "
        f"{'bf16' if facts['cuda'] else 'fp32'}. Rounds: {facts['rounds']} (seeds {facts['seeds']}), each round "
        "recipe LoRA, finetui LoRA, the recipe's LoRA in finetui's length-grouped order (the control), recipe QLoRA, "
        "finetui QLoRA, each in its own process, one after the other.",
        "- Recipe: `bench/causal_recipe.py` (HF Trainer, `DataCollatorForLanguageModeling`, pad to the batch's "
        f"longest, random order, loss on every token). finetui: `python -m engine.cli run --model {MODEL} "
        f"--strategy lora|qlora` with {settings} (and its own length-grouped batches).",
        "- Real tokens/s and samples/s: over the training steps (from the training start to the end of the last "
        "optimizer step); real = non-padding tokens. First step: process launch to the start of the first training "
        "step. Validation loss: mean token cross-entropy of the same validation token ids (text + eos, every token) "
        "after the epoch, per seed. Padding: the share of the recipe's computed tokens that were padding (finetui "
        "packs: none).",
        "",
    ]


def loss_gap(results: list[Measured], strategy: str, against: str = "recipe") -> tuple[list[float], float | None]:
    """finetui's validation loss minus `against`'s, per seed, and the recipe's own spread over the seeds."""
    by_seed = {(m.side, m.seed): m.validation_loss for m in results if m.strategy == strategy}
    seeds = sorted({seed for _, seed in by_seed})
    diffs = [
        by_seed[("finetui", s)] - by_seed[(against, s)] for s in seeds if {("finetui", s), (against, s)} <= set(by_seed)
    ]
    recipe = [by_seed[("recipe", s)] for s in seeds if ("recipe", s) in by_seed]
    return diffs, (max(recipe) - min(recipe) if len(recipe) > 1 else None)


def speed_lines(
    results: list[Measured],
    ratios: dict[str, list[float]],
    gaps: dict[str, tuple[list[float], float | None]],
    *,
    cuda: bool,
) -> list[str]:
    lines = [
        "## Speed",
        "",
        "| strategy | side | real tokens/s, median (per round) | samples/s | first step s | peak RSS MB "
        "| validation loss per seed | padding |" + (" GPU peak / estimate MiB |" if cuda else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if cuda else ""),
    ]
    for strategy in STRATEGIES:
        lines += speed_rows(results, strategy)
    listed = {name: ", ".join(f"{r:.2f}" for r in values) for name, values in ratios.items()}
    lines += [
        "",
        f"- finetui / recipe, LoRA real tokens/s per round: {listed['lora']} "
        f"(median **{median(ratios['lora']):.2f}x**)",
        f"- finetui / recipe, QLoRA: {listed['qlora']} (median {median(ratios['qlora']):.2f}x)",
        f"- finetui QLoRA / finetui LoRA: {listed['qlora/lora']} (median **{median(ratios['qlora/lora']):.2f}x**)",
    ]
    for compared, (diffs, spread) in gaps.items():
        noise = f"; the recipe's own spread over seeds: {spread:.4f}" if spread is not None else ""
        per_seed = ", ".join(f"{d:+.4f}" for d in diffs)
        lines.append(f"- Validation loss, finetui {compared}, per seed: {per_seed}{noise}")
    return [*lines, ""]


def start_up_lines(start_ups: list[StartUp]) -> list[str]:
    lines = [
        "## Start-up: launch to the first training step",
        "",
        "| strategy | run | total s | launch, imports, config | tokenizer + data | model + adapters + freeze map "
        "| trainer set-up | model-load floor s (launch -> loaded; the load alone) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for item in start_ups:
        for which, phases in item.runs.items():
            cells = " | ".join(f"{phases[name]:.1f}" for name in list(phases)[1:])
            lines.append(
                f"| {item.strategy} | {which} | **{phases['total']:.1f}** | {cells} "
                f"| {item.floor_s:.1f} ({item.load_s:.1f}) |"
            )
    return [
        *lines,
        "",
        "The first run converts the GGUF into an empty cache and tokenises; the second finds both in the cache. The "
        "floor is a process that imports torch, transformers and peft and loads the model the way finetui does (for "
        "QLoRA: quantising it to NF4), and nothing else.",
        "",
    ]


def profile_lines(profiles: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    return [
        "## Where one optimizer step goes (4 micro-batches of 4, the same 16 examples on both sides)",
        "",
        "| strategy | side | real / computed tokens | step s | data ms | forward ms | backward ms | optimizer ms "
        "| top operators (self CPU time of one profiled micro-batch) |",
        "|---|---|---|---|---|---|---|---|---|",
        *profile_rows(profiles),
        "",
    ]


def target_lines(
    ratios: dict[str, list[float]], gaps: dict[str, tuple[list[float], float | None]], start_ups: list[StartUp]
) -> list[str]:
    plain_diffs, spread = gaps["lora against the recipe"]
    diffs, _ = gaps["lora against the recipe in finetui's length-grouped order"]
    targets: list[tuple[str, str, bool | None]] = [
        (
            "finetui LoRA >= 1.5x the recipe's real tokens/s",
            f"{median(ratios['lora']):.2f}x",
            median(ratios["lora"]) >= 1.5,
        ),
        (
            "... at equal validation loss: the median difference from the recipe trained in the same "
            "(length-grouped) order within the recipe's own spread over seeds",
            f"{median(diffs):+.4f} (spread {'-' if spread is None else f'{spread:.4f}'})" if diffs else "-",
            bool(diffs) and spread is not None and abs(median(diffs)) <= spread,
        ),
        (
            "(for reference) the difference from the recipe in its random order: the order's own effect on a short run",
            f"{median(plain_diffs):+.4f}",
            None,
        ),
        (
            "finetui QLoRA >= 0.8x finetui LoRA",
            f"{median(ratios['qlora/lora']):.2f}x",
            median(ratios["qlora/lora"]) >= 0.8,
        ),
    ]
    for item in start_ups:
        second = item.runs["second"]["total"]
        targets.append(
            (
                f"{item.strategy}: a second run's first step within 2x the model-load floor",
                f"{second:.1f} s / {item.floor_s:.1f} s = {second / item.floor_s:.2f}x",
                second <= 2 * item.floor_s,
            )
        )
    return [
        "## Targets (issue 17)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        *(f"| {name} | {value} | {'-' if met is None else 'yes' if met else 'NO'} |" for name, value, met in targets),
    ]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--load-child":
        return load_child(sys.argv[2])
    if len(sys.argv) > 1 and sys.argv[1] == "--profile-child":
        return profile_child(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny subset and one round: checks the bench")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the four runs (default 2; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of 16 examples (default 4; quick 1)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "CAUSAL.md")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (runs, logs)")
    args = parser.parse_args()
    import torch

    rounds = args.rounds or (1 if args.quick else 2)
    steps = args.steps or (1 if args.quick else 4)
    n_train, n_validation = steps * EXAMPLES_PER_STEP, 16 if args.quick else 32
    work = Path(tempfile.mkdtemp(prefix="finetui-causal-"))
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "FINETUI_CACHE": str(work / "cache"),
        "PYTHONPATH": str(ROOT),
    }
    os.environ["FINETUI_CACHE"] = env["FINETUI_CACHE"]  # the recipe's model folder is resolved here too
    facts: dict[str, Any] = {"uptime_before": uptime(), "machine": machine(), "cuda": torch.cuda.is_available()}
    started = time.time()
    print(f"causal bench: work folder {work}; {facts['uptime_before']}", flush=True)
    train, validation = write_subsets(work, n_train, n_validation)
    facts["start_up"] = [start_up(strategy, train, validation, env, work) for strategy in STRATEGIES]
    print("start-up measured", flush=True)
    shutil.copytree(work / "cold-cache-lora", work / "cache")  # converted model and tokens: the rounds start warm
    facts["profiles"] = {
        (side, strategy): run_profile(side, strategy, train, env, work)
        for strategy in STRATEGIES
        for side in ("recipe", "finetui")
    }
    print("profiles measured", flush=True)
    seeds = [42 + index for index in range(rounds)]
    results: list[Measured] = []
    facts.update(results=results, rounds=rounds, seeds=seeds, steps=steps, n_train=n_train, n_validation=n_validation)
    for seed in seeds:
        for strategy in STRATEGIES:
            runs = [run_recipe, run_finetui] + ([partial(run_recipe, grouped=True)] if strategy == "lora" else [])
            for run in runs:
                measured = run(strategy, train, validation, steps, seed, env, work)
                results.append(measured)
                print(
                    f"seed {seed} {strategy} {measured.side}: {measured.tokens_per_second:.1f} tokens/s, "
                    f"validation loss {measured.validation_loss:.4f}; {uptime()}",
                    flush=True,
                )
                # after every run: a bench cut short still leaves its figures so far
                facts.update(uptime_after=uptime(), total_s=time.time() - started)
                args.out.write_text(report(args, facts), encoding="utf-8")
    print(args.out.read_text(encoding="utf-8"))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
