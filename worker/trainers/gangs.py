"""The member bookkeeping every fused trainer's `train_many` shares (issue 12; docs/gated_rnn.md has the
contract): one rule a function, so the gangs of perturbation, learning_rules, sparse_rnn and snn_ddqn keep
it alike.

How to read it, in the order a `train_many` uses it: `check` its arguments (one ctx per config, one fuse
key); `start` each member as its solo run starts it, where a member whose start fails (an unreadable
checkpoint, an env that cannot be made) fails alone; `by_start` runs one gang per step the members resume
from, one after the other (a gang steps all its members at once, so it joins only members at one step);
inside a gang, `checkpoint_or_leave` is a step's end as each solo loop has it, and `finished` a member's
result, marked "fused", or the exception that finishing it raised.

Outcomes go by the member's index in `cfgs` (or its row in its gang) into a dict or list the caller owns.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, MutableMapping, MutableSequence, Sequence
from typing import Any, TypeVar

Member = TypeVar("Member")
Outcomes = MutableMapping[int, Any] | MutableSequence[Any]  # by index: a result, {"stopped_at": ...}, or an exception


def check(cfgs: Sequence, ctxs: Sequence, fuse_key: Callable[[Any], str | None], shares: str,
          unfused: str | None = None) -> None:
    """train_many's arguments: one ctx per config, at least one; all of one fuse key (`shares`: what they
    would share, in the error); `unfused`: the error for a config that is never fused (fuse key None)."""
    if len(cfgs) != len(ctxs) or not cfgs:
        raise ValueError(f"train_many needs one ctx per config (got {len(cfgs)} configs, {len(ctxs)} ctxs)")
    keys = {fuse_key(c) for c in cfgs}
    if unfused is not None and None in keys:
        raise ValueError(unfused)
    if len(keys) > 1:
        raise ValueError(f"configs of different fuse keys cannot share {shares}: {sorted(keys)}")


def start(cfgs: Sequence, ctxs: Sequence, start_one: Callable[[Any, Any], Member],
          outcome: Outcomes) -> list[tuple[int, Member]]:
    """(index, start_one(cfg, ctx)) of each member whose start succeeds; one whose start raises gets the
    exception as its outcome and trains no further."""
    started = []
    for i, (cfg, ctx) in enumerate(zip(cfgs, ctxs)):
        try:
            started.append((i, start_one(cfg, ctx)))
        except Exception as exc:  # noqa: BLE001 - e.g. an unreadable checkpoint fails its member only
            outcome[i] = exc
    return started


def by_start(started: list[tuple[int, Member]], key: Callable[[Member], Hashable],
             gang: Callable[[list[Member]], dict[int, Any]], outcome: Outcomes) -> None:
    """One gang per key (the step a member resumes from, and whatever else a gang must share), in key
    order; gang(members) trains them to their ends and gives each one's outcome by its row in `members`."""
    groups: dict[Hashable, list[tuple[int, Member]]] = {}
    for i, member in started:
        groups.setdefault(key(member), []).append((i, member))
    for _key, group in sorted(groups.items()):
        for row, result in gang([member for _, member in group]).items():
            outcome[group[row][0]] = result


def checkpoint_or_leave(members: Sequence, leaving: dict[int, Any], step: int, save: Callable[[int], None],
                        due: Callable[[Any], bool], last: bool = False) -> None:
    """A step's end for each member (by row; each has .ctx) not already in `leaving`, as its solo loop: it
    checkpoints (save(row)) when due(member) or its ctx.should_stop(); asked to stop, it leaves with
    {"stopped_at": step}, unless this is the `last` step (its result follows). A failing checkpoint or
    should_stop ends that member only, with its exception."""
    for row, m in enumerate(members):
        if row in leaving:
            continue
        try:
            if due(m) or m.ctx.should_stop():
                save(row)
                if m.ctx.should_stop() and not last:
                    leaving[row] = {"stopped_at": step}
        except Exception as exc:  # noqa: BLE001 - this member's failure ends this member only
            leaving[row] = exc


def finished(result: Callable[[], dict]) -> dict | Exception:
    """A member's result as its solo run returns it, plus "fused": True; or the exception that making it
    raised (e.g. writing its weights failed), which fails that member only."""
    try:
        return {**result(), "fused": True}
    except Exception as exc:  # noqa: BLE001
        return exc


def leave(ctx, outcome):
    """Tell the agent at once that this member is done (a gang child's ctx has `leave`; a solo one does not)."""
    tell = getattr(ctx, "leave", None)
    if tell is not None:
        tell(outcome)
    return outcome


def lockstep(active: list[int], outcome: Outcomes, ctxs: Sequence, act: Callable[[int], Any]) -> None:
    """One pass over the active members, for trainers that step members one by one: `act(i)` returns member
    i's outcome (None: it goes on) or raises (its failure ends it alone); an ended member leaves at once."""
    for i in list(active):
        try:
            outcome[i] = act(i)
        except Exception as exc:  # noqa: BLE001 - this member's failure ends this member only
            outcome[i] = exc
        if outcome[i] is not None:
            leave(ctxs[i], outcome[i])
            active.remove(i)
