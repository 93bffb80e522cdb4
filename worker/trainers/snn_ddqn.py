"""snn_ddqn: seed 002's spiking-network Double DQN (amirabbasija/SNN-DDQN), one readable file.

An epsilon-greedy agent on any Gymnasium env with a flat Box observation and Discrete actions
(LunarLander-v3 as the seed; CartPole-v1 for fast runs). The Q-network is a stack of Linear layers:
`ann` puts ReLUs between them; `snn` puts an snntorch `Leaky(beta)` neuron after every Linear layer
(the output layer's too), feeds the observation as a constant current for `snn_tSteps` steps and reads
Q as the summed output spikes (`readout: spikes`, the seed) or the output layer's mean membrane
potential (`readout: membrane`, output neurons without reset).

The spiking forward runs through spiking/lif.py (all time steps of a layer at once, the same numbers as
snntorch's Leaky step by step; `snn_kernel: snntorch` runs the step-by-step reference instead).

Learning as in the seed: replay buffer (100,000), epsilon from 1 to a floor, multiplied by `decay` once
per finished episode, an update every `update_every` env steps once the buffer holds a batch (or the
seed's schedule, `update_schedule: episode`), MSE on the TD error, Adam, soft target update (tau) after
each update or a hard copy every N updates. The target is true Double DQN (the online net picks the next
action, the target net values it) or, with `target: dqn`, the seed's own rule (max over the target net).
Time-limit truncations bootstrap; `truncation: terminal` stores them as terminal, as the seed did.

`agents` environments run side by side with one batched forward pass for their actions. An episode is a
"win" when its final reward is > `win_threshold` (75: LunarLander's landing bonus), or its return is
(`win_by: return`). Learning stops when the win rate over the last `win_window` episodes exceeds
`stop_learning_at_win_percent` (a percent: the seed compared a 0-1 fraction to 80); then the job ends
(`after_win: stop`) or, as the seed, plays on with learning off until its episode budget (`evaluate`).

Exact resume: a checkpoint holds both nets, the optimizer, the replay buffer, epsilon, counters, history,
the RNG states and, for each episode in flight, its reset seed and its actions so far. A Gymnasium env's
internal state cannot be saved, but it is a function of its reset seed and the actions taken, so resume
replays them. A resumed run therefore equals an uninterrupted one, even when it stopped mid-episode.

`fuse_key` names the configs whose agents snn_fused.py's `train_many` trains together, one batched
network for all of them (each job keeps its own envs, buffer, RNG, nets and optimizer).
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import gymnasium as gym
import numpy as np
import snntorch as snn
import torch
import torch.nn.functional as F
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from torch import nn

from worker.trainers.spiking import seed_conf
from worker.trainers.spiking.lif import spiking_forward
from worker.trainers.spiking.seed_conf import grid_from_seed_conf, is_seed_conf  # noqa: F401 (cli/main.py)

CURVE_POINTS = 200  # the result's return curve is averaged down to at most this many points


def _names(*names: str) -> AliasChoices:
    return AliasChoices(*names)


class Config(BaseModel):
    """Seed 002's conf.json keys are accepted as written, flat (snn_tSteps, learning_rate, batch, decay, ...)
    or nested as its confExamples/DDQN_conf.json (spiking/seed_conf.py lifts the sections; the seed's
    names inside them, memorySize, startEbsilon, numUpdateTS, ..., are aliases here)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    env_id: str = Field(default="LunarLander-v3", validation_alias=_names("env_id", "env", "env_name", "environment"))
    max_episode_steps: int | None = Field(default=None, ge=1, description="None: the env's own (LunarLander: 1000)",
                                          validation_alias=_names("max_episode_steps", "maxNumTimeSteps"))
    episodes: int = Field(default=15_000, ge=1,
                          validation_alias=_names("episodes", "max_episodes", "num_episodes", "nEpisodes"))
    agents: int = Field(default=1, ge=1, le=256, validation_alias=_names("agents", "num_envs"))
    # The network.
    architecture: Literal["snn", "ann"] = Field(default="snn", validation_alias=_names("architecture", "network"))
    hidden_layers: list[Annotated[int, Field(ge=1, le=8192)]] = Field(default=[64, 64], min_length=1, max_length=16)
    snn_tSteps: int = Field(default=25, ge=1, le=10_000,
                            validation_alias=_names("snn_tSteps", "snn_t_steps", "t_steps"))
    snn_beta: float = Field(default=0.95, ge=0.0, le=1.0, validation_alias=_names("snn_beta", "beta"))
    readout: Literal["spikes", "membrane"] = "spikes"
    # fused: all time steps of a layer at once (worker/trainers/spiking/lif.py), the same numbers as
    # snntorch's Leaky called step by step (`snntorch`, kept as the reference), in far fewer kernel launches.
    snn_kernel: Literal["fused", "snntorch"] = "fused"
    # Learning.
    target: Literal["ddqn", "dqn"] = "ddqn"
    target_update: Literal["soft", "hard"] = "soft"
    tau: float = Field(default=0.001, gt=0.0, le=1.0)
    target_update_every: int = Field(default=1000, ge=1, description="updates between hard copies")
    learning_rate: float = Field(default=4e-4, gt=0.0, le=10.0, validation_alias=_names("learning_rate", "lr"))
    gamma: float = Field(default=0.995, ge=0.0, le=1.0)
    # bootstrap: a time-limit truncation is no terminal state, its target still bootstraps (correct);
    # terminal: the seed's, which stored done = terminated or truncated.
    truncation: Literal["bootstrap", "terminal"] = "bootstrap"
    batch: int = Field(default=100, ge=1, le=1_000_000, validation_alias=_names("batch", "batch_size"))
    buffer_size: int = Field(default=100_000, ge=1,
                             validation_alias=_names("buffer_size", "replay_size", "memory_size", "memorySize"))
    update_every: int = Field(default=4, ge=1, validation_alias=_names("update_every", "train_frequency", "numUpdateTS"))
    # run: every update_every env steps of the run once the buffer holds a batch; episode (the seed's):
    # when (t + 1) % update_every == 0 for the episode's step t, once the buffer holds more than a batch.
    update_schedule: Literal["run", "episode"] = "run"
    epsilon_start: float = Field(default=1.0, ge=0.0, le=1.0, validation_alias=_names("epsilon_start", "startEbsilon"))
    epsilon_min: float = Field(default=0.01, ge=0.0, le=1.0,
                               validation_alias=_names("epsilon_min", "epsilon_end", "epsilon_floor", "min_epsilon",
                                                       "endEbsilon"))
    decay: float = Field(default=0.998, gt=0.0, le=1.0, validation_alias=_names("decay", "epsilon_decay"))
    # Winning and stopping.
    win_by: Literal["final_reward", "return"] = "final_reward"
    win_threshold: float = 75.0
    win_window: int = Field(default=100, ge=1)
    stop_learning_at_win_percent: float | None = Field(default=80.0, ge=0.0, le=100.0)
    # Once that win rate is reached, stop: the job ends; evaluate: the seed's, episodes go on with learning
    # off (same epsilon schedule) until the episode budget, and the result reports them apart.
    after_win: Literal["stop", "evaluate"] = "stop"
    # e.g. CartPole-v1's "solved": mean return >= 475 over 100. Always ends the run (the seed's maxAvgPoint).
    stop_at_mean_return: float | None = Field(default=None, validation_alias=_names("stop_at_mean_return",
                                                                                     "maxAvgPoint"))
    max_run_time: float | None = Field(default=None, gt=0.0, description="seconds of training, all attempts together")
    train_max_time: float | None = Field(default=None, gt=0.0, description="the same; the smaller of the two counts")
    checkpoint_every: int = Field(default=100, ge=1, description="episodes")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Seed 002's other conf.json keys, accepted so its file runs unchanged. gridfleet does their work:
    # attempts of a job always resume (continue_run), checkpoints go to the grid's store (upload_to_cloud,
    # local_backup); `name` names the grid (grid_from_seed_conf). run_tag makes a new run a new job.
    name: str | None = None
    continue_run: bool = True
    extra_info: str = ""
    upload_to_cloud: bool = False
    local_backup: bool = True
    debug: bool = False
    run_tag: str | None = None
    # The nested conf.json's own two: the algorithm it names, and the flag its trainer sets when a run ends.
    algorithm: str = seed_conf.ALGORITHM
    finished: bool = False

    _nested_seed_conf = model_validator(mode="before")(seed_conf.flatten)

    @field_validator("algorithm")
    @classmethod
    def _ddqn(cls, algorithm: str) -> str:
        if algorithm != seed_conf.ALGORITHM:
            raise ValueError(f"'{algorithm}' is not run by snn_ddqn, which trains the seed's {seed_conf.ALGORITHM} "
                             "(its PPO has no gridfleet trainer)")
        return algorithm

    @field_validator("finished")
    @classmethod
    def _not_finished(cls, finished: bool) -> bool:
        if finished:
            raise ValueError(seed_conf.FINISHED_MESSAGE)
        return finished

    @field_validator("env_id")
    @classmethod
    def _known_env(cls, env_id: str) -> str:
        if ":" in env_id:  # "module:EnvId" registers itself when gym.make imports the module
            return env_id
        try:
            gym.spec(env_id)
        except gym.error.Error as exc:
            raise ValueError(f"unknown Gymnasium env '{env_id}': {exc}") from None
        return env_id

    @model_validator(mode="after")
    def _consistent(self):
        if self.batch > self.buffer_size:
            raise ValueError(f"batch ({self.batch}) is larger than buffer_size ({self.buffer_size})")
        if self.epsilon_min > self.epsilon_start:
            raise ValueError(f"epsilon_min ({self.epsilon_min}) is above epsilon_start ({self.epsilon_start})")
        return self

    def time_limit(self) -> float | None:
        limits = [t for t in (self.max_run_time, self.train_max_time) if t is not None]
        return min(limits) if limits else None


