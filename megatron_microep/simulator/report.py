"""The simulator's report: summary.csv, report.md and PNG plots from the engine's results."""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_microep.planning.policies import Layout
from megatron_microep.simulator.cost import CostModel
from megatron_microep.simulator.engine import PolicyResult
from megatron_microep.simulator.traces import TraceInfo, layer_label

SUMMARY_COLUMNS = (
    "policy",
    "max_over_mean_mean",
    "max_over_mean_p99",
    "max_over_mean_max",
    "remote_tokens",
    "remote_share",
    "inter_node_tokens",
    "weight_bytes",
    "modeled_step_time",
    "share_of_ideal",
    "planner_s_per_replan",
    "decision_us_mean",
    "replans",
)
TIME_PARTS = ("compute", "a2a", "weight_moves", "fsep", "decision", "replica_sync", "home_moves", "planner")


@dataclass(frozen=True)
class Summary:
    policy: str
    max_over_mean_mean: float
    max_over_mean_p99: float
    max_over_mean_max: float
    remote_tokens: int
    remote_share: float
    inter_node_tokens: int
    weight_bytes: float
    modeled_step_time: float  # seconds, mean over measured steps
    share_of_ideal: float
    planner_s_per_replan: float
    decision_us_mean: float
    replans: int
    parts_per_step: dict  # seconds per step by cost component


def summarize(results: list[PolicyResult], ideal: str = "ideal") -> list[Summary]:
    """One Summary per policy; ``share_of_ideal`` = ideal's total modeled time / the policy's, over the
    same measured steps."""
    by_name = {r.name: r for r in results}
    if ideal not in by_name:
        raise ValueError(f"the {ideal!r} policy must be replayed to compute share_of_ideal")
    ideal_total = sum(by_name[ideal].step_times().values())
    out = []
    for r in results:
        times = r.step_times()
        steps = max(len(times), 1)
        total = sum(times.values())
        ratios = np.asarray(r.ratios)
        parts = {k: v / steps for k, v in r.parts.items()}
        parts["planner"] = sum(r.exposed_planner(s) for s in times) / steps
        out.append(
            Summary(
                policy=r.name,
                max_over_mean_mean=float(ratios.mean()),
                max_over_mean_p99=float(np.percentile(ratios, 99)),
                max_over_mean_max=float(ratios.max()),
                remote_tokens=r.remote_tokens,
                remote_share=r.remote_tokens / r.total_tokens if r.total_tokens else 0.0,
                inter_node_tokens=r.inter_node_tokens,
                weight_bytes=r.weight_bytes,
                modeled_step_time=total / steps,
                share_of_ideal=ideal_total / total if total > 0 else 1.0,
                planner_s_per_replan=r.planner_total_seconds / r.replans if r.replans else 0.0,
                decision_us_mean=1e6 * r.decision_seconds / r.decisions if r.decisions else 0.0,
                replans=r.replans,
                parts_per_step=parts,
            )
        )
    return out


