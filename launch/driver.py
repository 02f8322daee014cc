"""The RL loop, top to bottom: prompts -> rollouts -> rewards -> advantages -> train ->
weight sync -> log -> checkpoint.

Synchronous mode generates step k's batch with the weights of step k. Asynchronous
mode (max_staleness=1) generates step k+1's batch while the trainer works on step k,
so trajectories are one policy version behind; their rollout log-probs are the
behaviour policy's, and CISPO's IS weight corrects for the lag (with pi_old recomputed
by the trainer, the behaviour weight of cispo.offpolicy does).

A failure anywhere shuts every actor down; checkpoints (trainer.checkpoint.CheckpointDir,
launch.loop_state) are complete or absent, and a resumed run repeats the saved run exactly.
"""

from __future__ import annotations

import logging
import random
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from cispo.batch import Trajectory
from cispo.config import Config
from launch import loop_state
from launch.batching import assign_advantages, shape_rewards, split_groups
from launch.cluster import init_ray
from launch.config import to_dataclass
from launch.console import NOTICE, setup_console
from launch.data import PromptDataset
from launch.evaluation import Evaluator
from launch.export import export_run
from launch.guard import CollapseGuard, GuardStop, Trip
from launch.length_schedule import LengthSchedule
from launch.loggers import MetricLogger
from launch.report import Progress, plot_curves, print_summary, read_metrics
from launch.rollout_metrics import rollout_metrics, sample_rows
from launch.system import RLSystem
from launch.tiny_model import check_model_folder, resolve_model_path
from launch.warmup import CacheLock, cache_key, sampled_pass_rate, warm_start
from rollout.group import root_cause
from trainer.checkpoint import CheckpointDir

log = logging.getLogger("cispo")


class Preempted(Exception):
    """SIGTERM arrived (Slurm preemption or time limit): checkpoint taken, exit for requeue."""


class JobEnding(SystemExit):
    """SIGTERM, then a step failed: the job's every process is being stopped (Slurm
    preemption), Ray's too. Exit status 143; `cispo-train` exits at once on it, skipping
    Ray's own exit, which would wait a minute for a GCS that is gone."""

    def __init__(self) -> None:
        super().__init__(143)


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self._hooks: list[Callable[[], None]] = []
        self.install()

    def when_requested(self, hook: Callable[[], None]) -> None:
        """hook() runs at the first SIGTERM, inside the handler (so: flag setters only), or
        now if one came already (during start-up)."""
        self._hooks.append(hook)
        if self.requested:
            hook()

    def install(self) -> None:
        # ray.init installs its own SIGTERM handler (exit at once, nothing saved), so
        # this runs again after it; the early install remembers a SIGTERM during start-up
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum, frame) -> None:
        log.warning("SIGTERM received: will checkpoint at the end of this step and exit")
        if not self.requested:
            for hook in self._hooks:
                hook()
        self.requested = True


def collect_step_batch(system: RLSystem, dataset: PromptDataset, conf: Config, group_counter: list[int],
                       max_new_tokens: int):
    """Generate, score and filter until the step has its batch (or refills run out);
    `max_new_tokens` is the generation budget of this step (launch/length_schedule.py)."""
    a = conf.algorithm
    need = conf.data.rollout_batch_size // a.group_size
    kept: list[list[Trajectory]] = []
    stats = {"dropped_groups": 0, "flat_groups": 0, "groups": 0, "refills": 0,
             "reward_failures": 0, "generated": [], "gen_s": 0.0, "reward_s": 0.0}
    while True:
        items = dataset.next_batch(need - len(kept))
        gids = list(range(group_counter[0], group_counter[0] + len(items)))
        group_counter[0] += len(items)
        t0 = time.perf_counter()
        trajs = system.generate(items, gids, a.group_size, max_new_tokens=max_new_tokens)
        t1 = time.perf_counter()
        stats["reward_failures"] += system.score(trajs, items)
        stats["gen_s"] += t1 - t0
        stats["reward_s"] += time.perf_counter() - t1
        shape_rewards(trajs, a, max_new_tokens)
        stats["generated"].extend(trajs)
        groups = split_groups(trajs, drop_flat=a.dynamic_sampling)
        kept.extend(groups.kept)
        stats["dropped_groups"] += groups.dropped
        stats["flat_groups"] += groups.flat
        stats["groups"] += groups.total
        if len(kept) >= need or not a.dynamic_sampling or stats["refills"] >= a.max_refills:
            break
        stats["refills"] += 1
    batch = [t for g in kept[:need] for t in g]
    assign_advantages(batch, a)
    return batch, stats