def fuse_key(cfg: Config) -> str | None:
    """What the members of one batched network (snn_fused.train_many) share: the env (observation and
    action sizes), the network's shape and spiking settings, the replay batch, the lanes per job and the
    device. lr, gamma, tau, epsilon schedule, buffer size, update rule and episode budget may differ. The
    step-by-step snntorch reference is never fused."""
    if cfg.snn_kernel != "fused" and cfg.architecture == "snn":
        return None
    net = (f"{cfg.architecture}/" + "x".join(map(str, cfg.hidden_layers)) +
           (f"/T{cfg.snn_tSteps}/beta{cfg.snn_beta}/{cfg.readout}" if cfg.architecture == "snn" else ""))
    key = f"snn_ddqn/{cfg.env_id}/{net}/B{cfg.batch}/A{cfg.agents}/{cfg.device}"
    if len(key) <= 200:  # jobs.fuse_key holds 200 characters: a longer key is cut and told apart by a digest
        return key
    return f"{key[:160]}/{hashlib.sha256(key.encode()).hexdigest()[:16]}"


# ---- the network -------------------------------------------------------------------------------------
class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, n_actions: int, cfg: Config):
        super().__init__()
        sizes = [obs_dim, *cfg.hidden_layers, n_actions]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.spiking = cfg.architecture == "snn"
        self.t_steps = cfg.snn_tSteps
        self.membrane_readout = cfg.readout == "membrane"
        self.fused = cfg.snn_kernel == "fused"
        if self.spiking:
            hidden = [snn.Leaky(beta=cfg.snn_beta) for _ in cfg.hidden_layers]
            # A membrane readout integrates without reset, so Q can take any value (spike counts are 0..T).
            output = snn.Leaky(beta=cfg.snn_beta, reset_mechanism="none" if self.membrane_readout else "subtract")
            self.neurons = nn.ModuleList([*hidden, output])

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if not self.spiking:
            x = obs
            for linear in self.linears[:-1]:
                x = F.relu(linear(x))
            return self.linears[-1](x)
        if self.fused:
            return spiking_forward(obs, self.linears, [n.beta for n in self.neurons],
                                   [n.threshold for n in self.neurons], self.t_steps, self.membrane_readout)
        first = self.linears[0](obs)  # a constant current: the first layer's input is the same every step
        mems = [torch.zeros(len(obs), layer.out_features, device=obs.device) for layer in self.linears]
        total = torch.zeros(len(obs), self.linears[-1].out_features, device=obs.device)
        for _ in range(self.t_steps):
            current = first
            for i, neuron in enumerate(self.neurons):
                spikes, mems[i] = neuron(current, mems[i])
                if i + 1 < len(self.linears):
                    current = self.linears[i + 1](spikes)
            total = total + (mems[-1] if self.membrane_readout else spikes)
        return total / self.t_steps if self.membrane_readout else total


