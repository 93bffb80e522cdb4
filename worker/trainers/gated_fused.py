"""Fused training for gated_rnn: a gang of same-shape configs trained as one stacked model.

How to read it: `train_many` groups the members by the step they resume from and runs each group with
`_Gang.run`, the loop (one step for all members, then each member's own reports, checkpoint, stop and
failure, as `gated_rnn.train` does them). `_Gang` holds the stacked tensors; `_forward` is GatedLayer over
a leading member dimension; `_to_solo`/`_from_solo` convert one member between the stacked layout and the
solo checkpoint format, so a member can resume solo or in a gang.

Each parameter is stacked over the members that have it: the shared ones over all, a gate over its users
only, and a gate runs on its users' rows (members without it keep the value the solo layer has without
it: the input unchanged for the input/state/forget gates, swish instead of the output gate). The readout
reads the slots (new state, old state, x) that some member of the gang uses, a member's unused ones
zeroed, so its padded columns get exactly zero gradient and Adam leaves them as they are. The head and the
loss run in `_HeadLoss`, a few members at a time, so the gang's logits never leave the cache (the
profile, at batch 256: docs/gated_rnn.md, Fused training). Each member's numbers therefore equal its solo
run to float tolerance, and members are independent rows of batched matmuls: a member whose loss turns
NaN cannot touch the others.

Gangs join only members at the same step (a member resumed from step 1000 is not ganged with one at 0):
`train_many` runs one gang per distinct start step, one after the other.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from worker.trainers import gated_rnn
from worker.trainers.gated_rnn import Config, Diverged, GatedRNN, fuse_key

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the solo run uses
SLOTS = ("use_new_state", "use_old_state", "use_residual")  # the readout's inputs, in the solo order
GATES = ("input_gate", "state_gate", "forget_gate", "output_gate")


def _slots(cfg: Config) -> list[int]:
    """The readout inputs (indices into SLOTS) this member's solo readout reads, in the solo order."""
    return [slot for slot, name in enumerate(SLOTS) if getattr(cfg, name)]


