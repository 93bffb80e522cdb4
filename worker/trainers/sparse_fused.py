"""Fused training for sparse_rnn: a gang of same-layout block models trained as one stacked model.

How to read it: `train_many` groups the members by the step (and representation) they resume from and
runs each group with `_Gang.run` (gangs.py: the bookkeeping all fused trainers share), the loop: one batch for all members, then each member's own reports,
validation, checkpoint, stop and failure, as `sparse_rnn.train` does them. `_Gang._build` stacks the
members' tensors; `_forward` is BlockRNN.forward over a leading member dimension; `_checkpoint` writes a
member back into its solo model, so its checkpoint is the solo format and it can resume solo or in a gang.

Every member is built by `sparse_rnn.build_model` from its own seed (its own blocks, W0, masks, bias),
loads its own data (`load_data(cfg, seed)`: the offline RandomAnomaly task is drawn from the seed) and
keeps its own shuffle generator, lr, loss window, curves and result. Members of one fuse key share the
layout, sizes, batch size and run length, so step, epoch and position in the epoch are the gang's; only
the order within an epoch is each member's. Batches are padded to the longest sequence over the members:
a step's output reads only earlier steps, and the loss reads each member's own lengths, so the padding
changes nothing.

Representations: "dense" stacks W0, U, mask as [M, rows, N] and runs one `torch.bmm` per sequence step;
"sparse" lays the members' CSR matrices block-diagonally into one CSR matrix (blocks.py's sparse matmul,
its backward too), so one kernel serves all members and no member's entries touch another's. Adam is
torch's own `adam` function over each member's tensors, one call per distinct lr: the solo optimizer's
code on the same numbers.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.adam import adam

from worker.trainers import gangs, sparse_rnn
from worker.trainers.gated_rnn import Diverged
from worker.trainers.iterativenn.baselines import ReadUnits
from worker.trainers.iterativenn.blocks import BlockRNN, _CSRMatmul
from worker.trainers.iterativenn.data import Batch, pad
from worker.trainers.sparse_rnn import Config, fuse_key

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the solo run uses


@dataclass
class _Member:
    cfg: Config
    ctx: Any
    data: Any  # its SequenceData
    model: Any  # the solo model (CPU): the template its checkpoints are written from
    block: BlockRNN
    facts: dict
    shuffler: torch.Generator
    param_groups: list[dict]
    names: list[str]  # its trainable parameters in the solo optimizer's order ("bias", "U")
    moments: dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (exp_avg, exp_avg_sq), solo shapes
    steps: list[torch.Tensor]  # Adam's step per parameter, on the CPU as the solo optimizer keeps them
    order: list[int] | None = None
    window: list[float] = field(default_factory=list)
    curve: list = field(default_factory=list)
    val_curve: list = field(default_factory=list)
    min_val: float = float("inf")
    elapsed: float = 0.0


def _member(cfg: Config, ctx, state: dict | None, data, device: torch.device) -> _Member:
    model, facts = sparse_rnn.build_model(cfg, data, ctx.seed, device.type,
                                          state["representation"] if state else None)
    block = model.model if isinstance(model, ReadUnits) else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = torch.optim.Adam(trainable, lr=cfg.learning_rate).state_dict()["param_groups"]
    names = [name for name, p in block.named_parameters() if p.requires_grad]
    moments = {n: (torch.zeros_like(getattr(block, n)), torch.zeros_like(getattr(block, n))) for n in names}
    steps = [torch.tensor(0.0) for _ in names]
    m = _Member(cfg, ctx, data, model, block, facts, torch.Generator().manual_seed(ctx.seed), groups, names,
                moments, steps)
    if state is not None:
        model.load_state_dict(state["model"])
        for index, entry in state["optimizer"]["state"].items():
            m.moments[names[index]] = (entry["exp_avg"].clone(), entry["exp_avg_sq"].clone())
            m.steps[index] = entry["step"].clone().float()
        m.shuffler.set_state(state["shuffler"])
        m.order, m.window, m.curve, m.val_curve = state["order"], state["window"], state["curve"], state["val_curve"]
        m.min_val, m.elapsed = state["min_val_loss"], state["elapsed"]
    return m


def _block_diagonal(blocks: list[BlockRNN]) -> dict[str, torch.Tensor]:
    """The members' CSR structures laid along one diagonal: [M * rows, M * N] and its transpose."""
    rows, n = blocks[0].rows, blocks[0].n
    crow, col, crow_t, col_t, perm_t, nnz = [torch.zeros(1, dtype=torch.long)], [], [torch.zeros(1, dtype=torch.long)], [], [], 0
    for k, b in enumerate(blocks):
        crow.append(b.crow[1:] + nnz)
        col.append(b.col + k * n)
        crow_t.append(b.crow_t[1:] + nnz)
        col_t.append(b.col_t + k * rows)
        perm_t.append(b.perm_t + nnz)
        nnz += b.W0.numel()
    cat = lambda parts: torch.cat(parts)  # noqa: E731
    return {"crow": cat(crow), "col": cat(col), "crow_t": cat(crow_t), "col_t": cat(col_t), "perm_t": cat(perm_t)}