def write_csv(path: Path, rows: list[Summary]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(SUMMARY_COLUMNS)
        for row in rows:
            writer.writerow([_csv_value(getattr(row, c)) for c in SUMMARY_COLUMNS])


def _csv_value(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n:.3g} TB"


def markdown_table(rows: list[Summary]) -> str:
    head = (
        "| policy | max/mean mean | max/mean p99 | remote tokens (share) | inter-node tokens | weight bytes "
        "| modeled step (ms) | share of ideal |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r.policy} | {r.max_over_mean_mean:.3f} | {r.max_over_mean_p99:.3f} | "
            f"{r.remote_tokens:,} ({r.remote_share:.1%}) | {r.inter_node_tokens:,} | "
            f"{_fmt_bytes(r.weight_bytes)} | {1e3 * r.modeled_step_time:.2f} | {r.share_of_ideal:.1%} |"
        )
    return "\n".join(lines)


def parts_table(rows: list[Summary]) -> str:
    lines = [
        "| policy | " + " | ".join(TIME_PARTS) + " | planner s/re-plan | decision us/call |",
        "|---|" + "---:|" * (len(TIME_PARTS) + 2),
    ]
    for r in rows:
        cells = " | ".join(f"{1e3 * r.parts_per_step.get(p, 0.0):.2f}" for p in TIME_PARTS)
        lines.append(f"| {r.policy} | {cells} | {r.planner_s_per_replan:.3f} | {r.decision_us_mean:.0f} |")
    return "\n".join(lines)


def explain_wins(rows: list[Summary], focus: str = "microep", ideal: str = "ideal") -> list[str]:
    """Sentences naming every metric where a policy other than ``focus`` does better, with the cost
    components that account for the difference."""
    by = {r.policy: r for r in rows}
    if focus not in by:
        return []
    me = by[focus]
    others = [r for r in rows if r.policy not in (focus, ideal)]
    notes = []
    if not others:
        return notes
    best_balance = min(others, key=lambda r: r.max_over_mean_mean)
    if best_balance.max_over_mean_mean < me.max_over_mean_mean - 1e-9:
        notes.append(
            f"{best_balance.policy} has a lower mean max/mean than {focus} "
            f"({best_balance.max_over_mean_mean:.3f} vs {me.max_over_mean_mean:.3f}): it decides copies from "
            f"each micro-batch's own counts, while {focus}'s replicas come from history (stale under drift)."
        )
    best_share = max(others, key=lambda r: r.share_of_ideal)
    if best_share.share_of_ideal > me.share_of_ideal + 1e-9:
        diffs = sorted(
            ((me.parts_per_step.get(p, 0.0) - best_share.parts_per_step.get(p, 0.0), p) for p in TIME_PARTS),
            reverse=True,
        )
        worse = [f"{p} {1e3 * d:+.2f} ms" for d, p in diffs if d > 1e-6][:3]
        notes.append(
            f"{best_share.policy} has a higher share of ideal than {focus} ({best_share.share_of_ideal:.1%} vs "
            f"{me.share_of_ideal:.1%}); per step, {focus} spends more on " + ", ".join(worse) + "."
        )
    return notes


def write_markdown(
    path: Path,
    rows: list[Summary],
    info: TraceInfo,
    layout: Layout,
    cost: CostModel,
    warmup_steps: int,
    measured_records: int,
    records: int,
    plots: list[str],
    policy_params: dict[str, dict],
) -> None:
    cost_fields = {f.name: getattr(cost, f.name) for f in dataclasses.fields(cost) if f.name != "gemm_table"}
    lines = [
        "# Trace simulation report",
        "",
        f"Trace: {info.description}. {layout.num_gpus} GPUs x {layout.num_experts} experts, "
        f"{layout.redundant_slots} redundant slots per GPU, {layout.node_size} GPUs per node. "
        f"{records} records replayed, {measured_records} measured (the first {warmup_steps} step(s) of each layer are "
        "warm-up: no policy has history yet).",
        "",
    ]
    if not info.per_source_known:
        lines += [
            "**Per-source counts are not in this trace** (Megatron's tokens-per-expert files record only what "
            "each rank received); each expert's tokens were spread evenly over the sources, so remote-token "
            "and all-to-all figures are estimates. Load balance figures are exact.",
            "",
        ]
    lines += [
        "## Policies",
        "",
        markdown_table(rows),
        "",
        "max/mean: the busiest GPU's tokens over the mean, per (micro-batch, layer). share of ideal: the "
        "force-balanced ideal's modeled time over the policy's (higher is better).",
        "",
    ]
    notes = explain_wins(rows)
    if notes:
        lines += ["## Where another policy wins", ""] + [f"- {n}" for n in notes] + [""]
    lines += (
        [
            "## Modeled time per step by component (ms)",
            "",
            parts_table(rows),
            "",
            "planner: re-planning time not hidden by the step it runs during; decision: per-micro-batch decisions "
            "on the critical path (measured CPU time of this implementation on this machine).",
            "",
            "## Plots",
            "",
        ]
        + [f"![{p}]({p})" for p in plots]
        + [
            "",
            "## Settings",
            "",
            "Cost model: "
            + ", ".join(f"{k}={v}" for k, v in cost_fields.items())
            + f"; GEMM efficiency table: {cost.gemm_table.source}.",
            "",
        ]
    )
    for name, params in policy_params.items():
        if params:
            lines.append(
                f"- {name}: "
                + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
            )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- plots -------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


POLICY_COLORS = {
    "static": "#7f7f7f",
    "eplb": "#1f77b4",
    "laer": "#9467bd",
    "llep": "#8c564b",
    "balancemoe": "#e377c2",
    "ultraep": "#ff7f0e",
    "microep": "#2ca02c",
    "ideal": "#000000",
}


def plot_heatmaps(results: list[PolicyResult], out_dir: Path, max_layers: int = 8) -> list[str]:
    """One PNG per layer: per-GPU load / mean over time, static ("before") and every policy side by side."""
    plt = _plt()
    from matplotlib.colors import TwoSlopeNorm

    files = []
    layers = sorted(results[0].heatmaps)[:max_layers]
    for layer in layers:
        maps = [(r.name, r.heatmaps[layer].array()) for r in results if layer in r.heatmaps]
        top = max(float(m.max()) for _, m in maps)
        # Colours saturate at 2x the mean so that the few percent that separate good policies stay visible.
        norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=min(max(top, 1.05), 2.0))
        fig, axes = plt.subplots(1, len(maps), figsize=(2.2 * len(maps) + 1.2, 4.2), sharey=True, squeeze=False)
        for ax, (name, m) in zip(axes[0], maps):
            im = ax.imshow(m, aspect="auto", interpolation="nearest", cmap="RdBu_r", norm=norm)
            ax.set_title(
                f"{name}\nmax {m.max():.2f}" if name != "static" else f"static (before)\nmax {m.max():.2f}", fontsize=9
            )
            ax.set_xlabel("GPU")
        axes[0][0].set_ylabel("time (micro-batches, binned)")
        fig.colorbar(im, ax=axes[0].tolist(), label="GPU load / mean (saturates at 2)", shrink=0.9, extend="max")
        fig.suptitle(
            f"Per-GPU load over time, layer {layer_label(layer)} (white = mean, red = over)", fontsize=11, y=1.04
        )
        name = f"heatmap_layer{layer_label(layer)}.png"
        fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        files.append(name)
    return files


