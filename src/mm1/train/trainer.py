"""One trainer for every stage (encoder pre-training, MLLM pre-training, SFT), 1 process or many.

The loss of a step is the mean over every target token of the *global* batch (all ranks, all
micro-steps): each micro-step back-propagates its token-loss sum divided by the global token count
(times the world size, since DDP/FSDP average gradients). So gradient accumulation, the number of
processes and packing density never change what is optimised, and N processes reproduce one process
with the same global batch (see `mm1.train.batches` for how the global batch is kept fixed).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mm1.config import Config, to_yaml
from mm1.data.inputs import resolve_inputs
from mm1.data.kinds import KINDS
from mm1.train import checkpoint as ckpt_io
from mm1.train.batches import ShardedLoader, to_device
from mm1.train.budget import TimeBudget
from mm1.train.budget import now as budget_clock
from mm1.train.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    init_distributed,
    resolve_strategy,
    setup_logging,
    shutdown,
    transformer_blocks,
    wrap_model,
)
from mm1.train.materialise import loading_into_shards, peak_rss_mb, reset_peak_rss, rss_mb, seeded_init
from mm1.train.materialise import materialise as materialise_module
from mm1.train.metrics import MetricsLogger, truncate_metrics
from mm1.train.objective import StageObjective
from mm1.train.optim import build_optimizer, build_scheduler, count_trainable, resolve_lr
from mm1.train.resume_guard import check_resume
from mm1.train.run_dir import RunDirLock
from mm1.train.stages import STAGES, build_stage_module, load_stage_weights, stage_model

log = logging.getLogger("mm1.train")


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/inf and `train.nonfinite=stop`."""


def train(cfg: Config, out: str | Path, resume: bool = False, allow_change: Sequence[str] = ()) -> dict[str, Any]:
    """Run `cfg.train.stage` into run dir `out` (continuing its latest checkpoint if `resume`; a
    config change on resume is refused unless `allow_change` names it, see `mm1.train.resume_guard`)."""
    env = init_distributed(cfg.train.strategy)
    setup_logging(env)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_filling = torch.utils.deterministic.fill_uninitialized_memory
    ok = False
    try:
        with RunDirLock(out, env):  # one job per run dir
            if resume:
                check_resume(cfg, Path(out), allow_change)  # before anything is written
            result = Trainer(cfg, Path(out), env).run(resume)
        ok = True
        return result
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = was_filling
        if ok:
            shutdown(env)
        elif env.initialized:
            torch.distributed.destroy_process_group()