def _columns(cfg: Config, size: int, slots: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """For the two weights whose solo width depends on the flags: the stacked columns of the solo ones,
    in a gang whose readout reads `slots` (the slots any member uses, in the solo order)."""
    reads = torch.cat([torch.arange(at * size, (at + 1) * size) for at in map(slots.index, _slots(cfg))])
    return {"readout.weight": reads, "output_gate.weight": torch.cat([torch.arange(size), size + reads])}


def _gate(name: str) -> str | None:
    """"layers.0.input_gate" for "layers.0.input_gate.weight"; None for parameters every member has."""
    prefix = name.rsplit(".", 1)[0]
    return prefix if prefix.split(".")[-1] in GATES else None


def _shapes(cfg: Config, slots: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The member's parameters in the stacked layout: its own gates only, the readout `slots` wide."""
    s, v, r = cfg.state_size, gated_rnn.VOCAB, len(slots) * cfg.state_size
    layer = {"candidate": (s, 2 * s), "input_gate": (2 * s, 2 * s), "state_gate": (s, 3 * s),
             "forget_gate": (s, 3 * s), "readout": (s, r), "output_gate": (s, s + r)}
    shapes = {"embed.weight": (s, v), "embed.bias": (s,), "head.weight": (v, s), "head.bias": (v,)}
    for i in range(cfg.n_layers):
        for name, (out, inp) in layer.items():
            if name in GATES and not getattr(cfg, "use_" + name):
                continue
            shapes[f"layers.{i}.{name}.weight"] = (out, inp)
            shapes[f"layers.{i}.{name}.bias"] = (out,)
    return shapes


def _from_solo(solo: dict[str, torch.Tensor], cfg: Config, slots: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """A solo state dict (model weights or an Adam moment) in the stacked layout; what it lacks is zeros."""
    columns = _columns(cfg, cfg.state_size, slots)
    full = {}
    for name, shape in _shapes(cfg, slots).items():
        full[name] = torch.zeros(shape)
        if name in solo:
            cols = columns.get(name.split(".", 2)[-1]) if name.startswith("layers.") else None
            if cols is None:
                full[name].copy_(solo[name])
            else:
                full[name][:, cols] = solo[name].float()
    return full


def _to_solo(full: dict[str, torch.Tensor], names: list[str], cfg: Config,
             slots: tuple[int, ...]) -> dict[str, torch.Tensor]:
    columns = _columns(cfg, cfg.state_size, slots)
    solo = {}
    for name in names:
        cols = columns.get(name.split(".", 2)[-1]) if name.startswith("layers.") else None
        solo[name] = (full[name] if cols is None else full[name][:, cols]).detach().clone()
    return solo


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """nn.Linear per member: x [M, B, in], weight [M, out, in], bias [M, out]."""
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


def _forward(p: dict[str, torch.Tensor], users: dict[str, torch.Tensor], slot_ids: tuple[int, ...],
             mask: torch.Tensor | None, byte: torch.Tensor,
             states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """GatedRNN.forward up to the head, for M members at once: byte [M, B], states [M, B, S] per layer;
    returns the head's input and the new states. A gate runs on the rows of its users only
    (`users[gate]`, absent when no member has it); the others keep the value the solo layer has without
    it. The readout reads the `slot_ids` slots, times `mask` (a member's unused slots: 0) when some
    member does not use them all."""
    members = byte.shape[0]
    # embed(one_hot(byte)) as a lookup in the members' tables laid end to end
    table = p["embed.weight"].transpose(1, 2).reshape(members * gated_rnn.VOCAB, -1)
    offsets = torch.arange(members, device=byte.device).unsqueeze(1) * gated_rnn.VOCAB
    x = F.embedding(byte + offsets, table) + p["embed.bias"].unsqueeze(1)
    size = x.shape[-1]
    new_states = []
    for i, state in enumerate(states):
        w = lambda name: (p[f"layers.{i}.{name}.weight"], p[f"layers.{i}.{name}.bias"])  # noqa: E731
        rows = lambda name: users.get(f"layers.{i}.{name}")  # noqa: E731
        pick = lambda t, r: t if r.numel() == members else t.index_select(0, r)  # noqa: E731
        put = lambda t, r, v: v if r.numel() == members else t.index_copy(0, r, v)  # noqa: E731
        xs = torch.cat([x, state], dim=-1)
        if (r := rows("input_gate")) is not None:
            sel = pick(xs, r)
            xs = put(xs, r, sel * torch.sigmoid(_linear(sel, *w("input_gate"))))
        new = torch.tanh(_linear(xs, *w("candidate")))
        if (r := rows("state_gate")) is not None:
            sel_new, sel_state = pick(new, r), pick(state, r)
            z = torch.sigmoid(_linear(torch.cat([pick(xs, r), sel_new], dim=-1), *w("state_gate")))
            new = put(new, r, z * sel_new + (1.0 - z) * sel_state)
        if (r := rows("forget_gate")) is not None:
            sel_new = pick(new, r)
            forget = torch.sigmoid(_linear(torch.cat([pick(xs, r), sel_new], dim=-1), *w("forget_gate")))
            new = put(new, r, forget * sel_new)
        inputs = (new, xs[..., size:], x)
        reads = torch.cat([inputs[slot] for slot in slot_ids], dim=-1) if len(slot_ids) > 1 else inputs[slot_ids[0]]
        if mask is not None:
            reads = reads * mask
        y = _linear(reads, *w("readout"))
        x = F.silu(y)
        if (r := rows("output_gate")) is not None:
            sel_y = pick(y, r)
            x = put(x, r, sel_y * torch.sigmoid(_linear(torch.cat([sel_y, pick(reads, r)], dim=-1), *w("output_gate"))))
        new_states.append(new)
    return x, new_states


class _HeadLoss(torch.autograd.Function):
    """Each member's head and mean cross-entropy, loss[m] = CE(x[m] @ W[m]^T + b[m], target[m]), a few
    members at a time: a gang's logits ([M, B, 256]: 4 MB at batch 256) would leave the cache between
    the five passes autograd makes over them (bias copy, log_softmax, its backward, nll's zero fill and
    scatter), where one member's chunk stays in it, as in the solo run (on a GPU all members are one chunk).
    The gradient (softmax - onehot) / B is formed in the same chunk in the forward and kept; backward only
    scales it by each loss's grad."""

    CHUNK_BYTES = 1 << 19  # the logits of one chunk: half of this machine's L2 per core

    @staticmethod
    def forward(ctx, x, weight, bias, target):
        members, batch, vocab = x.shape[0], x.shape[1], weight.shape[1]
        chunk = max(1, _HeadLoss.CHUNK_BYTES // (batch * vocab * x.element_size()))
        if x.device.type != "cpu":  # on a GPU a launch per kernel costs more than the traffic: one chunk
            chunk = members
        loss = x.new_empty(members)
        grad_x, grad_w, grad_b = torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)
        buffer = x.new_empty(min(chunk, members), batch, vocab)
        for lo in range(0, members, chunk):
            hi = min(lo + chunk, members)
            logits = torch.baddbmm(bias[lo:hi].unsqueeze(1), x[lo:hi], weight[lo:hi].transpose(1, 2),
                                   out=buffer[: hi - lo])
            logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))  # log_softmax, in place
            picked = target[lo:hi].unsqueeze(-1)
            loss[lo:hi] = logits.gather(-1, picked).squeeze(-1).mean(dim=1).neg_()
            grad = logits.exp_()  # softmax
            grad.scatter_add_(-1, picked, grad.new_full(picked.shape, -1.0)).div_(batch)
            torch.bmm(grad, weight[lo:hi], out=grad_x[lo:hi])
            torch.bmm(grad.transpose(1, 2), x[lo:hi], out=grad_w[lo:hi])
            torch.sum(grad, dim=1, out=grad_b[lo:hi])
        ctx.save_for_backward(grad_x, grad_w, grad_b)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        scale = grad_loss.view(-1, 1, 1)
        return grad_x * scale, grad_w * scale, grad_b * grad_loss.view(-1, 1), None


@dataclass
class _Member:
    cfg: Config
    ctx: Any
    sampler: torch.Generator
    names: list[str]  # the solo model's parameters, in its order (the Adam state's indices)
    trained: set[str]  # those that get a gradient in the solo run (the others have no Adam state there)
    param_groups: list[dict]
    parameters: int
    torch_rng: torch.Tensor  # the global RNG after the solo init; training draws nothing from it
    avg: float = 3.0
    min_loss: float = float("inf")
    curve: list = field(default_factory=list)
    elapsed: float = 0.0
    start_time: float = 0.0


def _solo_template(cfg: Config, seed: int) -> tuple[GatedRNN, torch.Tensor, set[str]]:
    """The member's solo model, initialised as `train` does, and which parameters get gradients."""
    torch.manual_seed(seed)
    model = GatedRNN(cfg)
    rng = torch.get_rng_state()
    size = cfg.state_size
    logits, _ = model(torch.zeros(1, dtype=torch.long), [torch.zeros(1, size) for _ in range(cfg.n_layers)])
    logits.sum().backward()  # the graph's shape, not its values, decides which parameters train
    trained = {name for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return model, rng, trained


class _Gang:
    def __init__(self, cfgs: list[Config], ctxs: list, states: list[dict | None], data: torch.Tensor,
                 device: torch.device):
        self.data, self.device, self.cfg = data, device, cfgs[0]
        self.members: list[_Member] = []
        # The readout reads only the slots some member uses (a gang of old-state-only members: 1 of 3 wide).
        self.slot_ids = tuple(sorted({slot for cfg in cfgs for slot in _slots(cfg)}))
        params, moments, hidden, starts = [], [], [], []
        for cfg, ctx, state in zip(cfgs, ctxs, states):
            model, rng, trained = _solo_template(cfg, ctx.seed)
            names = [name for name, _ in model.named_parameters()]
            groups = torch.optim.Adam(model.parameters(), lr=cfg.lr).state_dict()["param_groups"]
            member = _Member(cfg, ctx, torch.Generator().manual_seed(ctx.seed), names, trained, groups,
                             sum(p.numel() for p in model.parameters()), rng, start_time=time.time())
            solo, exp_avg, exp_avg_sq = model.state_dict(), {}, {}
            if state is not None:
                solo = state["model"]
                for index, entry in state["optimizer"]["state"].items():
                    exp_avg[names[index]], exp_avg_sq[names[index]] = entry["exp_avg"], entry["exp_avg_sq"]
                member.sampler.set_state(state["sampler"])
                member.torch_rng = state["torch_rng"]
                member.avg, member.min_loss, member.curve = state["avg"], state["min_loss"], state["curve"]
                member.elapsed, member.start_time = state["elapsed"], state.get("start_time", member.start_time)
                hidden.append(state["hidden"])
                starts.append(state["starts"])
            params.append(_from_solo(solo, cfg, self.slot_ids))
            moments.append((_from_solo(exp_avg, cfg, self.slot_ids), _from_solo(exp_avg_sq, cfg, self.slot_ids)))
            self.members.append(member)
        # Each parameter is stacked over the members that have it (a gate: its users, in member order).
        names = list(dict.fromkeys(name for member in params for name in member))
        self.users = {name: [row for row, member in enumerate(params) if name in member] for name in names}
        stack = lambda dicts, name: torch.stack([d[name] for d in dicts if name in d]).to(device)  # noqa: E731
        self.params = {name: stack(params, name).requires_grad_() for name in names}
        self.exp_avg = {name: stack([m[0] for m in moments], name) for name in names}
        self.exp_avg_sq = {name: stack([m[1] for m in moments], name) for name in names}
        self.avg = torch.tensor([m.avg for m in self.members], device=device)
        self._index_users()
        self.step = states[0]["step"] if states[0] is not None else 0
        self.pos = states[0]["window_pos"] if states[0] is not None else 0
        self.hidden = ([torch.stack(layer).to(device) for layer in zip(*hidden)] if hidden else None)
        self.starts = torch.stack(starts) if starts and starts[0] is not None else None

    def _index_users(self) -> None:
        """The device-side views of `users`: row indices per gate, and the readout's slot mask (None when
        every member reads every slot of the gang's readout)."""
        d, size = self.device, self.cfg.state_size
        self.gate_rows = {_gate(name): torch.tensor(rows, dtype=torch.long, device=d)
                          for name, rows in self.users.items() if _gate(name) is not None}
        used = [[float(slot in _slots(m.cfg)) for slot in self.slot_ids] for m in self.members]
        mask = torch.tensor(used, device=d).view(-1, len(self.slot_ids))
        self.mask = None if bool(mask.all()) else mask.repeat_interleave(size, dim=1).unsqueeze(1)

    def keep(self, rows: list[int]) -> None:
        """Only these members go on (the others left: finished, stopped, diverged or failed)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.device)
        new_row = {old: new for new, old in enumerate(rows)}
        self.members = [self.members[i] for i in rows]
        for name in list(self.params):
            kept = [j for j, row in enumerate(self.users[name]) if row in new_row]
            if not kept:  # the last member with this gate left
                for tensors in (self.params, self.exp_avg, self.exp_avg_sq, self.users):
                    del tensors[name]
                continue
            at = torch.tensor(kept, dtype=torch.long, device=self.device)
            self.params[name] = self.params[name].detach()[at].requires_grad_()
            self.exp_avg[name], self.exp_avg_sq[name] = self.exp_avg[name][at], self.exp_avg_sq[name][at]
            self.users[name] = [new_row[self.users[name][j]] for j in kept]
        self.avg = self.avg[index]
        self._index_users()
        if self.hidden is not None:
            self.hidden = [h[index] for h in self.hidden]
        if self.starts is not None:
            self.starts = self.starts[rows]

    def _adam(self) -> None:
        """torch.optim.Adam's update with a learning rate per member: torch's fused Adam kernel (what
        Adam(fused=True) runs) over each member's rows, one call per distinct lr. It works through a
        member's tensors one at a time, so on a CPU they stay in cache, as in the solo run."""
        (beta1, beta2), by_lr = BETAS, {}
        lrs = [m.cfg.lr for m in self.members]
        for name, p in self.params.items():
            if p.grad is None:  # no member's loss reaches it (as torch's Adam, skip it)
                continue
            # unbind: every member's row view in one call (indexing row by row cost ~1 us a view)
            rows = zip(self.users[name], p.detach().unbind(), p.grad.unbind(), self.exp_avg[name].unbind(),
                       self.exp_avg_sq[name].unbind())
            for row, *views in rows:
                for tensors, t in zip(by_lr.setdefault(lrs[row], ([], [], [], [])), views):
                    tensors.append(t)
        step = torch.tensor(float(self.step + 1), device=self.device)  # the kernel reads it, does not add
        for lr, (params, grads, exp_avg, exp_avg_sq) in by_lr.items():
            torch._fused_adam_(params, grads, exp_avg, exp_avg_sq, [], [step] * len(params), lr=lr,
                               beta1=beta1, beta2=beta2, weight_decay=0.0, eps=EPS, amsgrad=False,
                               maximize=False)
        for p in self.params.values():
            p.grad = None

    def train_step(self) -> torch.Tensor:
        cfg, members = self.cfg, len(self.members)
        if self.pos == 0:  # a new window for every member: its own offsets, state reset
            high = len(self.data) - cfg.history + 1
            self.starts = torch.stack([torch.randint(0, high, (cfg.batch_size,), generator=m.sampler)
                                       for m in self.members])
            self.hidden = [torch.zeros(members, cfg.batch_size, cfg.state_size, device=self.device)
                           for _ in range(cfg.n_layers)]
        index = self.starts.to(self.device) + self.pos
        x, hidden = _forward(self.params, self.gate_rows, self.slot_ids, self.mask, self.data[index], self.hidden)
        loss = _HeadLoss.apply(x, self.params["head.weight"], self.params["head.bias"], self.data[index + 1])
        loss.sum().backward()  # members share no parameter: each gets its own solo gradient
        self._adam()
        self.hidden = [h.detach() for h in hidden]  # no BPTT
        self.avg = 0.95 * self.avg + 0.05 * loss.detach()
        self.step += 1
        self.pos = (self.pos + 1) % (cfg.history - 1)
        return loss.detach()

    def checkpoint(self, row: int) -> None:
        m = self.members[row]
        full = lambda tensors: {n: t[self.users[n].index(row)].cpu() for n, t in tensors.items()  # noqa: E731
                                if row in self.users[n]}
        model = _to_solo(full(self.params), m.names, m.cfg, self.slot_ids)
        exp_avg = _to_solo(full(self.exp_avg), m.names, m.cfg, self.slot_ids)
        exp_avg_sq = _to_solo(full(self.exp_avg_sq), m.names, m.cfg, self.slot_ids)
        step = torch.tensor(float(self.step))
        optimizer = {"state": {i: {"step": step.clone(), "exp_avg": exp_avg[n], "exp_avg_sq": exp_avg_sq[n]}
                               for i, n in enumerate(m.names) if n in m.trained and self.step > 0},
                     "param_groups": m.param_groups}
        m.ctx.save_checkpoint({
            "step": self.step, "window_pos": self.pos, "starts": None if self.starts is None else self.starts[row],
            "hidden": None if self.hidden is None else [h[row].cpu() for h in self.hidden],
            "avg": float(self.avg[row]), "min_loss": m.min_loss, "curve": m.curve,
            "elapsed": m.elapsed + time.monotonic() - self.began, "start_time": m.start_time,
            "model": model, "optimizer": optimizer, "sampler": m.sampler.get_state(), "torch_rng": m.torch_rng,
        })

    def run(self) -> dict[int, dict | Exception]:
        """Train to the end; the outcome of each member by its row at the start."""
        ids = {id(m): row for row, m in enumerate(self.members)}
        outcome: dict[int, dict | Exception] = {}
        self.began = time.monotonic()
        end = self.cfg.end_step
        while self.members and self.step < end:
            loss = self.train_step()
            leaving = {}
            logged = [row for row, m in enumerate(self.members)
                      if self.step % m.cfg.log_every == 0 or self.step == end]
            values = self.avg[logged].tolist() if logged else []
            raws = loss[logged].tolist() if logged else []
            for row, value, raw in zip(logged, values, raws):
                m = self.members[row]
                try:
                    self._log(m, value, raw, end)
                except Exception as exc:  # noqa: BLE001 - this member's failure ends this member only
                    leaving[row] = exc
            for row, m in enumerate(self.members):
                if row in leaving:
                    continue
                try:
                    if self.step % m.cfg.checkpoint_every == 0 or m.ctx.should_stop():
                        self.checkpoint(row)
                        if m.ctx.should_stop():
                            leaving[row] = {"stopped_at": self.step}
                except Exception as exc:  # noqa: BLE001
                    leaving[row] = exc
            if leaving:
                for row, result in leaving.items():
                    outcome[ids[id(self.members[row])]] = result
                    if hasattr(self.members[row].ctx, "leave"):  # a gang's ctx: the agent finishes it now
                        self.members[row].ctx.leave(result)
                self.keep([row for row in range(len(self.members)) if row not in leaving])
        for row, m in enumerate(self.members):
            outcome[ids[id(m)]] = self._result(row, m)
        return outcome

    def _log(self, m: _Member, value: float, raw: float, end: int) -> None:
        """As the solo loop at a log point: the curve, the report, progress, and a diverged loss ends it."""
        if self.step % m.cfg.log_every == 0 or m.cfg.steps_mode == "exact" or not m.curve:
            m.min_loss = min(m.min_loss, value)
            m.curve.append([self.step, value])
        m.ctx.report(self.step, loss=value, raw_loss=raw)
        m.ctx.progress(self.step, end)
        if not math.isfinite(value):
            raise Diverged(self.step, value)

    def _result(self, row: int, m: _Member) -> dict:
        cfg = m.cfg
        return {
            "min_loss": m.min_loss, "final_loss": float(self.avg[row]), "steps": self.step, "steps_asked": cfg.steps,
            "steps_mode": cfg.steps_mode, "loss_curve": m.curve,
            "seconds": round(m.elapsed + time.monotonic() - self.began, 2), "parameters": m.parameters,
            "start_time": m.start_time, "end_time": time.time(), "batch_size": cfg.batch_size,
            "history_size": cfg.history, "dataset": gated_rnn.dataset_name(cfg.corpus), "fused": True,
        }


def train_many(cfgs: list[Config], ctxs: list) -> list[dict | Exception]:
    """Train same-fuse-key configs as one stacked model; each entry is that member's result (as `train`
    returns it, plus "fused": True), {"stopped_at": step}, or the exception that ended it."""
    if len(cfgs) != len(ctxs) or not cfgs:
        raise ValueError(f"train_many needs one ctx per config (got {len(cfgs)} configs, {len(ctxs)} ctxs)")
    keys = {fuse_key(c) for c in cfgs}
    if len(keys) > 1:
        raise ValueError(f"configs of different fuse keys cannot share a model: {sorted(keys)}")
    device = torch.device(ctxs[0].device)
    data = gated_rnn.load_corpus(cfgs[0].corpus, cfgs[0].corpus_bytes).to(device)
    if len(data) < cfgs[0].history:
        raise ValueError(f"corpus has {len(data)} bytes; it needs at least history={cfgs[0].history}")
    outcome: list[dict | Exception | None] = [None] * len(cfgs)
    by_step: dict[int, list[tuple[int, dict | None]]] = {}
    for i, ctx in enumerate(ctxs):
        try:
            state = ctx.load_checkpoint()
        except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint fails its member only
            outcome[i] = exc
            continue
        by_step.setdefault(0 if state is None else state["step"], []).append((i, state))
    for _step, group in sorted(by_step.items()):
        rows = [i for i, _ in group]
        gang = _Gang([cfgs[i] for i in rows], [ctxs[i] for i in rows], [s for _, s in group], data, device)
        for row, result in gang.run().items():
            outcome[rows[row]] = result
    return outcome
