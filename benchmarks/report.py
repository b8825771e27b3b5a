"""Markdown tables from the results of ``python -m benchmarks`` (printed at the end of a run)."""

from __future__ import annotations

from typing import Any

from benchmarks.common import fmt_bytes, fmt_time, table


def _f(x, spec=".2f", none="—"):
    return none if x is None else format(x, spec)


def render(results: dict[str, Any]) -> str:
    m = results["machine"]
    parts = [
        f"command: `{results['command']}`  ",
        f"date {m['date']}; device {m.get('gpu', m['device'])}; CPU {m.get('cpu')} ({m['cpu_count']} cores, "
        f"torch threads {m['cpu_threads']}); torch {m['torch']}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}",
        "peers: " + ", ".join(f"{k} {v}" for k, v in m["peers"].items()),
    ]
    if "eigen" in results:
        parts.append(render_eigen(results["eigen"]))
    if "hvp" in results:
        parts.append(render_hvp(results["hvp"]))
    if "per_example" in results:
        parts.append(render_per_example(results["per_example"]))
    if "overhead" in results:
        parts.append(render_overhead(results["overhead"]))
    if "scaling" in results:
        parts.append(render_scaling(results["scaling"]))
    return "\n\n".join(parts)


def render_eigen(res) -> str:
    out = []
    for name, ref in res["references"].items():
        out.append(
            f"**{name}**: {ref['model']}, {ref['params']:,} parameters. Reference: Lanczos {ref['dtype']}, "
            f"tol {ref['tol']:g}, {ref['matvecs']} HVPs, largest relative residual "
            f"{max(ref['relative_residuals']):.1e} (error bound {ref['relative_error_bound']:.1e}); "
            f"top-5 = {', '.join(f'{v:.6g}' for v in ref['eigenvalues'])}"
        )
        rows = []
        for r in res["rows"]:
            if r["model"] != name:
                continue
            if "skipped" in r:
                rows.append([r["k"], r["tool"], "skipped: " + r["skipped"][:80], "", "", "", ""])
                continue
            note = ""
            if r.get("order_kept") is False:
                note = "out of order"
            if r.get("converged_by_own_test") is False:
                note = "unconverged (own test)"
            rows.append(
                [
                    r["k"],
                    r["tool"],
                    fmt_time(r["seconds"]),
                    f"{r['rel_error']:.1e}",
                    r.get("matvecs", "—"),
                    _f(r.get("time_vs_pyhessian")),
                    _f(r.get("accuracy_gain_vs_pyhessian"), ".3g") + (f" {note}" if note else ""),
                ]
            )
        out.append(
            table(
                [
                    "k",
                    "tool",
                    "time (median)",
                    "max rel. error",
                    "HVPs",
                    "time / PyHessian",
                    "PyHessian error / error",
                ],
                rows,
            )
        )
    return "### 1. Top-k Hessian eigenvalues\n\n" + "\n\n".join(out)


def render_hvp(res) -> str:
    out = []
    for name, desc in res["models"].items():
        rows = []
        for r in res["rows"]:
            if r["model"] != name:
                continue
            if "skipped" in r:
                rows.append([r["what"], "skipped: " + r["skipped"][:80], "", ""])
                continue
            rows.append(
                [
                    r["what"],
                    fmt_time(r["seconds"]),
                    f"{r['ratio_to_gradient']:.2f}×",
                    _f(r.get("rel_diff_vs_sgdprobe"), ".1e"),
                ]
            )
        out.append(
            f"**{name}**: {desc}\n\n"
            + table(["", "time (median)", "/ gradient", "rel. diff vs sgdprobe"], rows)
        )
    return "### 2. One HVP vs one gradient\n\n" + "\n\n".join(out)


def render_per_example(res) -> str:
    out = []
    for name, desc in res["models"].items():
        rows = []
        for r in res["rows"]:
            if r["model"] != name:
                continue
            if "skipped" in r:
                rows.append([r["what"], "skipped: " + r["skipped"][:90], "", "", "", "", ""])
                continue
            rows.append(
                [
                    r["what"],
                    fmt_time(r["seconds"]),
                    fmt_time(r["seconds_per_example"]),
                    f"{r['ratio_to_batched_backward']:.2f}×",
                    fmt_bytes(r.get("peak_memory_bytes")),
                    _f(r.get("vs_backpack_l2")),
                    _f(r.get("rel_diff_gram", r.get("rel_diff_sq_norms")), ".0e"),
                ]
            )
        out.append(
            f"**{name}**: {desc}\n\n"
            + table(
                [
                    "",
                    "time",
                    "per example",
                    "/ batched backward",
                    "peak memory",
                    "time / BackPACK BatchL2Grad",
                    "rel. diff vs vmap",
                ],
                rows,
            )
        )
    return "### 3. Per-example gradient statistics\n\n" + "\n\n".join(out)


def render_overhead(res) -> str:
    out = []
    for task in res["tasks"]:
        rows = []
        for r in task["rows"]:
            if "skipped" in r:
                rows.append([r["config"], "skipped: " + r["skipped"][:80], "", "", "", ""])
                continue
            rows.append(
                [
                    r["config"],
                    fmt_time(r["seconds"]),
                    f"{100 * r['overhead']:+.1f} %",
                    "—" if r.get("probe_share") is None else f"{100 * r['probe_share']:.1f} %",
                    r.get("measurements", "—"),
                    _f(r.get("cost_per_tracked_step_in_steps"), ".1f"),
                ]
            )
        broken = ", ".join(sorted(task["plugins_not_importable"])) or "none"
        refused = "; ".join(f"{k}: {v[:120]}" for k, v in task.get("plugins_refused", {}).items()) or "none"
        out.append(
            f"**{task['task']}**: {task['description']}. Plugins: {', '.join(task['plugins'])} "
            f"(listed but not importable: {broken}; refusing this model: {refused})\n\n"
            + table(
                [
                    "configuration",
                    "run time (median)",
                    "overhead vs plain",
                    "probe time / training time (same run)",
                    "measurements",
                    "cost per tracked step (plain steps)",
                ],
                rows,
            )
        )
    return "### 4. Probe overhead on a training run\n\n" + "\n\n".join(out)


def render_scaling(res) -> str:
    rows = []
    for r in res["rows"]:
        if "skipped" in r:
            rows.append([r["size"].get("d"), "skipped: " + r["skipped"][:80], "", "", "", "", ""])
            continue
        rows.append(
            [
                r["size"]["d"],
                f"{r['params']:,}",
                fmt_time(r["gradient_seconds"]),
                f"{fmt_time(r['hvp_seconds'])} ({r['hvp_ratio']:.2f}×)",
                f"{fmt_time(r['lanczos_top1_seconds'])} ({r['lanczos_ratio']:.1f}×, {r['matvecs']} HVPs)",
                fmt_bytes(r["peak_memory_bytes"]),
            ]
        )
    text = table(
        [
            "d",
            "parameters",
            "gradient",
            "HVP (/ gradient)",
            "top-1 via measure (/ gradient)",
            "peak memory of top-1",
        ],
        rows,
    )
    fit = res.get("fit")
    if fit:
        text += (
            f"\n\nLinear fit: {fit['bytes_per_param']:.1f} bytes per parameter + "
            f"{fmt_bytes(fit['intercept_bytes'])}; device memory {fmt_bytes(fit['device_memory_bytes'])}: "
            f"top-1 sharpness extrapolated to fit up to ~{_f(fit['largest_params_extrapolated'], ',.0f')} "
            "parameters of this family (90 % of memory)."
        )
    return "### 5. Cost against model size (GPT-style, 6 layers)\n\n" + text