class Trainer:
    def __init__(self, cfg: Config, out: Path, env: DistEnv) -> None:
        self.cfg, self.out, self.env = copy.deepcopy(cfg), out, env
        t = self.cfg.train
        self.strategy = resolve_strategy(t.strategy, env.world_size)
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and env.device.type == "cuda")
        self.stage = STAGES.get(t.stage)
        self.prefix = self.stage.checkpoint_prefix
        self.last_ckpt: Path | None = None
        self.budget: TimeBudget | None = None
        self.saved_budget: dict | None = None  # a resumed run's clock and decay (train.time_budget_s)

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        cfg, env, t = self.cfg, self.env, self.cfg.train
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            # deterministic mode also fills every new tensor with NaN (a guard against reading
            # uninitialised memory, which nothing here does): about 1,600 fills a tiny-preset step,
            # 7 % of its time (benchmarks/RESULTS.md, Profile findings); results are unchanged
            torch.utils.deterministic.fill_uninitialized_memory = False
        torch.manual_seed(t.seed)  # identical model init on every rank
        random.seed(t.seed + env.rank)
        np.random.seed(t.seed + env.rank)
        self.inputs = resolve_inputs(cfg, is_main=env.is_main, barrier=partial(barrier, env))
        self.tokenizer = tok = self.inputs.tokenizer
        cfg.model.image_token_id = self.tokenizer.image_id
        if self.tokenizer.vocab_size > cfg.model.lm.vocab_size and cfg.model.lm.hf_path:
            log.info(
                "model.lm.vocab_size %d -> %d: the tokenizer adds tokens to %s; their embedding rows start "
                "at the mean of the others",
                cfg.model.lm.vocab_size,
                self.tokenizer.vocab_size,
                cfg.model.lm.hf_path,
            )
            cfg.model.lm.vocab_size = self.tokenizer.vocab_size
        if self.tokenizer.vocab_size > cfg.model.lm.vocab_size:
            raise ValueError(
                f"the tokenizer {tok.source} has {self.tokenizer.vocab_size} tokens but "
                f"model.lm.vocab_size={cfg.model.lm.vocab_size}; raise model.lm.vocab_size"
            )
        self.model = self._build_model()
        self.optimizer = build_optimizer(self.model, t, self.lr_choice)
        self.scheduler = build_scheduler(self.optimizer, t)
        self.loader = ShardedLoader(cfg, self.inputs, env.rank, env.world_size)
        self.probe = None
        if t.eval_every > 0 and self.stage.trains_mllm:
            from mm1.train.probe import ImageProbe

            self.probe = ImageProbe(cfg, self.inputs, env)
        self.peak = None
        if env.device.type == "cuda":
            from mm1.models.flops import peak_flops, training_flops

            self.peak = peak_flops(torch.cuda.get_device_name(env.device))
            self.flops = training_flops(cfg.model, cfg.data.seq_len)

    def _build_model(self) -> torch.nn.Module:
        """The wrapped training module, built on the meta device, sharded (FSDP2), then materialised
        with the seeded init and any HF / init_from weights (`mm1.train.materialise`)."""
        cfg, env, t, tok = self.cfg, self.env, self.cfg.train, self.tokenizer
        with torch.device("meta"):
            module = build_stage_module(
                cfg, tok.vocab_size, set(tok.special_ids), env, self.strategy, tok.encode, weights=False
            )
        model = stage_model(module)

        def init() -> None:
            seeded_init(model, t.seed)
            with loading_into_shards(model):
                load_stage_weights(model, cfg)

        materialise = partial(materialise_module, module, env.device, init)
        self.n_params = count_trainable(module)
        self.lr_choice = resolve_lr(t, self.n_params)
        if t.compile:
            for block in transformer_blocks(module):
                block.compile()
        reset_peak_rss()
        before = rss_mb()
        self.objective: StageObjective = module  # the unwrapped module: `units(batch)` before each forward
        model = wrap_model(module, self.strategy, env, self.bf16, materialise)
        self.build_rss_mb = peak_rss_mb() - before  # host memory materialising the model took on this rank
        return model

    def _start_run_dir(self, resume: bool) -> int:
        """Create or reopen the run dir; restore the latest checkpoint on resume; return the start step."""
        out, env = self.out, self.env
        latest = ckpt_io.latest_checkpoint(out) if resume else None
        if not resume and ((out / "metrics.jsonl").exists() or ckpt_io.list_checkpoints(out)):
            raise FileExistsError(
                f"{out} already holds a run (metrics.jsonl / checkpoints); pass --resume to "
                "continue it, or choose another --out"
            )
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.yaml").write_text(to_yaml(self.cfg))
        barrier(env)
        start = 0
        if latest is not None:
            trainer_state, rank_state = ckpt_io.load_training_state(
                latest, self.model, self.optimizer, self.scheduler, env, prefix=self.prefix
            )
            self.loader.load_state_dict(rank_state["data"])
            start = int(trainer_state["step"])
            self.saved_budget = trainer_state.get("budget")
            self.last_ckpt = latest
            if env.is_main:
                truncate_metrics(out / "metrics.jsonl", start)
            log.info("resumed from %s (step %d)", latest, start)
        elif resume:
            log.info("--resume: no checkpoint in %s yet, starting from step 0", out)
            if env.is_main:
                truncate_metrics(out / "metrics.jsonl", 0)  # the steps logged before are redone
        if env.is_main:
            info = {
                "stage": self.cfg.train.stage,
                "n_trainable_params": self.n_params,
                "peak_lr": self.lr_choice.lr,
                "weight_decay": self.lr_choice.weight_decay,
                "torch_weight_decay": self.lr_choice.torch_weight_decay,
                "lr_source": self.lr_choice.lr_source,
                "lr_scale": self.lr_choice.lr_scale,
                "wd_source": self.lr_choice.wd_source,
                "strategy": self.strategy,
                "world_size": env.world_size,
                "device": str(env.device),
                "precision": "bf16" if self.bf16 else "fp32",
                "start_step": start,
                "build_peak_rss_mb": round(self.build_rss_mb, 1),
            }
            (out / "run.json").write_text(json.dumps(info, indent=1))
        log.info(
            "%s | %s on %d x %s (%s), %s | %s",
            self.cfg.train.stage,
            self.strategy,
            env.world_size,
            env.device.type,
            "bf16" if self.bf16 else "fp32",
            f"N={self.n_params:,}",
            self.lr_choice.describe(),
        )
        return start

    # ------------------------------------------------------------------ one optimizer step

    def _sync(self, last: bool) -> contextlib.AbstractContextManager:
        if self.strategy == "ddp" and not last:
            return self.model.no_sync()
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _step(self) -> tuple[dict[str, float], torch.Tensor]:
        """One optimizer step's gradients and log record, the same for every stage: the stage's
        objective says how many units each micro-batch's loss sums over (`mm1.train.objective`)."""
        env, accum = self.env, self.cfg.train.grad_accum
        micro = [next(self.loader) for _ in range(accum)]
        stats: dict[str, torch.Tensor] = {}

        def add(key: str, value: torch.Tensor) -> None:
            v = value.detach().double().to(env.device)
            stats[key] = stats[key] + v if key in stats else v

        local_n = sum(self.objective.units(mb) for mb in micro)
        global_n = all_reduce_sum(torch.tensor(float(local_n), device=env.device), env).clamp(min=1)
        metric_keys: set[str] = set()
        for i, mb in enumerate(micro):
            batch = to_device(mb, env.device)
            with self._sync(i == accum - 1):
                with self._autocast():
                    out = self.model(batch)
                objective = out["loss_sum"] / global_n * env.world_size
                if "aux_loss" in out:
                    objective = objective + out["aux_loss"] / accum
                    add("aux", out["aux_loss"] / accum / env.world_size)
                add("loss_sum", out["loss_sum"])
                if "per_source" in out:
                    add("per_source", out["per_source"])
                objective.backward()
            for k, v in out["metrics"].items():
                add(k, v / accum / env.world_size)
                metric_keys.add(k)
            add("images", torch.tensor(float(mb["images"].shape[0]) if "images" in mb else 0.0))
            add(
                "tokens",
                (mb["doc_ids"] >= 0).sum() if "doc_ids" in mb else torch.tensor(float(mb["input_ids"].numel())),
            )
        keys = sorted(stats)
        flat = all_reduce_sum(torch.cat([stats[k].reshape(-1) for k in keys]), env)
        reduced, i = {}, 0
        for k in keys:
            n = stats[k].numel()
            reduced[k] = flat[i : i + n].view_as(stats[k])
            i += n
        clip = self.cfg.train.clip if self.cfg.train.clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], clip)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        loss = float(reduced["loss_sum"]) / float(global_n)
        record: dict[str, float] = {"loss": loss}
        if "aux" in reduced:  # an objective with an auxiliary loss logs both parts
            aux = float(reduced["aux"])
            record.update(loss=loss + aux, lm_loss=loss, aux_loss=aux)
        if "per_source" in reduced:
            ps = reduced["per_source"]
            for j, kind in enumerate(KINDS.names()):
                if float(ps[1, j]) > 0:
                    record[f"loss_{kind}"] = float(ps[0, j] / ps[1, j])
        for k in sorted(metric_keys):
            record[k] = float(reduced[k])
        record["grad_norm"] = float(norm)
        record["tokens"] = float(reduced["tokens"])
        record["images"] = float(reduced["images"])
        return record, norm

    # ------------------------------------------------------------------ loop

    def _save(self, step: int) -> None:
        cfg, tok = self.cfg, self.tokenizer

        def extra(d: Path) -> None:
            (d / "config.yaml").write_text(to_yaml(cfg))
            tok.save(d / "tokenizer.json")
            src_cfg = Path(tok.source).parent / "tokenizer_config.json" if tok.source else None
            if src_cfg is not None and src_cfg.is_file():
                (d / "tokenizer_config.json").write_text(src_cfg.read_text())

        self.last_ckpt = ckpt_io.save_checkpoint(
            self.out,
            step,
            self.model,
            self.optimizer,
            self.scheduler,
            env=self.env,
            trainer_state={
                "n_trainable_params": self.n_params,
                **({"budget": self.budget.state_dict()} if self.budget else {}),
            },
            rank_state={"data": self.loader.state_dict()},
            extra=extra,
            keep_last=cfg.train.keep_last,
            prefix=self.prefix,
            consolidated=cfg.train.save_consolidated,
        )

    def _time_budget(self, started: float) -> TimeBudget | None:
        """`train.time_budget_s` as a clock that ends the WSD run (`mm1.train.budget`); None if unset."""
        t, env = self.cfg.train, self.env
        if t.time_budget_s <= 0:
            return None

        def agree(seconds: float) -> float:
            if env.world_size == 1:
                return seconds
            total = all_reduce_sum(torch.tensor(seconds, dtype=torch.float64, device=env.device), env)
            return float(total) / env.world_size

        budget = TimeBudget(
            t.time_budget_s,
            t.decay_fraction,
            self.scheduler.lr_lambdas[0],
            t.steps,
            started,
            agree=agree,
        )
        if self.saved_budget is not None:
            budget.restore(self.saved_budget)
            log.info("train.time_budget_s=%g: %.1f s spent before this resume", t.time_budget_s, budget.spent())
        return budget

    def run(self, resume: bool) -> dict[str, Any]:
        started = budget_clock()
        self._setup()
        start = self._start_run_dir(resume)
        self.budget = self._time_budget(started)
        t = self.cfg.train
        logger = MetricsLogger(
            self.out, t.steps, start, self.env.is_main, self.cfg, progress=sys.stderr.isatty(), log_every=t.log_every
        )
        first = last = None
        self.model.train()
        step = start
        end = self.budget.end if self.budget and self.budget.end is not None else t.steps
        try:
            while step < end:
                t0 = time.perf_counter()
                lr = self.optimizer.param_groups[0]["lr"]
                record, norm = self._step()
                finite = math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
                if finite:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.budget is not None:  # the clock may end the run here or set where it will
                    end = step + 1 if self.budget.after_step(step + 1) else (self.budget.end or t.steps)
                    logger.set_total(min(end, self.budget.projected_end))
                self.scheduler.step()
                dt = max(time.perf_counter() - t0, 1e-9)
                record = {
                    "step": step + 1,
                    "loss": record.pop("loss"),
                    "lr": lr,
                    **record,
                    "tokens_per_s": record["tokens"] / dt,
                    "images_per_s": record["images"] / dt,
                    "step_time_s": dt,
                }
                if self.env.device.type == "cuda":
                    record["max_mem_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
                if self.peak and self.stage.trains_mllm:
                    flops = self.flops.per_step(int(record["tokens"]), int(record["images"]))
                    record["mfu"] = flops / dt / (self.peak * self.env.world_size)
                if not finite:
                    record["skipped"] = True
                    if t.nonfinite == "stop":
                        logger.log(record)
                        where = self.last_ckpt or "none (no checkpoint was written yet)"
                        raise NonFiniteLoss(
                            f"step {step + 1}: non-finite loss {record['loss']} / grad norm {record['grad_norm']}; "
                            f"stopping. Last good checkpoint: {where}. Lower train.lr or check the data, then "
                            "continue with --resume; or set train.nonfinite=skip to drop such steps"
                        )
                    log.warning("step %d: non-finite loss/grad norm, step skipped (train.nonfinite=skip)", step + 1)
                if self.probe is not None and ((step + 1) % t.eval_every == 0 or step + 1 == end):
                    record.update(self.probe.measure(self.model, self._autocast))
                first = record["loss"] if first is None else first
                last = record["loss"]
                logger.log(record)
                if (step + 1) % t.save_every == 0 or step + 1 == end:
                    t_save = budget_clock()
                    self._save(step + 1)
                    if self.budget is not None:
                        self.budget.saved(budget_clock() - t_save)
                step += 1
        finally:
            logger.close()
        return {
            "run_dir": str(self.out),
            "steps": step,
            "start_step": start,
            "first_loss": first,
            "final_loss": last,
            "checkpoint": str(self.last_ckpt) if self.last_ckpt else None,
            "n_trainable_params": self.n_params,
            "peak_lr": self.lr_choice.lr,
            "lr_source": self.lr_choice.lr_source,
        }
