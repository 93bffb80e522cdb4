"""Seed 000's own Hydra files (qbhershey/iterativenn conf/) turned into sparse_rnn config keys.

Read top to bottom: `seed_number` evaluates their `asteval::` strings (arithmetic and `range` only),
`from_sequential2d` rewrites a `model_type: sequential2D` file as the block description it is,
`loss_units` says which units of the model's y block their loss `idx_list` reads (GRU.yaml reads the last
10 of 130), and `seed_dataset` maps their dataset names to Minari ids or refuses, naming the key and why.

What cannot be mapped is refused with `SeedFileError` (a ValueError, so a 422 naming the field at POST):
- sequential2D blocks `WandBModule` / `Module` (they load a trained W&B run or an arbitrary module);
- data `dataset: lunar` (and cartpole, acrobot: rollouts of a PPO policy trained first with
  stable-baselines3, through the old gym API; gymnasium has only LunarLander-v3, and box2d) and the
  other torchvision downloads (EMNIST, FashionMNIST, KMNIST);
- `conf/data/sequence_type/*.yaml`: Hydra sub-group files of the MNIST data files, not data files.
`dataset: MNIST` with its `sequence_type` becomes `digit_sequences` (digit_sequences.py: the same tasks
on scikit-learn's digits, offline, as RandomAnomaly's offline source).
"""
from __future__ import annotations

import ast
import operator
from typing import Any


class SeedFileError(ValueError):
    """A seed 000 config key that cannot be mapped; the message names the key and why."""


