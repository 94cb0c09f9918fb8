"""`make mutate`: do the tests still bite? Each mutation below is a one-line bug that once passed the
suite; it is applied to a temporary copy of the working tree and the tests named beside it must fail.

    python tools/mutate.py            # every mutation, then a summary (exit 1 if any is missed)
    python tools/mutate.py --list     # names and the tests expected to catch each
    python tools/mutate.py packed-rows-no-padding clip-labels-shifted

First the named tests are run on the unmutated copy (they must pass, or "caught" means nothing).
A mutation whose line is no longer in its file stops the run with an error naming the file and the
line: update the mutation to the new code instead of letting it silently test nothing.
Not part of CI (it runs the slow tests several times: about 10 minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    line: str  # the exact code, stripped of indentation; must occur exactly once in the file
    bug: str  # what replaces it (same indentation)
    tests: tuple[str, ...]  # pytest node ids; at least one must fail


MUTATIONS = [
    Mutation(
        "packed-rows-no-padding",
        "src/mm1/models/attention.py",
        "packed = kv_doc is not None and bool((kv_doc != kv_doc[:, :1]).any() or (kv_doc < 0).any())",
        "packed = kv_doc is not None and bool((kv_doc < 0).any())",
        ("tests/test_models_lm.py::test_fully_packed_rows_without_padding_still_separate_documents",),
    ),
    Mutation(
        "lr-law-counts-frozen-params",
        "src/mm1/train/trainer.py",
        "self.n_params = count_trainable(module)",
        "self.n_params = sum({id(p): p.numel() for p in module.parameters()}.values())",
        (
            "tests/test_train_stages.py::"
            "test_a_run_with_a_frozen_part_takes_the_lr_law_at_the_trainable_count_and_leaves_it_untouched",
        ),
    ),
    Mutation(
        "count-trainable-ignores-freeze",
        "src/mm1/train/optim.py",
        "if p.requires_grad and id(p) not in seen:",
        "if id(p) not in seen:",
        ("tests/test_train_stages.py::test_frozen_parts_are_not_trained_and_not_counted",),
    ),
    Mutation(
        "grad-scale-off-by-world-size",
        "src/mm1/train/trainer.py",
        'objective = out["loss_sum"] / global_n * env.world_size',
        'objective = out["loss_sum"] / global_n',
        ("tests/test_train_distributed.py::test_two_processes_match_one_and_their_checkpoint_resumes_on_one",),
    ),
    Mutation(
        "vqa-one-annotator",
        "src/mm1/eval/task_metrics.py",
        "_vqa = _per_item(lambda ex, p, cfg: vqa_accuracy(p, ex.answers, cfg.eval.vqa_mode))",
        "_vqa = _per_item(lambda ex, p, cfg: vqa_accuracy(p, ex.answers[:1], cfg.eval.vqa_mode))",
        ("tests/test_eval_tasks.py::test_saved_scores_equal_the_metrics_recomputed_from_the_saved_predictions",),
    ),
    Mutation(
        "cider-one-reference",
        "src/mm1/eval/task_metrics.py",
        "{ex.id: ex.answers for ex in items},",
        "{ex.id: ex.answers[:1] for ex in items},",
        ("tests/test_eval_tasks.py::test_saved_scores_equal_the_metrics_recomputed_from_the_saved_predictions",),
    ),
    Mutation(
        "perplexity-per-text",
        "src/mm1/eval/scoring.py",
        "return math.exp(total_nll / max(total_tokens, 1)), [-lp for lp, _ in scored]",
        "return math.exp(total_nll / max(len(texts), 1)), [-lp for lp, _ in scored]",
        ("tests/test_eval_tasks.py::test_perplexity_task_score_is_exp_of_total_nll_over_total_tokens",),
    ),
    Mutation(
        "clip-labels-shifted",
        "src/mm1/train/encoder.py",
        "labels = torch.arange(img.shape[0], device=img.device)",
        "labels = torch.arange(img.shape[0], device=img.device).roll(1)",
        (
            "tests/test_train_encoder.py::"
            "test_clip_loss_is_the_symmetric_cross_entropy_with_pair_i_as_the_answer_for_row_i",
        ),
    ),
    Mutation(
        "clip-labels-shifted-run",
        "src/mm1/train/encoder.py",  # the same bug, caught by training alone
        "labels = torch.arange(img.shape[0], device=img.device)",
        "labels = torch.arange(img.shape[0], device=img.device).roll(1)",
        ("tests/test_train_encoder.py::test_a_short_clip_run_retrieves_held_out_captions_above_chance",),
    ),
    Mutation(
        "siglip-all-negative",
        "src/mm1/train/encoder.py",
        "signs = 2 * torch.eye(img.shape[0], device=img.device) - 1",
        "signs = -torch.ones(img.shape[0], img.shape[0], device=img.device)",
        (
            "tests/test_train_encoder.py::"
            "test_siglip_loss_sums_every_pairs_log_sigmoid_with_plus_one_only_on_the_diagonal",
        ),
    ),
    Mutation(
        "aim-predicts-the-seen-patch",
        "src/mm1/train/encoder.py",
        "pred = self.head(feats[:, prefix - 1 : -1]).float()  # position t predicts patch t+1",
        "pred = self.head(feats[:, prefix:]).float()",
        ("tests/test_train_encoder.py::test_aim_predicts_each_patch_without_seeing_it_or_any_later_patch",),
    ),
]


def copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked and untracked-but-not-ignored files, edits included)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def mutated(m: Mutation, tree: Path) -> str:
    """The text of `m.path` in `tree` with the bug in place of the line (which must occur once)."""
    text = (tree / m.path).read_text()
    pattern = re.compile(rf"^([ \t]*){re.escape(m.line)}[ \t]*$", re.MULTILINE)
    hits = pattern.findall(text)
    if len(hits) != 1:
        raise SystemExit(
            f"mutate: {m.name}: the line `{m.line}` occurs {len(hits)} times in {m.path} (expected "
            "exactly once); the code changed, so update this mutation in tools/mutate.py"
        )
    return pattern.sub(lambda hit: hit.group(1) + m.bug, text, count=1)


def run_tests(tree: Path, tests: list[str]) -> tuple[int, list[str], str]:
    """(pytest exit code, failed node ids, output tail) for `tests` run inside `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", *tests],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    failed = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("FAILED ")]
    return done.returncode, failed, done.stdout[-3000:] + done.stderr[-2000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the tests on the clean copy")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:<32} {m.path}\n{'':<32} caught by: {', '.join(m.tests)}")
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; see --list")
    chosen = [known[n] for n in args.names] or MUTATIONS
    with tempfile.TemporaryDirectory(prefix="mm1-mutate-") as tmp:
        clean = Path(tmp) / "clean"
        copy_tree(clean)
        for m in chosen:  # every target line must exist before anything runs
            mutated(m, clean)
        if not args.no_baseline:
            tests = sorted({t for m in chosen for t in m.tests})
            code, failed, tail = run_tests(clean, tests)
            if code != 0:
                print(tail)
                print(
                    f"mutate: the named tests fail on the unmutated tree ({failed or 'exit ' + str(code)}); "
                    "fix them first"
                )
                return 2
            print(f"baseline: {len(tests)} named tests pass on the unmutated tree")
        rows = []
        for m in chosen:
            tree = Path(tmp) / m.name
            shutil.copytree(clean, tree)
            (tree / m.path).write_text(mutated(m, clean))
            start = time.perf_counter()
            code, failed, tail = run_tests(tree, list(m.tests))
            verdict = "caught" if code == 1 and failed else "MISSED" if code == 0 else f"ERROR (pytest exit {code})"
            rows.append((m.name, verdict))
            print(f"{m.name:<32} {verdict:<8} {time.perf_counter() - start:6.1f}s  {', '.join(failed)}", flush=True)
            if verdict.startswith("ERROR"):
                print(tail)
            shutil.rmtree(tree)
    caught = sum(v == "caught" for _, v in rows)
    print(
        f"\n{caught}/{len(rows)} mutations caught"
        + "".join(f"\n  not caught: {n} ({v})" for n, v in rows if v != "caught")
    )
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