class _Gang:
    def __init__(self, members: list[_Member], state: dict | None, device: torch.device, total_steps: int):
        self.device, self.total = device, total_steps
        self.cfg = members[0].cfg
        self.kind, self.position = _loss_of(self.cfg, members[0].data)
        self.step = state["step"] if state else 0
        self.epoch = state["epoch"] if state else 0
        self.pos = state["pos"] if state else 0
        self._build(members)

    # ---- the stacked tensors ---------------------------------------------------------------------------
    def _build(self, members: list[_Member]) -> None:
        """Stack the members' current values (from their solo models and moments) on the device."""
        self.members = members
        blocks = [m.block for m in members]
        first, d = blocks[0], self.device
        self.rep = first.representation
        self.segments = first.segments
        self.acts = first.acts
        self.n_in, self.n_out, self.rows, self.n = first.n_in, first.n_out, first.rows, first.n
        self.bias_rows = first.bias_rows.to(d) if first.bias_mask is not None else None
        self.units = (members[0].model.start, members[0].model.stop) if isinstance(members[0].model, ReadUnits) else None
        if self.rep == "dense":
            join = lambda ts: torch.stack(ts).to(d)  # noqa: E731
            self.spans = None
        else:
            join = lambda ts: torch.cat(ts).to(d)  # noqa: E731
            sizes = [b.W0.numel() for b in blocks]
            starts = [sum(sizes[:k]) for k in range(len(sizes))]
            self.spans = [slice(s, s + size) for s, size in zip(starts, sizes)]
            self.csr = {k: v.to(d) for k, v in _block_diagonal(blocks).items()}
        self.W0 = join([b.W0 for b in blocks])
        self.mask = join([b.mask for b in blocks])
        self.names = members[0].names
        self.params = {}
        self.exp_avg, self.exp_avg_sq = {}, {}
        for name in self.names:
            stack = join if name == "U" else (lambda ts: torch.stack(ts).to(d))  # noqa: E731
            self.params[name] = stack([getattr(b, name).detach() for b in blocks]).clone().requires_grad_()
            self.exp_avg[name] = stack([m.moments[name][0] for m in members]).clone()
            self.exp_avg_sq[name] = stack([m.moments[name][1] for m in members]).clone()

    def _part(self, name: str, tensor: torch.Tensor, row: int) -> torch.Tensor:
        """Member `row`'s share of a stacked tensor (a view): a row, or its span of the CSR values."""
        return tensor[self.spans[row]] if name == "U" and self.spans is not None else tensor[row]

    def _sync(self) -> None:
        """Write every member's current weights and moments back into its solo model and moments."""
        with torch.no_grad():
            for row, m in enumerate(self.members):
                for name in self.names:
                    getattr(m.block, name).copy_(self._part(name, self.params[name], row))
                    m.moments[name] = (self._part(name, self.exp_avg[name], row).detach().cpu().clone(),
                                       self._part(name, self.exp_avg_sq[name], row).detach().cpu().clone())

    def keep(self, rows: list[int]) -> None:
        """Only these members go on (the others left: stopped, diverged or failed)."""
        self._sync()
        if rows:
            self._build([self.members[r] for r in rows])
        else:
            self.members = []

    # ---- one step -------------------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """BlockRNN.forward for M members: x [M, B, T, n_in] -> y [M, B, T, n_out]."""
        members, batch, steps, _ = x.shape
        weight = self.W0 + self.params["U"] * self.mask  # once per sequence, as the solo model
        rest = torch.zeros(members, batch, self.rows, device=x.device, dtype=x.dtype)
        bias = self.params.get("bias")
        if bias is not None:
            bias = (bias if self.bias_rows is None else bias * self.bias_rows).unsqueeze(1)
        outputs = []
        for t in range(steps):
            z = torch.cat([x[:, :, t], rest], dim=2)
            if self.rep == "dense":
                pre = torch.bmm(z, weight.transpose(1, 2))
            else:  # one block-diagonal CSR matmul: [M * rows, M * N] @ [M * N, B]
                c = self.csr
                zt = z.transpose(1, 2).reshape(members * self.n, batch)
                pre = _CSRMatmul.apply(weight, zt, c["crow"], c["col"], c["crow_t"], c["col_t"], c["perm_t"],
                                       members * self.rows, members * self.n)
                pre = pre.view(members, self.rows, batch).transpose(1, 2)
            if bias is not None:
                pre = pre + bias
            rest = self._activate(pre)
            outputs.append(rest[..., -self.n_out:])
        y = torch.stack(outputs, dim=2)
        return y if self.units is None else y[..., self.units[0]:self.units[1]]

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        if all(name == "identity" for _, _, name in self.segments):
            return pre
        return torch.cat([act(pre[..., s:s + k]) for (s, k, _), act in zip(self.segments, self.acts)], dim=-1)

    def _batches(self, splits: list, start: int, size: int) -> tuple[torch.Tensor, list[Batch]]:
        """Each member's batch (padded as its solo run pads it) and their inputs as one [M, B, T, n_in]."""
        batches = [pad([split[i] for i in range(start, min(start + size, len(split)))]) for split in splits]
        return self._stack_inputs(batches), [b.to(self.device) for b in batches]

    def _stack_inputs(self, batches: list[Batch]) -> torch.Tensor:
        longest = max(b.x.shape[1] for b in batches)
        x = torch.zeros(len(batches), batches[0].x.shape[0], longest, self.n_in)
        for row, b in enumerate(batches):
            x[row, :, : b.x.shape[1]] = b.x
        return x.to(self.device)

    def _adam(self) -> None:
        """torch's Adam over each member's own tensors, one call per distinct lr (the solo optimizer's code)."""
        by_lr: dict[float, tuple[list, list, list, list, list]] = {}
        for row, m in enumerate(self.members):
            lists = by_lr.setdefault(m.cfg.learning_rate, ([], [], [], [], []))
            for i, name in enumerate(self.names):
                p = self.params[name]
                for out, t in zip(lists, (p.detach(), p.grad, self.exp_avg[name], self.exp_avg_sq[name])):
                    out.append(self._part(name, t, row))
                lists[4].append(m.steps[i])
        for lr, (params, grads, exp_avg, exp_avg_sq, steps) in by_lr.items():
            adam(params, grads, exp_avg, exp_avg_sq, [], steps, amsgrad=False, beta1=BETAS[0], beta2=BETAS[1],
                 lr=lr, weight_decay=0.0, eps=EPS, maximize=False)
        for p in self.params.values():
            p.grad = None

    def train_step(self) -> list[float]:
        size = self.cfg.data.batch_size
        if self.members[0].order is None:  # a new epoch: each member's own shuffle, or the stored order
            for m in self.members:
                n = len(m.data.train)
                m.order = torch.randperm(n, generator=m.shuffler).tolist() if sparse_rnn.shuffles(m.cfg) else list(range(n))
            self.pos = 0
        batches = [pad([m.data.train[i] for i in m.order[self.pos:self.pos + size]]) for m in self.members]
        pred = self._forward(self._stack_inputs(batches))
        losses = [sparse_rnn.sequence_loss(pred[row, :, : b.x.shape[1]], b.to(self.device), self.kind,
                                           self.position)[0] for row, b in enumerate(batches)]
        torch.stack(losses).sum().backward()  # members share no parameter: each gets its solo gradient
        self._adam()
        self.step += 1
        self.pos += batches[0].x.shape[0]
        return torch.stack(losses).detach().tolist()

    # ---- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str) -> list[dict[str, float]]:
        """sparse_rnn.evaluate for every member at once, on its own split."""
        splits = [getattr(m.data, split) for m in self.members]
        if len(splits[0]) == 0:
            return [{} for _ in self.members]
        size = self.cfg.data.batch_size
        sums = [[0.0, 0, 0, 0] for _ in self.members]  # total, weight, correct, counted
        for start in range(0, len(splits[0]), size):
            x, batches = self._batches(splits, start, size)
            pred = self._forward(x)
            for row, b in enumerate(batches):
                loss, c, n = sparse_rnn.sequence_loss(pred[row, :, : b.x.shape[1]], b, self.kind, self.position)
                s = sums[row]
                s[0] += float(loss) * len(b.lengths)
                s[1] += len(b.lengths)
                s[2], s[3] = s[2] + c, s[3] + n
        out = []
        for total, weight, correct, counted in sums:
            metrics = {"loss": total / weight}
            if self.kind == "cross_entropy" and counted:
                metrics["accuracy"] = correct / counted
            out.append(metrics)
        return out

    # ---- the loop ---------------------------------------------------------------------------------------
    def checkpoint(self, row: int) -> None:
        m = self.members[row]
        with torch.no_grad():
            for name in self.names:
                getattr(m.block, name).copy_(self._part(name, self.params[name], row))
        optimizer = {"state": {i: {"step": m.steps[i].cpu().clone(),
                                   "exp_avg": self._part(name, self.exp_avg[name], row).cpu().clone(),
                                   "exp_avg_sq": self._part(name, self.exp_avg_sq[name], row).cpu().clone()}
                               for i, name in enumerate(self.names) if self.step > 0},
                     "param_groups": m.param_groups}
        m.ctx.save_checkpoint({
            "step": self.step, "epoch": self.epoch, "pos": self.pos, "order": m.order, "window": m.window,
            "curve": m.curve, "val_curve": m.val_curve, "min_val_loss": m.min_val,
            "elapsed": m.elapsed + time.monotonic() - self.began, "representation": m.facts["representation"],
            "model": m.model.state_dict(), "optimizer": optimizer, "shuffler": m.shuffler.get_state(),
        })

    def run(self) -> dict[int, dict | Exception]:
        """Train to the end; the outcome of each member by its row at the start."""
        ids = {id(m): row for row, m in enumerate(self.members)}
        outcome: dict[int, dict | Exception] = {}
        self.began = time.monotonic()
        while self.members and self.step < self.total:
            values = self.train_step()
            leaving: dict[int, dict | Exception] = {}
            for row, (m, value) in enumerate(zip(self.members, values)):
                m.window.append(value)
                if self.step % m.cfg.log_every == 0 or self.step == self.total:
                    try:
                        self._log(m)
                    except Exception as exc:  # noqa: BLE001 - this member's failure ends this member only
                        leaving[row] = exc
            epoch_ends = self.pos >= len(self.members[0].order)
            if epoch_ends:  # end of an epoch: validate every member
                self.epoch += 1
                for m in self.members:
                    m.order = None
                for row, (m, metrics) in enumerate(zip(self.members, self.evaluate("validation"))):
                    if row in leaving or not metrics:
                        continue
                    m.min_val = min(m.min_val, metrics["loss"])
                    m.val_curve.append([self.step, metrics["loss"]])
                    try:
                        m.ctx.report(self.step, **{f"val_{k}": v for k, v in metrics.items()})
                    except Exception as exc:  # noqa: BLE001
                        leaving[row] = exc
            gangs.checkpoint_or_leave(self.members, leaving, self.step, self.checkpoint,
                                      lambda m: self.step % m.cfg.checkpoint_every == 0 or self.step == self.total,
                                      last=self.step >= self.total)
            if leaving:
                for row, result in leaving.items():
                    outcome[ids[id(self.members[row])]] = result
                self.keep([row for row in range(len(self.members)) if row not in leaving])
        if self.members:
            self._sync()
            tests = self.evaluate("test")
        for row, m in enumerate(self.members):
            try:
                outcome[ids[id(m)]] = self._result(m, tests[row])
            except Exception as exc:  # noqa: BLE001 - e.g. its policy scoring failed
                outcome[ids[id(m)]] = exc
        return outcome

    def _log(self, m: _Member) -> None:
        """As the solo loop at a log point: the window's mean, the curve, the report; a NaN ends it."""
        value = sum(m.window) / len(m.window)
        m.window = []
        m.curve.append([self.step, value])
        m.ctx.report(self.step, loss=value, epoch=self.epoch)
        m.ctx.progress(self.step, self.total)
        if not math.isfinite(value):
            raise Diverged(self.step, value)

    def _result(self, m: _Member, test: dict[str, float]) -> dict:
        facts, cfg = m.facts, m.cfg
        result = {
            "final_loss": m.curve[-1][1] if m.curve else None, "steps": self.step, "epochs": self.epoch,
            "loss_curve": m.curve, "val_curve": m.val_curve, "min_val_loss": m.min_val if m.val_curve else None,
            "seconds": round(m.elapsed + time.monotonic() - self.began, 2), "parameters": facts["trainable_parameters"],
            "model_type": cfg.model_type, "representation": facts["representation"],
            "hidden_size": facts.get("hidden_size"), "density": facts.get("density"), "dataset": m.data.name,
            "loss_kind": self.kind, "sequence_position": self.position, "fused": True,
        }
        result.update({f"test_{k}": v for k, v in test.items()})
        if cfg.data.score_episodes and cfg.data.is_minari:
            model = m.model.to(self.device)
            result.update(sparse_rnn.score(model, cfg, m.data, m.ctx.seed, self.device))
        return result


