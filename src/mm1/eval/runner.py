"""Run tasks x shots on a model: prompts -> generation or option scoring -> metric -> results.

One result per (task, shots): the score (mean over trials, each trial re-drawing every query's
demonstrations with seed `eval.seed + trial`), its std, the per-trial scores and seeds, the prompt
protocol (template, separator, stop strings), the configuration, and every item's prediction, so a
number can be audited and re-computed. Unless `eval.shuffled_control=false`, every trial is scored a
second time with each query's image(s) swapped for another test item's (`mm1.eval.shuffle`):
`score_shuffled` and `image_gain = score - score_shuffled` (both None for a task without images,
with `shuffle_note` saying why). `format_table` prints them the way papers do.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mm1.config import Config, to_dict
from mm1.data.tokenizer import IMAGE_TOKEN, Tokenizer
from mm1.eval.fewshot import build_prompts, extract_answer
from mm1.eval.generate import GenerationConfig, batch_order, generate
from mm1.eval.metrics import mean_std
from mm1.eval.parallel import Shards
from mm1.eval.scoring import continuation_logprobs, corpus_perplexity, text_logprobs
from mm1.eval.shuffle import shuffled_donors
from mm1.eval.task_metrics import SCORERS, choice_from_text
from mm1.eval.tasks import Task, check_eval_options, get_task


def _choose_by_loglik(
    model, tokenizer: Tokenizer, prompts: list, inputs: list, cfg: Config, records: list[dict], shards: Shards
) -> list[int]:
    """Every (query, option) row scored in batches of eval.batch_size (this rank's share of them,
    then gathered); the most likely option wins."""
    rows = [(i, o if cfg.eval.chat else " " + o) for i, p in enumerate(prompts) for o in p.options]
    mine = shards.split(range(len(rows)), cfg.eval.batch_size)
    local = (
        continuation_logprobs(
            model,
            tokenizer,
            [inputs[rows[r][0]] for r in mine],
            [rows[r][1] for r in mine],
            [prompts[rows[r][0]].images for r in mine],
            cfg.eval.batch_size,
            cfg.eval.add_bos,
        )
        if mine
        else []
    )
    lps = shards.gather(mine, local, len(rows))
    chosen, at = [], 0
    for p, rec in zip(prompts, records):
        scores = [lp / n if cfg.eval.mc_normalize == "length" else lp for lp, n in lps[at : at + len(p.options)]]
        at += len(p.options)
        chosen.append(max(range(len(scores)), key=lambda j: scores[j]))
        rec["option_scores"] = scores
    return chosen


def _generate(
    model,
    tokenizer: Tokenizer,
    task: Task,
    prompts: list,
    inputs: list,
    cfg: Config,
    records: list[dict],
    shards: Shards,
) -> list[str]:
    spec = task.spec
    gcfg = GenerationConfig(
        max_new_tokens=spec.max_new_tokens or cfg.eval.max_new_tokens,
        stop=list(spec.stop),
        batch_size=cfg.eval.batch_size,
        add_bos=cfg.eval.add_bos,
        resize=cfg.data.resize,
        stop_ids=[tokenizer.turn_end_id] if cfg.eval.chat else [],
    )
    mine = shards.split(batch_order(inputs), gcfg.batch_size)  # the batches one process would form
    local = (
        generate(model, tokenizer, [inputs[i] for i in mine], [prompts[i].images for i in mine], gcfg) if mine else []
    )
    raw = shards.gather(mine, local, len(inputs))
    for rec, r in zip(records, raw):
        rec["raw"] = r
    return [extract_answer(r, spec) for r in raw]


def run_trial(
    model,
    tokenizer: Tokenizer,
    task: Task,
    items: list,
    shots: int,
    seed: int,
    cfg: Config,
    image_donors: list | None = None,
    shards: Shards | None = None,
) -> tuple[float, list[dict]]:
    """One pass over `items` with demonstrations drawn from `seed`: (score, per-item records).
    With `image_donors` (the shuffled control) query i shows `image_donors[i]`'s images. With
    `shards` (torchrun) the model sees this rank's share of the batches; everything after the model
    (answer extraction, scoring) runs on the gathered outputs of all items, as in one process."""
    shards = shards or Shards()
    spec = task.spec
    if spec.metric == "perplexity":  # shots do not apply: the text is scored on its own
        texts = [ex.answers[0] for ex in items]
        mine = shards.split(range(len(texts)), cfg.eval.batch_size)
        local = text_logprobs(model, tokenizer, [texts[i] for i in mine], cfg.eval.batch_size) if mine else []
        ppl, nll = corpus_perplexity(shards.gather(mine, local, len(items)))
        return ppl, [{"id": ex.id, "nll": n} for ex, n in zip(items, nll)]
    chat = cfg.eval.chat
    prompts = build_prompts(task, items, shots, seed, chat=chat, image_donors=image_donors)
    inputs = [p.chat if chat else p.text for p in prompts]
    records = [{"id": ex.id, "demo_ids": p.demo_ids, "prompt": p.text} for ex, p in zip(items, prompts)]
    if image_donors is not None:
        for rec, d in zip(records, image_donors):
            rec["image_from"] = d.id if d is not None else None
    scorer = SCORERS.get(spec.metric)
    if scorer.choice:  # an option index per item, from log-likelihoods or from a generated letter
        if spec.mc_mode == "generate":
            texts = _generate(model, tokenizer, task, prompts, inputs, cfg, records, shards)
            chosen = [choice_from_text(ex, t) for ex, t in zip(items, texts)]
        else:
            chosen = _choose_by_loglik(model, tokenizer, prompts, inputs, cfg, records, shards)
        score, per = scorer.score(items, chosen, cfg)
        for rec, ex, c, s in zip(records, items, chosen, per):
            rec.update(prediction=ex.options[c] if c >= 0 else rec.get("raw", ""), choice=c, gold=ex.label, score=s)
        return score, records
    preds = _generate(model, tokenizer, task, prompts, inputs, cfg, records, shards)
    score, per = scorer.score(items, preds, cfg)
    for rec, pred, ex, s in zip(records, preds, items, per):
        rec.update(prediction=pred, answers=ex.answers, score=s)
    return score, records


def trial_details(task: Task, items: list, records: list[dict], cfg: Config) -> dict:
    """The metric's breakdown of one trial (POPE's precision/recall/F1, per-category accuracy ...)."""
    if task.spec.metric == "perplexity":
        return {}
    scorer = SCORERS.get(task.spec.metric)
    values = [r["choice"] if scorer.choice else r["prediction"] for r in records]
    return scorer.details(items, values, cfg)


def evaluate(
    model,
    tokenizer: Tokenizer,
    cfg: Config,
    tasks: list[str] | None = None,
    shots: list[int] | None = None,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    log: Callable[[str], Any] | None = print,
    shards: Shards | None = None,
) -> list[dict]:
    """Every task x shots; returns one result dict each and, with `out_dir`, writes
    `{out_dir}/{task}_{shots}shot.json` for each (rank 0 only under torchrun: see `mm1.eval.parallel`)."""
    shards = shards or Shards()
    if not shards.is_main:
        log, out_dir = None, None
    check_eval_options(cfg)  # also run at config load; again here for a config changed since
    tasks = tasks or list(cfg.eval.tasks)
    shots = list(cfg.eval.shots) if shots is None else shots
    limit = cfg.eval.limit if limit is None else limit
    results = []
    for name in tasks:
        task = get_task(name, cfg.data.world, cfg.data.allow_outside_paths).resolved(cfg.eval.mc_mode)
        items = task.test[:limit] if limit else task.test
        if not items:
            raise ValueError(f"task {task.name}: the test split is empty")
        for k in shots:
            t0 = time.time()
            seeds = [cfg.eval.seed + t for t in range(cfg.eval.trials)]
            trial_scores, predictions, details = [], [], []
            for seed in seeds:
                score, records = run_trial(model, tokenizer, task, items, k, seed, cfg, shards=shards)
                trial_scores.append(score)
                predictions.append(records)
                details.append(trial_details(task, items, records, cfg))
            mean, std = mean_std(trial_scores)
            spec = task.spec
            result = {
                "task": task.name,
                "kind": spec.kind,
                "metric": spec.metric,
                "shots": k,
                "score": mean,
                "std": std,
                "trial_scores": trial_scores,
                "details": details,
                "mc_mode": spec.mc_mode,
                "seeds": seeds,
                "n": len(items),
                **_shuffled_control(model, tokenizer, task, items, k, seeds, mean, cfg, shards),
                "seconds": round(time.time() - t0, 2),
                "template": spec.chat_template if cfg.eval.chat else spec.template,
                "chat": cfg.eval.chat,
                "separator": spec.separator,
                "prefix": spec.prefix,
                "stop": spec.stop,
                "cot_marker": spec.cot_marker,
                "max_new_tokens": spec.max_new_tokens or cfg.eval.max_new_tokens,
                "config": to_dict(cfg),
                "predictions": predictions,
            }
            results.append(result)
            if log:
                gain = result["image_gain"]
                shuffled = (
                    f"  shuffled {result['score_shuffled']:.2f} (image gain {gain:+.2f})"
                    if gain is not None
                    else f"  ({result['shuffle_note']})"
                )
                log(
                    f"{task.name:<16} {k}-shot  {spec.metric:<10} {mean:8.2f} ± {std:.2f}{shuffled}  "
                    f"(n={len(items)}, {result['seconds']:.1f}s)"
                )
            if out_dir is not None:
                write_result(result, out_dir)
    return results


def _shuffled_control(
    model,
    tokenizer: Tokenizer,
    task: Task,
    items: list,
    shots: int,
    seeds: list[int],
    score: float,
    cfg: Config,
    shards: Shards,
) -> dict[str, Any]:
    """The image-shuffled control of one (task, shots): every trial re-run with deranged query images
    (the derangement seeded like the trial). Null fields and a note where it does not apply."""
    off = {
        "score_shuffled": None,
        "std_shuffled": None,
        "image_gain": None,
        "shuffled_trial_scores": [],
        "details_shuffled": [],
    }
    if not cfg.eval.shuffled_control:
        return off | {"shuffle_note": "off (eval.shuffled_control=false)"}
    template = task.spec.chat_template if cfg.eval.chat else task.spec.template
    inline = any(IMAGE_TOKEN in ex.question for ex in items)  # MMMU: the data places the images
    if task.spec.metric == "perplexity" or not (
        inline or any(m in template for m in (IMAGE_TOKEN, "{images}", "{image_lines}"))
    ):
        return off | {"shuffle_note": "text-only prompt: no image to shuffle"}
    scores, predictions, details, note = [], [], [], ""
    for seed in seeds:
        donors, note = shuffled_donors(items, seed, task.name)
        if donors is None:
            return off | {"shuffle_note": note}
        s, records = run_trial(model, tokenizer, task, items, shots, seed, cfg, image_donors=donors, shards=shards)
        scores.append(s)
        predictions.append(records)
        details.append(trial_details(task, items, records, cfg))
    mean, std = mean_std(scores)
    return {
        "score_shuffled": mean,
        "std_shuffled": std,
        "image_gain": score - mean,
        "shuffled_trial_scores": scores,
        "details_shuffled": details,  # the metric's breakdown of each shuffled trial, beside `details`
        "shuffle_note": note,
        "shuffled_predictions": predictions,
    }


def write_result(result: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result['task']}_{result['shots']}shot.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    tmp.replace(path)
    return path


def format_table(results: list[dict]) -> str:
    """Rows = tasks, columns = shots, cells = mean ± std (± omitted with one trial). Under each task
    evaluated with the shuffled control, a `shuffled` row (score_shuffled) and an `image gain` row
    (score - score_shuffled); a task without images shows `no image` there instead of a number (`off`
    when the control was switched off, `n/a` when no derangement existed: see the result's shuffle_note)."""
    shots = sorted({r["shots"] for r in results})
    rows: dict[tuple[str, str, str], dict[int, str]] = {}  # (task, metric, row kind) -> shots -> cell
    for r in results:
        cell = f"{r['score']:.2f}" + (f" ± {r['std']:.2f}" if len(r.get("trial_scores", [])) > 1 else "")
        rows.setdefault((r["task"], r["metric"], ""), {})[r["shots"]] = cell
        if "score_shuffled" not in r:  # a blind baseline row, or a result from before the control existed
            continue
        shuffled, gain = r["score_shuffled"], r["image_gain"]
        note = str(r.get("shuffle_note", ""))
        missing = "off" if note.startswith("off") else "no image" if note.startswith("text-only") else "n/a"
        rows.setdefault((r["task"], r["metric"], "shuffled"), {})[r["shots"]] = (
            missing if shuffled is None else f"{shuffled:.2f}"
        )
        rows.setdefault((r["task"], "", "image gain"), {})[r["shots"]] = missing if gain is None else f"{gain:+.2f}"
    head = ["task", "metric"] + [f"{k}-shot" for k in shots]
    body = [
        [f"  {kind}" if kind else t, m] + [cells.get(k, "-") for k in shots] for (t, m, kind), cells in rows.items()
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda xs: "  ".join(str(x).ljust(w) for x, w in zip(xs, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def fewshot_average(results: list[dict]) -> dict[int, tuple[float, list[str]]]:
    """MM1's summary row: at each shot count, the mean score over the model's tasks scored at it
    (captioning CIDEr and VQA accuracies averaged as they are, as the paper's few-shot tables do).
    Perplexity (lower is better) and blind baselines are left out."""
    by_shots: dict[int, dict[str, float]] = {}
    for r in results:
        if r.get("kind") and r["metric"] != "perplexity":
            by_shots.setdefault(r["shots"], {})[r["task"]] = r["score"]
    return {k: (sum(v.values()) / len(v), sorted(v)) for k, v in sorted(by_shots.items())}


def format_average(results: list[dict]) -> str:
    """One line, e.g. `average over 3 tasks (MM1-style): 0-shot 41.20  4-shot 55.03`; "" without scores."""
    avg = fewshot_average(results)
    if not avg:
        return ""
    tasks = sorted({t for _, names in avg.values() for t in names})
    cells = "  ".join(
        f"{k}-shot {mean:.2f}" + (f" ({len(names)} tasks)" if len(names) != len(tasks) else "")
        for k, (mean, names) in avg.items()
    )
    return f"average over {len(tasks)} tasks (MM1-style): {cells}"