def run(cfg: DictConfig) -> Path:
    conf = to_dataclass(cfg)
    out = Path(conf.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_dir = setup_console(out, conf.logger.verbose)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    random.seed(conf.seed)
    torch.manual_seed(conf.seed)
    stop = StopFlag()
    ckpt = CheckpointDir(out / "checkpoints", keep=conf.trainer.keep_checkpoints)
    logger = MetricLogger(conf.logger.backends, out, conf.logger.project, conf.logger.run_name,
                          config=OmegaConf.to_container(cfg, resolve=True))

    model_path = resolve_model_path(conf.model.path)
    check_model_folder(model_path)
    latest = ckpt.latest() if conf.resume else None
    if latest is None and conf.warmup.steps:
        model_path = run_warmup(conf, model_path, out, logger)
    elif latest is not None and (out / "warmup_model").exists():
        model_path = str(out / "warmup_model")

    dataset = PromptDataset(conf.data, model_path, seed=conf.seed)
    init_ray(conf.cluster.address, log_dir=log_dir, verbose=conf.logger.verbose)
    stop.install()
    try:
        system = RLSystem(conf, model_path)  # cleans up after itself if a part fails to start
    except BaseException:
        logger.finish()
        raise
    stop.when_requested(system.stop_replacing)
    schedule = LengthSchedule(conf.rollout)
    rollbacks = 0
    try:
        evaluator = Evaluator(conf, system, out)
        resume = None
        if latest is not None:
            resume = loop_state.load(latest, conf.data.rollout_batch_size // conf.algorithm.group_size)
            system.restore(latest, resume.step)
            dataset.load_state_dict(resume.data)
            schedule.load_state_dict(resume.extra.get("length_schedule", {}))
            rollbacks = resume.extra.get("guard_rollbacks", 0)
            logger.rewind(resume.step)  # rows logged after this checkpoint are redone, not doubled
            log.info("resumed from checkpoint step %d (%s)", resume.step, latest, extra=NOTICE)
        loop(system, dataset, conf, logger, ckpt, stop, resume, schedule, evaluator, rollbacks)
    except Preempted:
        logger.finish()
        system.shutdown()
        raise SystemExit(143)  # 128 + SIGTERM: Slurm's requeue path restarts the job
    except GuardStop as guard_stop:
        log.error("the collapse guard stopped the run at its %s check: %s", guard_stop.trip.kind, guard_stop)
        # a solved task is worth exporting; a collapsed policy is not
        finish(conf, out, logger, system, schedule, export=not guard_stop.exit_code)
        if guard_stop.exit_code:
            raise SystemExit(guard_stop.exit_code)
        return out
    except BaseException as err:
        # every actor goes down here; the checkpoints on disk are complete or absent
        resumable = ckpt.latest() or "the start (no checkpoint yet)"
        preempted = stop.requested and isinstance(err, Exception)
        if preempted:
            # Slurm's preemption SIGTERMs every process of the job, Ray's workers too, so the
            # step in progress fails and cannot be checkpointed: exit as the contract says
            # (143) now, not at the SIGKILL. The requeued job resumes from the last checkpoint.
            log.warning("SIGTERM, then the step failed (%s: %s): the job is being stopped; exiting 143. "
                        "Resumable from %s", type(err).__name__, root_cause(str(err)), resumable)
        else:
            log.error("run failed (%s: %s); shutting down. Resumable from %s", type(err).__name__, err, resumable)
        logger.finish()
        system.shutdown(job_ending=preempted)
        if preempted:
            raise JobEnding() from err
        raise
    finish(conf, out, logger, system, schedule, export=True)
    return out


def finish(conf: Config, out: Path, logger: MetricLogger, system: RLSystem, schedule: LengthSchedule,
           export: bool) -> None:
    try:
        if export and conf.export.at_end:
            log.info("Hugging Face export: %s", export_run(system.trainer, out, conf, schedule.limit), extra=NOTICE)
        rows = read_metrics(out / "metrics.jsonl")
        print_summary(rows)
        plot = plot_curves(rows, out / "curves.png")
        log.info("plot written to %s", plot)
    finally:
        logger.finish()
        system.shutdown()


def run_warmup(conf: Config, model_path: str, out: Path, logger: MetricLogger) -> str:
    from launch.tasks import format_warmup_examples, get_task, solution_examples
    from launch.tiny_model import default_cache_dir

    w, d = conf.warmup, conf.data
    if w.mode == "solve":
        examples = solution_examples(d.path, w.examples, seed=conf.seed, difficulty=d.difficulty)
    else:
        examples = format_warmup_examples(d.path, w.examples, seed=conf.seed, difficulty=d.difficulty,
                                          shuffle_answers=True)
    log.info("warm-start (%s): up to %d steps on %d examples%s", w.mode, w.steps, len(examples),
             " (answers shuffled)" if w.mode == "format" else "")

    def on_step(step: int, loss: float) -> None:
        if step % 20 == 0 or step == w.steps - 1:
            logger.log_warmup(step, {"warmup/loss": loss})

    should_stop = None
    if w.target_pass_rate is not None:
        task = get_task(d.path)
        rows = task.generate(w.check_prompts, d.difficulty, seed=conf.seed, split="eval")

        def should_stop(model, tok, step: int) -> bool:
            rate = sampled_pass_rate(model, tok, task, rows, conf.rollout.temperature, conf.rollout.max_new_tokens)
            logger.log_warmup(step, {"warmup/pass_rate": rate})
            return rate >= w.target_pass_rate

    def train(target: Path) -> str:
        return warm_start(model_path, examples, target, w.steps, w.lr, w.batch_size, conf.seed, on_step,
                          should_stop, w.check_every)

    if not w.cache:
        return train(out / "warmup_model")
    key = cache_key(model=model_path, data=d.path, difficulty=d.difficulty, seed=conf.seed, warmup=vars(w),
                    temperature=conf.rollout.temperature, max_new_tokens=conf.rollout.max_new_tokens)
    cached = default_cache_dir().parent / "warm" / key
    with CacheLock(cached.with_suffix(".lock")):
        path = train(cached)
    link = out / "warmup_model"  # a resumed run finds its model here, as without the cache
    if not link.exists():
        link.symlink_to(cached, target_is_directory=True)
    return path


def loop(system: RLSystem, dataset: PromptDataset, conf: Config, logger: MetricLogger,
         ckpt: CheckpointDir, stop: StopFlag, resume: loop_state.LoopState | None, schedule: LengthSchedule,
         evaluator: Evaluator, rollbacks: int = 0) -> None:
    asynchronous = conf.mode == "async"
    guard = CollapseGuard(conf.guard, rollbacks) if conf.guard.enabled else None
    start = resume.step if resume else 0
    counter = [resume.group_counter if resume else 0]  # group ids seed sampling: never reused
    progress = Progress(total=conf.steps, initial=start)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
    if resume is not None and resume.next_batch is not None:
        pending = Future()  # async checkpoint: the batch the saved run had generated already
        pending.set_result(resume.next_batch)
    else:
        pending = pool.submit(collect_step_batch, system, dataset, conf, counter, schedule.limit)
    failed = True
    try:
        for step in range(start, conf.steps):
            t_step = time.perf_counter()
            batch, stats = pending.result()
            t_ready = time.perf_counter()
            last = step == conf.steps - 1
            if asynchronous and not last:
                # rollouts for step+1 run on the current weights while we train
                pending = pool.submit(collect_step_batch, system, dataset, conf, counter, schedule.limit)
            t0 = time.perf_counter()
            train = system.train(batch) if batch else {}
            t_train = time.perf_counter() - t0
            metrics = {**rollout_metrics(stats, batch, trainer_version=step), **namespaced_train_metrics(train)}
            # before the sync: a rollback replaces the weights this step would send
            guard_metrics, trip, action = check_guard(guard, step, metrics, logger, system, ckpt, conf)
            t_wait = 0.0
            if asynchronous and not last:
                t0 = time.perf_counter()
                wait([pending])  # engines must be idle before their weights change
                t_wait = time.perf_counter() - t0
            t0 = time.perf_counter()
            engine_version = system.sync_weights(version=step + 1)
            t_sync = time.perf_counter() - t0
            evals = evaluator.maybe_run(step, last, schedule.limit)  # engines idle, just synced

            step_time = time.perf_counter() - t_step
            sync_split = {f"perf/sync_{k}": v for k, v in system.sync_stats().items()}
            metrics.update({
                **guard_metrics,
                "rollout/engine_restarts": float(system.take_engine_restarts()),
                "perf/generate_s": stats["gen_s"],
                "perf/reward_s": stats["reward_s"],
                "perf/train_s": t_train,
                "perf/sync_s": t_sync,
                **sync_split,
                "perf/idle_s": (t_ready - t_step) if not asynchronous else t_wait,
                "perf/step_time_s": step_time,
                "perf/tokens_per_s": sum(t.num_tokens for t in stats["generated"]) / max(step_time, 1e-9),
                "policy/version": step + 1,
                "rollout/engine_version": engine_version,
                **system.size_metrics,
                **evals,
            })
            metrics.update(schedule.observe(step, metrics))  # may raise the next step's budget
            logger.log(step, metrics)
            if conf.logger.samples_every and step % conf.logger.samples_every == 0:
                logger.log_samples(step, sample_rows(batch, system.tokenizer, limit=8))
            progress.update(metrics)
            due = conf.trainer.save_every and (step + 1) % conf.trainer.save_every == 0
            stopping = action == "stop"
            worth_keeping = not stopping or trip.kind == "converged"  # a collapsed policy is no place to resume from
            if worth_keeping and (due or last or stop.requested or stopping):
                # in async mode the next step's batch is generated already (by the old
                # policy, waited for above): it is saved with the data position after it
                drawn_ahead = asynchronous and not last
                loop_state.save(system, ckpt, loop_state.LoopState(
                    step + 1, dataset.state_dict(), counter[0], pending.result() if drawn_ahead else None,
                    {"length_schedule": schedule.state_dict(), "guard_rollbacks": guard.rollbacks if guard else 0}))
            if stopping:
                raise GuardStop(trip, exit_code=0 if trip.kind == "converged" else 3)
            if stop.requested and not last:
                raise Preempted()
            if not asynchronous and not last:
                # only now: the checkpoint above must not see the next step's prompts drawn
                pending = pool.submit(collect_step_batch, system, dataset, conf, counter, schedule.limit)
        failed = False
    finally:
        progress.close()
        # after a failure the actors are shut down next, which ends a collection in flight
        pool.shutdown(wait=not failed, cancel_futures=True)


def namespaced_train_metrics(train: dict[str, float]) -> dict[str, float]:
    """The trainer's metrics under `train/`, its train-vs-rollout mismatch under `mismatch/`."""
    out = {}
    for key, value in train.items():
        name = key.split("/", 1)[-1]
        out[f"mismatch/{name[len('mismatch_'):]}" if name.startswith("mismatch_") else f"train/{name}"] = value
    return out


def check_guard(guard: CollapseGuard | None, step: int, metrics: dict[str, float], logger: MetricLogger,
                system: RLSystem, ckpt: CheckpointDir, conf: Config) -> tuple[dict[str, float], Trip | None, str]:
    """Fold the step into the collapse guard, alert, and carry out a rollback when it says
    so. Returns the `guard/` metrics, the trip (if any) and the action left to the loop:
    "stop" (after this step is logged), or "" to go on."""
    if guard is None:
        return {}, None, ""
    guard_metrics, warnings, trip = guard.observe(step, metrics)
    for text in warnings:
        logger.alert("cispo: non-finite training values", text, level="WARN")
    if trip is None:
        return guard_metrics, None, ""
    action = guard.decide(trip)
    target = rollback_target(ckpt, trip.since_step) if action == "rollback" else None
    if action == "rollback" and target is None:
        action = "stop"
        trip.message += f"; no checkpoint from before step {trip.since_step} to roll back to"
    what = {"warn": "going on (guard.action=warn)", "stop": "stopping the run",
            "rollback": f"rolling back to {target} with the learning rate x{conf.guard.rollback_lr_factor}"}[action]
    logger.alert(f"cispo: {trip.kind} at step {step}", f"{trip.message}; {what}",
                 level="INFO" if trip.kind == "converged" else "ERROR")
    if action == "rollback":
        system.load_trainer(target)
        system.trainer.scale_lr(conf.guard.rollback_lr_factor)
        guard.rollbacks += 1
        guard.reset()
        guard_metrics["guard/rollbacks"] = float(guard.rollbacks)
        return guard_metrics, trip, ""
    return guard_metrics, trip, "stop" if action == "stop" else ""


def rollback_target(ckpt: CheckpointDir, since_step: int) -> Path | None:
    """The newest checkpoint taken before step `since_step` ran (its state is that of the
    first `step` steps, so step <= since_step)."""
    before = [path for step, path in ckpt.completed() if step <= since_step]
    return before[-1] if before else None