# ---- asteval:: strings ------------------------------------------------------------------------------
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def seed_number(value: Any, key: str) -> Any:
    """An int, or a (start, stop) pair for `range(...)`, from a value such as "asteval::range(2500+29, 2539)".
    Only integer arithmetic (+ - * //) and range with one or two arguments are understood."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SeedFileError(f"{key}: expected a number or an 'asteval::' expression, got {value!r}")
    if isinstance(value, int):
        return value
    text = value.removeprefix("asteval::").strip()
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise SeedFileError(f"{key}: {value!r} is not an expression") from None

    def num(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](num(node.left), num(node.right))
        raise SeedFileError(f"{key}: {value!r}: only integers, + - * // and range(...) are understood")

    if isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "range":
        args = [num(a) for a in tree.args]
        if len(args) not in (1, 2) or tree.keywords:
            raise SeedFileError(f"{key}: {value!r}: range needs one or two arguments")
        start, stop = (0, args[0]) if len(args) == 1 else args
        return (start, stop)
    return num(tree)


# ---- sequential2D -----------------------------------------------------------------------------------
_MASKED = ("MaskedLinear.from_description", "SparseLinear.from_description", "SparseLinear.from_singleBlock")
_UNMAPPABLE = {"WandBModule": "loads a trained model from a W&B run", "Module": "is an arbitrary torch module"}
SEQUENTIAL2D_KEYS = ("in_features_list", "out_features_list", "block_kwargs")


def _none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "None")


def from_sequential2d(model: dict[str, Any]) -> dict[str, Any]:
    """A sequential2D model file as description keys. Their blocks[i][j] maps input block i to output
    block j (outputs summed), i.e. the description's block (row j, column i). Per block: None -> 0;
    Linear / MaskedLinear -> a dense trainable W block initialised as nn.Linear; Identity -> D with 1s,
    frozen; MaskedLinear.from_description (and the SparseLinear ones) -> its block_kwargs. A block row has a
    bias when any of its blocks has one (the seed summed one bias per block: the same function)."""
    sizes_in, sizes_out = model.get("in_features_list"), model.get("out_features_list")
    if not isinstance(sizes_in, list) or not isinstance(sizes_out, list):
        raise SeedFileError("sequential2D needs in_features_list and out_features_list (lists of block sizes)")
    if sizes_in != sizes_out:
        raise SeedFileError(f"sequential2D: out_features_list {sizes_out} must equal in_features_list {sizes_in} "
                            "(the map takes the state to itself)")
    n = len(sizes_in)
    blocks = model.get("block_types")
    if not isinstance(blocks, list) or len(blocks) != n or any(not isinstance(r, list) or len(r) != n for r in blocks):
        raise SeedFileError(f"sequential2D: block_types must be a {n}x{n} list of lists")
    kwargs = model.get("block_kwargs") or [[None] * n for _ in range(n)]
    types = [[0] * n for _ in range(n)]
    inits: list[list[Any]] = [[0] * n for _ in range(n)]
    train: list[list[Any]] = [[False] * n for _ in range(n)]
    bias = [False] * n
    for i in range(n):  # input block
        for j in range(n):  # output block
            kind = blocks[i][j]
            if _none(kind):
                continue
            where = f"block_types[{i}][{j}]"
            if kind in _UNMAPPABLE:
                raise SeedFileError(f"{where} is {kind}, which {_UNMAPPABLE[kind]}: it has no block description")
            if kind in ("Linear", "MaskedLinear"):
                bound = 1.0 / sizes_in[i] ** 0.5  # nn.Linear's (and MaskedLinear's reset) U(-1/sqrt(in), 1/sqrt(in))
                types[j][i], inits[j][i], train[j][i], bias[j] = "W", f"U={-bound},{bound}", True, True
            elif kind == "Identity":
                if sizes_in[i] != sizes_out[j]:
                    raise SeedFileError(f"{where} is Identity between blocks of {sizes_in[i]} and {sizes_out[j]}")
                types[j][i], inits[j][i] = "D", 1
            elif kind in _MASKED:
                try:
                    spec = kwargs[i][j]
                except (IndexError, TypeError):
                    spec = None
                if not isinstance(spec, dict) or not {"block_type", "initialization_type", "trainable"} <= spec.keys():
                    raise SeedFileError(f"block_kwargs[{i}][{j}] must give block_type, initialization_type and "
                                        f"trainable for {kind}")
                types[j][i], inits[j][i], train[j][i] = spec["block_type"], spec["initialization_type"], spec["trainable"]
                bias[j] = bias[j] or bool(spec.get("bias", True))
            else:
                raise SeedFileError(f"{where}: unknown sequential2D block {kind!r}; known: None, Linear, MaskedLinear, "
                                    f"Identity, {', '.join(_MASKED)}")
    out = {k: v for k, v in model.items() if k not in SEQUENTIAL2D_KEYS + ("block_types",)}
    out.update(model_type="description", row_sizes=list(sizes_in), col_sizes=list(sizes_in), block_types=types,
               initialization_types=inits, trainable=train, bias=bias)
    return out


# ---- which units of y the loss reads -------------------------------------------------------------------
def loss_units(callbacks: dict[str, Any] | None, frame_size: int, output_size: int) -> tuple[int, int] | None:
    """(start, stop) inside the model's y block that `callbacks.loss.idx_list` reads, or None for all of it.
    Indices count from the end of the state, so they stay right when the hidden size is changed later.
    The state's size is `callbacks.initialization.size` when given, else `frame_size`."""
    loss = (callbacks or {}).get("loss") or {}
    if "idx_list" not in loss:
        return None
    span = seed_number(loss["idx_list"], "callbacks.loss.idx_list")
    if not isinstance(span, tuple):
        raise SeedFileError("callbacks.loss.idx_list must be a range(...) of state units")
    size = (callbacks.get("initialization") or {}).get("size")
    n = frame_size if size is None else seed_number(size, "callbacks.initialization.size")
    if not isinstance(n, int):
        raise SeedFileError("callbacks.initialization.size must be a number")
    start, stop = output_size - (n - span[0]), output_size - (n - span[1])
    if not 0 <= start < stop <= output_size:
        raise SeedFileError(f"callbacks.loss.idx_list range{span} is not inside the y block (the last {output_size} "
                            f"of the {n} state units): the loss must read the model's output")
    return None if (start, stop) == (0, output_size) else (start, stop)