def _loss_of(cfg: Config, data) -> tuple[str, str]:
    kind_cb, position_cb = cfg.loss_from_callbacks()
    return cfg.loss or kind_cb or data.loss, cfg.sequence_position or position_cb or data.sequence_position


def _total_steps(cfg: Config, data) -> int:
    per_epoch = math.ceil(len(data.train) / cfg.data.batch_size)
    return per_epoch * cfg.max_epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.max_epochs)


def train_many(cfgs: list[Config], ctxs: list) -> list[dict | Exception]:
    """Train same-fuse-key configs as one stacked model; each entry is that member's result (as `train`
    returns it, plus "fused": True), {"stopped_at": step}, or the exception that ended it."""
    gangs.check(cfgs, ctxs, fuse_key, "a model",
                unfused=f"model_type {cfgs[0].model_type!r} is not fused (only {sparse_rnn.FUSED_MODEL_TYPES})")
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # CSR "beta" notices, as the solo run
    if cfgs[0].num_threads:
        torch.set_num_threads(cfgs[0].num_threads)
    device = torch.device(ctxs[0].device if cfgs[0].use_cuda else "cpu")
    outcome: list[dict | Exception | None] = [None] * len(cfgs)
    loaded: dict[tuple[str, int | None], Any] = {}

    def start(cfg: Config, ctx) -> tuple[_Member, dict | None]:
        """A member and its checkpoint (an unreadable one, or missing data, fails this member only)."""
        state = ctx.load_checkpoint()
        # RandomAnomaly's real files are the same for every seed: read them once for the gang
        key = (cfg.data.model_dump_json(), None if cfg.data.is_random_anomaly and cfg.data.path else ctx.seed)
        if key not in loaded:
            loaded[key] = sparse_rnn.load_data(cfg, ctx.seed)
        return _member(cfg, ctx, state, loaded[key], device), state

    def resumes_at(started: tuple[_Member, dict | None]) -> tuple[int, str]:
        """What one gang's members share: the step they resume from, and their representation."""
        member, state = started
        return 0 if state is None else state["step"], member.facts["representation"]

    def gang(group: list[tuple[_Member, dict | None]]) -> dict[int, dict | Exception]:
        first, state = group[0]
        return _Gang([m for m, _ in group], state, device, _total_steps(first.cfg, first.data)).run()

    gangs.by_start(gangs.start(cfgs, ctxs, start, outcome), resumes_at, gang, outcome)
    return outcome
