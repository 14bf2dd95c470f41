"""How long `finetui data` takes on 100,000 rows, against the tokenisation a run does anyway.

Issue 13 asks for the data report within seconds for 100,000 rows, with tokenisation batched and cached, and
compared with the run's own tokenisation cache. This writes 100,000 rows (SST-2's 67,349 train sentences, cycled,
in a temporary jsonl) and times, in fresh processes taking turns (`--repeat` rounds):

- `prepare`: `engine.data.prepare_data` without the cache (what a run tokenises when nothing is cached);
- `prepare (before)`: the same at `--before` (a git commit of this repository before the report existed);
- `report cold`: `engine.data_report.build_report` with an empty tokenisation cache (it fills it);
- `report warm`: the same again with that cache (as after `finetui data` or a run with the same inputs);
- `cli warm`: the whole `finetui data --json` command with that cache, imports included.

    python bench/data_report.py [--repeat 2] [--before 0b7cde0] [--model builtin:minilm-l6]

It prints one JSON object: the median seconds of each, and the load average before and after.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
ROWS = 100_000

TIMED = """
import json, sys, time
from engine.config import build_config
from engine.models import load_tokenizer
config = build_config(json.loads(sys.argv[2]))
tokenizer = load_tokenizer(config.model)
start = time.perf_counter()
if sys.argv[1] == "prepare":
    from engine.data import prepare_data
    prepare_data(config.data, task="classification", tokenizer=tokenizer, seed=config.train.seed)
else:
    from engine.data_report import build_report
    build_report(config)
print(time.perf_counter() - start)
"""


def write_rows(folder: Path) -> Path:
    lines = [line.rsplit("\t", 1) for line in SST2.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    path = folder / "train100k.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for index in range(ROWS):
            text, label = lines[index % len(lines)]
            handle.write(json.dumps({"text": text, "label": int(label)}) + "\n")
    return path


def timed(code_root: Path, what: str, setup: dict, cache: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(code_root), "FINETUI_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", TIMED, what, json.dumps(setup)], env=env, capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip().splitlines()[-1])


def cli(setup: dict, cache: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FINETUI_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    sets = [item for key, value in setup["data"].items() for item in ("--set", f"data.{key}={json.dumps(value)}")]
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "engine.cli", "data", "--model", setup["model"]["id"], *sets, "--json"],
        env=env, capture_output=True, check=True,
    )  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--before", default="0b7cde0", help="git commit to time prepare_data at")
    parser.add_argument("--model", default="builtin:minilm-l6")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="finetui-bench-data-") as scratch:
        folder = Path(scratch)
        setup = {
            "model": {"id": args.model},
            "data": {"train": str(write_rows(folder)), "max_length": 64, "max_leak": 1.0},
        }
        before = folder / "before"
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before], capture_output=True, check=True)
        before.mkdir()
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(before, filter="data")
        times: dict[str, list[float]] = {}
        for round_ in range(args.repeat):
            cache = folder / f"cache-{round_}"
            times.setdefault("prepare (before)", []).append(timed(before, "prepare", setup, cache))
            times.setdefault("prepare", []).append(timed(ROOT, "prepare", setup, cache))
            times.setdefault("report cold", []).append(timed(ROOT, "report", setup, cache))
            times.setdefault("report warm", []).append(timed(ROOT, "report", setup, cache))
            times.setdefault("cli warm", []).append(cli(setup, cache))
    report = {
        "rows": ROWS,
        "model": args.model,
        "median_s": {name: round(statistics.median(values), 2) for name, values in times.items()},
        "all_s": {name: [round(value, 2) for value in values] for name, values in times.items()},
        "cpus": os.cpu_count(),
        "load_before": [round(value, 2) for value in load_before],
        "load_after": [round(value, 2) for value in os.getloadavg()],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