def plot_ratio_over_time(results: list[PolicyResult], out_dir: Path) -> str:
    """max/mean per micro-batch (mean over layers) for every policy, in trace order."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in results:
        by_time: dict[tuple[int, int], list[float]] = {}
        for series in r.series.values():
            for step, mb, ratio in series:
                by_time.setdefault((step, mb), []).append(ratio)
        keys = sorted(by_time)
        ys = [np.mean(by_time[k]) for k in keys]
        ax.plot(
            range(len(keys)),
            ys,
            label=r.name,
            color=POLICY_COLORS.get(r.name),
            lw=1.4,
            ls={"ideal": "--", "static": ":"}.get(r.name, "-"),
        )
    ax.set_xlabel("micro-batch (measured, in step order)")
    ax.set_ylabel("max / mean GPU load (mean over layers)")
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ticks = []
    for t in (1.0, 1.02, 1.05, 1.1, 1.2, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 100, 200):
        if low <= t <= high and (not ticks or np.log(t / ticks[-1]) > 0.035 * np.log(high / low) * 2):
            ticks.append(t)
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Load imbalance over time")
    name = "max_over_mean_over_time.png"
    fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def plot_traffic(rows: list[Summary], out_dir: Path) -> str:
    """Remote tokens (intra / inter node) and weight bytes per policy."""
    plt = _plt()
    names = [r.policy for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.arange(len(rows))
    inter = np.array([r.inter_node_tokens for r in rows], dtype=float)
    intra = np.array([r.remote_tokens for r in rows], dtype=float) - inter
    ax1.bar(x, intra / 1e6, label="intra-node", color="#4c9be8")
    ax1.bar(x, inter / 1e6, bottom=intra / 1e6, label="inter-node", color="#d9534f")
    ax1.set_xticks(x, names, rotation=30, ha="right")
    ax1.set_ylabel("tokens sent to another GPU (millions)")
    ax1.set_title("All-to-all traffic (one dispatch, whole trace)")
    ax1.legend(fontsize=8, loc="upper right", ncol=2)
    for xi, r in zip(x, rows):
        share = r.inter_node_tokens / r.remote_tokens if r.remote_tokens else 0.0
        ax1.text(xi, r.remote_tokens / 1e6, f"{share:.0%}\ninter", ha="center", va="bottom", fontsize=7)
    ax1.set_ylim(0, 1.35 * max(r.remote_tokens for r in rows) / 1e6 + 1e-9)
    gigabytes = np.array([r.weight_bytes / 1e9 for r in rows])
    positive = gigabytes[gigabytes > 0]
    floor = positive.min() / 10 if len(positive) else 1.0
    ax2.bar(
        x[gigabytes > 0],
        gigabytes[gigabytes > 0],
        color=[POLICY_COLORS.get(n, "#333") for n, gb in zip(names, gigabytes) if gb > 0],
    )
    for xi, gb in zip(x, gigabytes):
        ax2.text(xi, max(gb, floor), f"{gb:.3g}" if gb else "none", ha="center", va="bottom", fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylim(floor, max(gigabytes.max(), floor) * 3)
    ax2.set_xticks(x, names, rotation=30, ha="right")
    ax2.set_ylabel("GB (log scale)")
    ax2.set_title("Expert weight + gradient bytes moved, whole trace")
    fig.tight_layout()
    name = "traffic.png"
    fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def plot_step_time(rows: list[Summary], out_dir: Path) -> str:
    """Stacked modeled step time by component per policy, with the ideal's as a line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    x = np.arange(len(rows))
    bottom = np.zeros(len(rows))
    colors = ["#2ca02c", "#1f77b4", "#8c564b", "#9467bd", "#ff7f0e", "#17becf", "#bcbd22", "#d62728"]
    for part, color in zip(TIME_PARTS, colors):
        values = np.array([1e3 * r.parts_per_step.get(part, 0.0) for r in rows])
        if values.any():
            ax.bar(x, values, bottom=bottom, label=part, color=color)
            bottom += values
    ideal = next((r for r in rows if r.policy == "ideal"), None)
    if ideal is not None:
        ax.axhline(1e3 * ideal.modeled_step_time, color="k", ls="--", lw=1, label="ideal")
    for xi, r in zip(x, rows):
        ax.text(xi, bottom[xi], f"{r.share_of_ideal:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, 1.08 * bottom.max())
    ax.set_xticks(x, [r.policy for r in rows], rotation=30, ha="right")
    ax.set_ylabel("modeled MoE time per step (ms)")
    ax.set_title("Modeled step time by component (label: share of ideal)")
    ax.legend(fontsize=8, ncol=2)
    name = "step_time.png"
    fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def write_report(
    out_dir: Path,
    results: list[PolicyResult],
    info: TraceInfo,
    layout: Layout,
    cost: CostModel,
    warmup_steps: int,
    measured_records: int,
    records: int,
    policy_params: dict[str, dict],
    plots: bool = True,
) -> list[Summary]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(results)
    write_csv(out_dir / "summary.csv", rows)
    files = []
    if plots:
        files = [plot_step_time(rows, out_dir), plot_ratio_over_time(results, out_dir), plot_traffic(rows, out_dir)]
        files += plot_heatmaps(results, out_dir)
    write_markdown(
        out_dir / "report.md", rows, info, layout, cost, warmup_steps, measured_records, records, files, policy_params
    )
    return rows
