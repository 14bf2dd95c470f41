"""Two runs side by side: what differs in their config, environment and data, and how their results differ.

"Same seed, different results" and "the other tool gives better quality on the same data" are questions about
two run folders. `diff_runs` answers them from what each run wrote (config.toml, environment.json, summary.json,
events.jsonl), so runs by any version, on any machine, compare; nothing heavy is imported. `finetui diff`
prints it and the TUI's runs screen shows it for two marked runs. Every section has the form
{dotted key: [a, b]}; config, environment and data list only what differs, metrics list every final metric.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.events import RunStarted, Step
from engine.runs import ENVIRONMENT_FILE, load_run_config, read_events, read_summary

NOT_COMPARED = ("written_at", "argv", "data")  # differ between any two runs, or compared on their own (data)
METRIC_SPLITS = ("validation", "test")


def read_environment(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / ENVIRONMENT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {dotted key: value}; lists stay whole values (`gpus` compares as one)."""
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        flat.update(flatten(value, name) if isinstance(value, dict) else {name: value})
    return flat


def differences(a: dict[str, Any], b: dict[str, Any], *, skip: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    """{dotted key: [a, b]} for every key whose values differ (a missing key is None), in key order."""
    flat_a, flat_b = flatten(a), flatten(b)
    return {
        key: [flat_a.get(key), flat_b.get(key)]
        for key in sorted(set(flat_a) | set(flat_b))
        if flat_a.get(key) != flat_b.get(key) and not any(key == s or key.startswith(f"{s}.") for s in skip)
    }


def comparable_differences(recorded: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """Environment differences that matter: versions, hardware, seeds (not timestamps, command lines or data)."""
    return differences(recorded, current, skip=NOT_COMPARED)


def data_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[Any]]:
    """{role: [sha256 a, sha256 b]} for the data files whose contents differ (a hub dataset by its id)."""
    found = {}
    for role in sorted(set(a) | set(b)):
        digest_a = (a.get(role) or {}).get("sha256") or (a.get(role) or {}).get("source")
        digest_b = (b.get(role) or {}).get("sha256") or (b.get(role) or {}).get("source")
        if digest_a != digest_b:
            found[role] = [digest_a, digest_b]
    return found


def final_metrics(summary: dict[str, Any] | None) -> dict[str, float]:
    return {
        f"{split}.{name}": value
        for split in METRIC_SPLITS
        for name, value in ((summary or {}).get(split) or {}).items()
    }


def loss_curve(run_dir: Path) -> dict[int, float]:
    """Train loss by step; a resumed session's steps replace those logged after its checkpoint."""
    curve: dict[int, float] = {}
    for event in read_events(run_dir):
        if isinstance(event, RunStarted) and event.resumed_from_step is not None:
            curve = {step: loss for step, loss in curve.items() if step <= event.resumed_from_step}
        elif isinstance(event, Step):
            curve[event.step] = event.loss
    return curve


def loss_gap(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """The train losses at the steps both runs logged: how many, and the largest gap (where, and both values)."""
    common = sorted(set(a) & set(b))
    if not common:
        return {"common_steps": 0, "largest_gap": None, "step": None, "a": None, "b": None}
    step = max(common, key=lambda s: abs(a[s] - b[s]))
    gap = abs(a[step] - b[step])
    return {"common_steps": len(common), "largest_gap": gap, "step": step, "a": a[step], "b": b[step]}


@dataclass(frozen=True)
class RunDiff:
    runs: list[str]
    config: dict[str, list[Any]]
    environment: dict[str, list[Any]]
    data: dict[str, list[Any]]
    metrics: dict[str, list[Any]]
    loss: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def diff_runs(a: Path, b: Path) -> RunDiff:
    """What differs between two run folders. Raises ConfigError when one is not a run."""
    config_a, config_b = load_run_config(a).model_dump(mode="json"), load_run_config(b).model_dump(mode="json")
    environment_a, environment_b = read_environment(a) or {}, read_environment(b) or {}
    metrics_a, metrics_b = final_metrics(read_summary(a)), final_metrics(read_summary(b))
    return RunDiff(
        runs=[str(a), str(b)],
        config=differences(config_a, config_b),
        environment=comparable_differences(environment_a, environment_b),
        data=data_differences(environment_a.get("data") or {}, environment_b.get("data") or {}),
        metrics={key: [metrics_a.get(key), metrics_b.get(key)] for key in sorted(set(metrics_a) | set(metrics_b))},
        loss=loss_gap(loss_curve(a), loss_curve(b)),
    )


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return value[:12]
    return json.dumps(value, default=str) if not isinstance(value, str) else value


def diff_lines(diff: RunDiff) -> list[str]:
    """The diff as text lines (`finetui diff`, the TUI's diff screen)."""
    lines = [f"A {diff.runs[0]}", f"B {diff.runs[1]}"]
    for title, section in (("config", diff.config), ("environment", diff.environment), ("data", diff.data)):
        lines.append("")
        lines.append(f"{title}: " + (f"{len(section)} differ" if section else "the same"))
        lines.extend(f"  {key}: {_shown(a)} -> {_shown(b)}" for key, (a, b) in section.items())
    lines.append("")
    lines.append("metrics:" if diff.metrics else "metrics: none recorded")
    for key, (a, b) in diff.metrics.items():
        delta = f" ({b - a:+.4g})" if isinstance(a, int | float) and isinstance(b, int | float) else ""
        lines.append(f"  {key}: {_shown(a)} -> {_shown(b)}{delta}")
    loss = diff.loss
    lines.append("")
    if loss["common_steps"]:
        lines.append(
            f"train loss at {loss['common_steps']} common steps: largest gap {loss['largest_gap']:.4g} at step "
            f"{loss['step']} ({loss['a']:.4g} -> {loss['b']:.4g})"
        )
    else:
        lines.append("train loss: no step logged by both runs")
    return lines