def td_target(online: nn.Module, target: nn.Module, rewards: torch.Tensor, next_obs: torch.Tensor,
              terminated: torch.Tensor, gamma: float, rule: str) -> torch.Tensor:
    """r + gamma * Q'(s', a') for non-terminal s'. Double DQN: a' = argmax of the online net, valued by the
    target net. `dqn` (the seed's rule): max over the target net. Truncated episodes still bootstrap."""
    with torch.no_grad():
        next_q = target(next_obs)
        if rule == "ddqn":
            best = online(next_obs).argmax(dim=1, keepdim=True)
            value = next_q.gather(1, best).squeeze(1)
        else:
            value = next_q.max(dim=1).values
        return rewards + gamma * (1.0 - terminated) * value


# ---- the replay buffer -------------------------------------------------------------------------------
class ReplayBuffer:
    """A ring of transitions in numpy arrays on the CPU; sampled batches go to the device."""

    def __init__(self, capacity: int, obs_dim: int):
        self.capacity, self.pos, self.size = capacity, 0, 0
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=np.float32)

    def add(self, obs, action: int, reward: float, next_obs, terminated: bool) -> None:
        i = self.pos
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.terminated[i] = next_obs, terminated
        self.pos, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, batch: int, rng: np.random.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
        index = rng.integers(self.size, size=batch)
        arrays = (self.obs, self.actions, self.rewards, self.next_obs, self.terminated)
        return tuple(torch.from_numpy(a[index]).to(device) for a in arrays)

    def state_dict(self) -> dict[str, Any]:
        n = self.size
        return {"pos": self.pos, "size": n, "obs": self.obs[:n].copy(), "actions": self.actions[:n].copy(),
                "rewards": self.rewards[:n].copy(), "next_obs": self.next_obs[:n].copy(),
                "terminated": self.terminated[:n].copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = state["size"]
        if n > self.capacity:
            raise ValueError(f"the checkpoint's replay buffer holds {n} transitions; buffer_size is {self.capacity}")
        self.pos, self.size = state["pos"], n
        for name in ("obs", "actions", "rewards", "next_obs", "terminated"):
            getattr(self, name)[:n] = state[name]


# ---- the run -----------------------------------------------------------------------------------------
@dataclass
class Lane:
    """One environment's episode in flight: enough to rebuild it anywhere (reset seed + actions)."""

    episode: int
    reset_seed: int
    actions: list[int] = field(default_factory=list)
    ret: float = 0.0
    obs: Any = None


@dataclass
class RunState:
    episodes_started: int = 0
    episodes_done: int = 0
    env_steps: int = 0
    updates: int = 0
    epsilon: float = 1.0
    elapsed: float = 0.0
    loss_sum: float = 0.0  # over the updates since the last finished episode
    loss_count: int = 0
    last_checkpoint: int = 0  # episodes_done at the last periodic checkpoint
    solved_at: int | None = None  # episodes done when the stop criterion was met; learning is off from then on
    solved_by: str | None = None  # "win_rate" or "mean_return"
    history: dict[str, list] = field(default_factory=lambda: {"return": [], "length": [], "win": [], "loss": [],
                                                              "epsilon": []})


def episode_seed(seed: int, episode: int) -> int:
    """Each episode's env reset seed, from the job's seed and the episode's number alone."""
    return int(np.random.SeedSequence([seed, episode]).generate_state(1)[0])


def make_env(cfg: Config) -> gym.Env:
    limit = {"max_episode_steps": cfg.max_episode_steps} if cfg.max_episode_steps else {}
    env = gym.make(cfg.env_id, **limit)
    if not (isinstance(env.observation_space, gym.spaces.Box) and len(env.observation_space.shape) == 1):
        raise TypeError(f"{cfg.env_id}: snn_ddqn needs a flat Box observation, not {env.observation_space}")
    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise TypeError(f"{cfg.env_id}: snn_ddqn needs Discrete actions, not {env.action_space}")
    return env


def replay(env: gym.Env, lane: Lane) -> np.ndarray:
    """Bring a fresh env to where the lane's episode was: same reset seed, same actions."""
    obs, _ = env.reset(seed=lane.reset_seed)
    for action in lane.actions:
        obs, *_ = env.step(action)
    return obs


def soft_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, o in zip(target.parameters(), online.parameters()):
            t.lerp_(o, tau)  # t = (1 - tau) * t + tau * o


def is_win(cfg: Config, final_reward: float, episode_return: float) -> bool:
    """LunarLander: a final reward > 75 is the landing bonus (+100 plus shaping); `win_by: return` for others."""
    return (final_reward if cfg.win_by == "final_reward" else episode_return) > cfg.win_threshold


def _mean(values: list) -> float:
    return float(np.mean(values)) if values else float("nan")


Request = tuple[str, Any]  # what an Agent's loop asks of its networks: ("act", obs) or ("learn", batch)


class Agent:
    """One job's state and its training loop (`run`), written as a generator: where the loop needs its
    networks it yields a request, ("act", obs) for greedy actions or ("learn", batch) for one update's
    gradients, and whoever drives it answers. `train` drives one agent with its own nets (`solo`);
    snn_fused.train_many drives many at once, answering each round's requests with one batched network.
    So the solo loop and the fused one are the same code.

    fused: a member of a gang. The global torch RNG is then shared, so the agent keeps its own state (the
    one after its init, or its checkpoint's) for its checkpoints; its result says "fused": True."""

    def __init__(self, cfg: Config, ctx, device: torch.device, fused: bool = False):
        self.cfg, self.ctx, self.device, self.fused = cfg, ctx, device, fused
        self.envs = [make_env(cfg) for _ in range(cfg.agents)]
        self.obs_dim, self.n_actions = self.envs[0].observation_space.shape[0], int(self.envs[0].action_space.n)
        torch.manual_seed(ctx.seed)
        self.online = QNetwork(self.obs_dim, self.n_actions, cfg).to(device)
        self.torch_rng = torch.get_rng_state()
        self.target = copy.deepcopy(self.online)
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=cfg.learning_rate)
        self.buffer = ReplayBuffer(cfg.buffer_size, self.obs_dim)
        self.rng = np.random.default_rng(ctx.seed)  # exploration and replay sampling

    def solo(self) -> dict:
        """The loop alone, its requests answered by this agent's own networks."""
        loop, answer = self.run(), None
        while True:
            try:
                kind, x = loop.send(answer)
            except StopIteration as done:
                return done.value
            answer = self.greedy(x) if kind == "act" else self.gradients(x)

    def greedy(self, obs: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return self.online(obs).argmax(dim=1).cpu().numpy()

    def gradients(self, batch: tuple[torch.Tensor, ...]) -> float:
        """One update's loss; its gradients are left in the online net's .grad for the loop's optimizer.step."""
        cfg, online = self.cfg, self.online
        obs, actions, rewards, next_obs, terminated = batch
        y = td_target(online, self.target, rewards, next_obs, terminated, cfg.gamma, cfg.target)
        q = online(obs).gather(1, actions.unsqueeze(1)).squeeze(1)
        loss = F.mse_loss(q, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss.item()

    def run(self) -> Generator[Request, Any, dict]:
        """The training loop; yields ("act", obs) and ("learn", batch) where it needs its networks."""
        cfg, ctx, envs, buffer, rng = self.cfg, self.ctx, self.envs, self.buffer, self.rng
        online, target, optimizer = self.online, self.target, self.optimizer
        saved = ctx.load_checkpoint()
        if saved is None:
            st, lanes = RunState(epsilon=cfg.epsilon_start), [None] * cfg.agents
        else:
            online.load_state_dict(saved["online"])
            target.load_state_dict(saved["target"])
            optimizer.load_state_dict(saved["optimizer"])
            buffer.load_state_dict(saved["buffer"])
            rng.bit_generator.state = saved["rng"]
            self.torch_rng = saved["torch_rng"]
            if not self.fused:
                torch.set_rng_state(self.torch_rng)
            st = RunState(**saved["run"])
            lanes = [Lane(**lane) if lane is not None else None for lane in saved["lanes"]]
            for env, lane in zip(envs, lanes):
                if lane is not None:
                    obs = replay(env, lane)
                    if not np.array_equal(obs, lane.obs):  # e.g. another Box2D build: go on from the replayed state
                        ctx.event("warning", f"episode {lane.episode}: replaying its actions gave another observation")
                        lane.obs = obs
        began = time.monotonic() - st.elapsed
        limit = cfg.time_limit()
        last_report = (time.monotonic(), st.env_steps)

        def checkpoint() -> None:
            st.elapsed = time.monotonic() - began
            ctx.save_checkpoint({
                "step": st.episodes_done, "run": asdict(st),
                "lanes": [asdict(lane) if lane is not None else None for lane in lanes],
                "online": online.state_dict(), "target": target.state_dict(), "optimizer": optimizer.state_dict(),
                "buffer": buffer.state_dict(), "rng": rng.bit_generator.state,
                "torch_rng": self.torch_rng if self.fused else torch.get_rng_state(),
            })

        def run_ends() -> bool:
            """Solved, and not going on to evaluate (the mean-return criterion always ends the run)."""
            return st.solved_at is not None and (cfg.after_win == "stop" or st.solved_by == "mean_return")

        def update_due(lane: Lane) -> bool:
            if st.solved_at is not None:  # learning is off
                return False
            if cfg.update_schedule == "episode":  # the seed's: (t + 1) % C == 0 for step t of the episode, buffer > batch
                return len(lane.actions) % cfg.update_every == 0 and buffer.size > cfg.batch
            return st.env_steps % cfg.update_every == 0 and buffer.size >= cfg.batch

        def start_episode(i: int) -> None:
            if st.episodes_started >= cfg.episodes or run_ends():
                lanes[i] = None
                return
            lane = Lane(episode=st.episodes_started, reset_seed=episode_seed(ctx.seed, st.episodes_started))
            lane.obs, _ = envs[i].reset(seed=lane.reset_seed)
            lanes[i] = lane
            st.episodes_started += 1

        def learn() -> Generator[Request, Any, None]:
            loss = yield "learn", buffer.sample(cfg.batch, rng, self.device)  # the answer leaves the gradients
            optimizer.step()
            st.updates += 1
            if cfg.target_update == "soft":
                soft_update(target, online, cfg.tau)
            elif st.updates % cfg.target_update_every == 0:
                target.load_state_dict(online.state_dict())
            st.loss_sum += loss
            st.loss_count += 1

        def finish_episode(lane: Lane, final_reward: float) -> None:
            nonlocal last_report
            h = st.history
            win = is_win(cfg, final_reward, lane.ret)
            loss = st.loss_sum / st.loss_count if st.loss_count else float("nan")
            for key, value in (("return", lane.ret), ("length", len(lane.actions)), ("win", win), ("loss", loss),
                               ("epsilon", st.epsilon)):
                h[key].append(value)
            st.episodes_done += 1
            st.loss_sum, st.loss_count = 0.0, 0
            window_full = len(h["win"]) >= cfg.win_window
            win_rate = 100.0 * _mean(h["win"][-cfg.win_window:])
            mean_return = _mean(h["return"][-cfg.win_window:])
            now = time.monotonic()
            steps_per_second = (st.env_steps - last_report[1]) / max(now - last_report[0], 1e-9)
            last_report = (now, st.env_steps)
            ctx.report(st.episodes_done, **{"return": lane.ret}, length=len(lane.actions), win=int(win),
                       learning=int(st.solved_at is None), win_rate=win_rate, mean_return=mean_return,
                       epsilon=st.epsilon, loss=loss, env_steps=st.env_steps, steps_per_second=steps_per_second)
            ctx.progress(st.episodes_done, cfg.episodes)
            st.epsilon = max(cfg.epsilon_min, st.epsilon * cfg.decay)  # once per episode, as the seed
            if window_full and st.solved_at is None:
                if cfg.stop_learning_at_win_percent is not None and win_rate > cfg.stop_learning_at_win_percent:
                    st.solved_at, st.solved_by = st.episodes_done, "win_rate"
                if cfg.stop_at_mean_return is not None and mean_return >= cfg.stop_at_mean_return:
                    st.solved_at, st.solved_by = st.episodes_done, "mean_return"

        try:
            if saved is None:
                for i in range(cfg.agents):
                    start_episode(i)
            stopped = None
            while stopped is None and any(lane is not None for lane in lanes):
                active = [i for i, lane in enumerate(lanes) if lane is not None]
                obs = np.stack([lanes[i].obs for i in active]).astype(np.float32, copy=False)
                # Both draws happen every step, so the RNG stream does not depend on which branch was taken;
                # the net runs only when some lane is greedy.
                explore = rng.random(len(obs)) < st.epsilon
                actions = rng.integers(self.n_actions, size=len(obs))
                if not explore.all():
                    greedy = yield "act", torch.as_tensor(obs, device=self.device)
                    actions = np.where(explore, actions, greedy)
                for i, action in zip(active, actions.tolist()):
                    lane = lanes[i]
                    next_obs, reward, terminated, truncated, _ = envs[i].step(action)
                    # The seed's `truncation: terminal` stores a time-limit end as terminal: no bootstrap from it.
                    buffer.add(lane.obs, action, reward, next_obs,
                               terminated or (truncated and cfg.truncation == "terminal"))
                    lane.actions.append(action)
                    lane.ret += float(reward)
                    lane.obs = next_obs
                    st.env_steps += 1
                    if update_due(lane):
                        yield from learn()
                    if terminated or truncated:
                        finish_episode(lane, float(reward))
                        start_episode(i)
                        if run_ends():
                            break  # the run stops here: no more steps or updates for the other lanes
                if run_ends():
                    stopped = "solved"
                    lanes = [None] * cfg.agents  # learning is over: the episodes in flight are dropped
                elif limit is not None and time.monotonic() - began >= limit:
                    stopped = "time_limit"
                elif ctx.should_stop():
                    checkpoint()
                    return {"stopped_at": st.episodes_done}
                if stopped or st.episodes_done - st.last_checkpoint >= cfg.checkpoint_every:
                    st.last_checkpoint = st.episodes_done
                    checkpoint()
            if st.episodes_done != st.last_checkpoint:  # the final model, for `gridfleet pull`
                checkpoint()
        finally:
            for env in envs:
                env.close()
        return self.result(st, began, run_ends(), stopped)

    def result(self, st: RunState, began: float, ended_solved: bool, stopped: str | None) -> dict:
        cfg, h = self.cfg, st.history
        returns = np.asarray(h["return"], dtype=np.float64)
        window = min(cfg.win_window, len(returns)) or 1
        rolling = np.convolve(returns, np.ones(window) / window, mode="valid") if len(returns) else returns
        chunk = max(1, -(-len(returns) // CURVE_POINTS))
        curve = [[min(start + chunk, len(returns)), float(returns[start:start + chunk].mean())]
                 for start in range(0, len(returns), chunk)]
        after_win = {}
        if cfg.after_win == "evaluate" and st.solved_by == "win_rate":  # the episodes played with learning off
            after = slice(st.solved_at, None)
            after_win = {"episodes_after_win": len(h["return"][after]),
                         "mean_return_after_win": _mean(h["return"][after]),
                         "win_rate_after_win": 100.0 * _mean(h["win"][after])}
        return {
            **after_win,
            "episodes": st.episodes_done, "env_steps": st.env_steps, "updates": st.updates,
            "stopped": "solved" if ended_solved else stopped or "episodes",
            "solved": st.solved_at is not None, "solved_at_episode": st.solved_at,
            "win_rate": 100.0 * _mean(h["win"][-cfg.win_window:]), "mean_return": _mean(h["return"][-cfg.win_window:]),
            "best_mean_return": float(rolling.max()) if len(rolling) else float("nan"),
            "epsilon": st.epsilon, "seconds": round(time.monotonic() - began, 2),
            "parameters": sum(p.numel() for p in self.online.parameters()), "return_curve": curve,
            **({"fused": True} if self.fused else {}),
        }


def train(cfg: Config, ctx) -> dict:
    return Agent(cfg, ctx, torch.device(ctx.device if cfg.device == "auto" else cfg.device)).solo()