# ---- datasets ---------------------------------------------------------------------------------------
# Their names (conf/data/*.yaml, the DataFactory files) -> the Minari datasets those factories loaded.
SEED_DATASETS = {
    "adroit_door": "D4RL/door/expert-v2",          # DataFactoryAD: door-expert-v1
    "adroit_hammer": "D4RL/hammer/expert-v2",      # DataFactoryAH: hammer-expert-v1
    "franka_kitchen": "D4RL/kitchen/mixed-v2",     # DataFactoryFK / FKB: kitchen-mixed-v1
    "kitchen": "D4RL/kitchen/mixed-v2",
    "kitchen_mixed": "D4RL/kitchen/mixed-v2",
    "kitchen_partial": "D4RL/kitchen/partial-v2",
    "kitchencomplete": "D4RL/kitchen/complete-v2",  # DataFactoryFKC: kitchen-complete-v1
    "kitchen_complete": "D4RL/kitchen/complete-v2",
}
# Data files whose dataset name does not say which data the seed's runner loaded (kitchencomplete.yaml says
# franka_kitchen; Runner_FK then used DataFactoryFKC, kitchen-complete).
SEED_DATA_FILES = {"kitchencomplete": "kitchencomplete"}
UNSUPPORTED_DATASETS = {
    **{name: "a torchvision download (the seed's DataFactory fetched it), which a worker cannot do; MNIST "
             "is built offline from scikit-learn's digits (dataset MNIST or digit_sequences)"
       for name in ("emnist", "fashionmnist", "kmnist")},
    "lunar": "seed 000's gym data (GymImageSequence: LunarLander-v2, CartPole, Acrobot) was rollouts of a PPO "
             "policy it trained first with stable-baselines3, through the old gym API (gymnasium has only "
             "LunarLander-v3, and it needs box2d); there is no recorded dataset to map it to",
}
UNSUPPORTED_DATASETS["cartpole"] = UNSUPPORTED_DATASETS["acrobot"] = UNSUPPORTED_DATASETS["lunar"]


def data_file(data: dict[str, Any], stem: str) -> dict[str, Any]:
    """A data file's section, with the dataset its runner really loaded where the name does not say."""
    if stem in SEED_DATA_FILES and str(data.get("dataset", "")).lower() == "franka_kitchen":
        return {**data, "dataset": SEED_DATA_FILES[stem]}
    return data


def seed_dataset(data: dict[str, Any]) -> dict[str, Any]:
    """A data section with the seed's dataset name mapped, or SeedFileError naming the key and why."""
    if "_target_" in data:
        raise SeedFileError(f"_target_ is set: this is a Hydra sub-group file (conf/data/sequence_type/, "
                            f"{data['_target_']}) that the MNIST data files compose, not a data file; "
                            "MNIST data is not supported")
    dataset = str(data.get("dataset", "")).strip()
    why = UNSUPPORTED_DATASETS.get(dataset.lower())
    if why:
        raise SeedFileError(f"dataset {dataset!r} is not supported: {why}")
    out = dict(data)
    defaults = out.pop("defaults", None)  # Hydra's composition list: MNIST files compose a sequence_type
    if dataset.lower() == "mnist":
        out["dataset"] = "digit_sequences"
        for item in defaults or []:
            if isinstance(item, dict) and item.get("sequence_type"):
                out.setdefault("sequence_type", item["sequence_type"])
        if not out.pop("sequence", True):  # single images: a sequence of one
            out.update(sequence_type="uniform", min_copies=1, max_copies=1)
        return out
    mapped = SEED_DATASETS.get(dataset.lower())
    if mapped:
        out["dataset"] = mapped
        if dataset.lower() in ("kitchencomplete", "kitchen_complete") and "test_reuses_validation" not in out:
            out["test_reuses_validation"] = True  # DataFactoryFKC: random_split [15, 4, 0], test = validation
    return out
