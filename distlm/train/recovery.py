"""What the loop does when it must stop or go back: the preemption save, and the rollback.

Both run on every rank at the same step boundary (the loop decided with a collective), so
every collective in here is reached by all ranks.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, NoReturn

from distlm.checkpoint.state import TrainState
from distlm.config import Config, to_dict
from distlm.fault import exit_codes
from distlm.fault.exit_codes import Preempted, PreemptedUnsaved
from distlm.fault.preemption import save_deadline
from distlm.train.checkpointing import resume, rollback_target
from distlm.train.supervision import Supervisor


def stop_for_preemption(signalled: str, state: TrainState, saver, saved_step: int, cfg: Config,
                        supervisor: Supervisor, log: Callable[[str], None],
                        refresh_data: Callable[[], dict]) -> NoReturn:
    """Save this step (unless it is saved already) within the budget, then raise Preempted.

    ``refresh_data``: the loader's position and error counts now (a collective), which the loop
    otherwise refreshes on logged and saved steps only.
    """
    supervisor.progress(state.step, "save")
    saving = state.step > saved_step
    log(f"preemption: {signalled}; every rank stops at step {state.step}"
        + (" after saving it" if saving else f" (step {saved_step} is saved already)"))

    def out_of_time() -> None:
        reason = (f"the preemption save of step {state.step} ran past fault.preempt_save_timeout_s="
                  f"{cfg.fault.preempt_save_timeout_s:g}: stopped without it; the previous checkpoint stands")
        print(f"distlm: {reason}", file=sys.stderr, flush=True)
        supervisor.ended(exit_codes.PREEMPTED_UNSAVED, reason, own=True)
        os._exit(exit_codes.PREEMPTED_UNSAVED)

    started, errors = time.perf_counter(), saver.errors
    try:
        # The budget counts from the signal on the rank that received it (the scheduler's grace
        # period started then), from here on the others.
        with save_deadline(supervisor.preempt_budget_left(), out_of_time):
            if saving:
                state.data = refresh_data()
                saver.save(state, to_dict(cfg))
            saver.close()  # waits for an asynchronous save in flight and commits it
    except Exception as e:  # a peer died, the disk filled, ...: what is committed stays
        raise PreemptedUnsaved(f"{signalled}: the save of step {state.step} failed ({type(e).__name__}: {e}); "
                               f"the newest committed checkpoint stands") from e
    if saver.errors > errors:  # checkpoint.on_error=continue counted it instead of raising
        raise PreemptedUnsaved(f"{signalled}: the save of step {state.step} failed (see above); the newest "
                               f"committed checkpoint stands")
    saved = f"saved step {state.step} in {time.perf_counter() - started:.1f} s" if saving else \
        f"step {state.step} was saved already"
    raise Preempted(f"{signalled}: {saved}; start the run again to continue from it")


def roll_back(cfg: Config, state: TrainState, ckpt_dir, engine, model, groups, ctx, saver, rng,
              supervisor: Supervisor, log: Callable[[str], None]) -> bool:
    """fault.on_bad_steps=rollback: reload the newest checkpoint from before the bad streak.

    The weights and optimizer go back to that checkpoint; the data does not, so the window of
    data that produced the bad steps is skipped. Checkpoints saved during the streak are
    retired, so a crash before the next save resumes from the target, not from the streak.
    Returns False when rolling back is not configured, not possible or used up (the caller
    then stops the run).
    """
    guard = supervisor.guard
    if cfg.fault.on_bad_steps != "rollback" or guard.state["rollbacks"] >= cfg.fault.max_rollbacks:
        return False
    saver.wait()
    first_bad = state.step - guard.in_row + 1
    supervisor.progress(state.step, "rollback")
    target = rollback_target(cfg, ckpt_dir, first_bad, ctx, log)
    if target is None:
        return False
    loaded = resume(target, engine, model, cfg, groups, ctx, saver, rng, log)
    skipped_rows = state.rows_consumed - loaded.rows_consumed
    guard.state.update(in_row=0, rollbacks=guard.state["rollbacks"] + 1, window=loaded.bad_steps.get("window", []))
    log(f"rollback {guard.state['rollbacks']}/{cfg.fault.max_rollbacks}: weights and optimizer back to "
        f"{target.name}; the data goes on from row {state.rows_consumed:,} ({skipped_rows:,} rows skipped)")
    state.step, state.checkpoint_errors = loaded.step, max(state.checkpoint_errors, loaded.checkpoint_errors)
    state.bad_steps = guard.state
    return True
