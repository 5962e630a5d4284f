"""Sweep configurations: a TOML file (or a shipped preset) naming a grid of runs.

A sweep file has up to five tables; only ``[grid]`` is required::

    name = "mnist"                      # optional; default: the file's stem
    description = "GLC's MNIST protocol"

    [grid]                              # the runs are the product of these lists
    datasets  = ["mnist"]
    noises    = ["uniform_mix", "flip"] # synthetic corruptions (see metacorrect.noise)
    strengths = {start = 0.0, stop = 1.0, step = 0.1}   # or a list [0.0, 0.5, 1.0]
    trusted   = [0.001, 0.01, 0.05]     # fractions of the training set, or counts >= 1
    methods   = ["trusted_only", "ce", "forward", "glc", "mlc"]
    seeds     = [0]
    label_sets = []                     # real noisy labels (cifar10n: aggre, worse, random1, ...)
                                        # instead of noises × strengths

    [run]                               # settings shared by every run (RunConfig fields)
    model = "mlp"
    optimizer = "adam"
    lr = 1e-3
    weight_decay = 1e-6
    batch_size = 32
    epochs = 10

    [method_options.mlc]                # options of one method (create_method(name, **options))
    update_every = 1

    [published]                         # optional reference numbers shown beside ours
    source = "GLC (Hendrycks et al., 2018), Table 1"
    [published.mnist]                   # dataset -> method -> mean error over strengths (%)
    trusted_only = 19.0

    [cluster]                           # optional: resources of one run for --launcher slurm
    partition = "gpu"                   # (or local); see metacorrect.experiments.cluster
    gpus_per_run = 1
    time = "4:00:00"

The runs are ordered datasets → seeds → noises (or label sets) → trusted → strengths →
methods, so a sweep finishes whole (noise, trusted) blocks — whole rows of the table — first.

Overrides (``metacorrect sweep CONFIG --set KEY=VALUE``) use dotted keys into the tables
(``grid.methods=["ce","mlc"]``, ``run.epochs=2``, ``method_options.mlc.update_every=5``);
a bare key is looked up in ``[run]``, then ``[grid]``, then the top level
(``--set epochs=2``). Values are TOML (``[0.0, 0.5]``, ``"adam"``, ``1e-3``); a value that
is not valid TOML is a string, and a comma-separated one a list of strings
(``--set methods=ce,mlc``).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .run import RunConfig

PRESET_DIR = Path(__file__).with_name("presets")

TOP_KEYS = ("name", "description", "grid", "run", "method_options", "published", "notes", "cluster")
GRID_KEYS = ("datasets", "noises", "strengths", "trusted", "methods", "seeds", "label_sets")
# run settings that the grid sets, so they may not appear in [run]
GRID_OWNED = ("dataset", "noise", "strength", "trusted", "method", "method_options", "seed", "label_set")


class SweepConfigError(ValueError):
    """A sweep configuration is invalid (the message says what and where)."""


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def preset_path(name: str) -> Path:
    return PRESET_DIR / f"{name}.toml"


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: a stable identifier, its position and its configuration."""

    run_id: str
    order: int
    config: RunConfig

    @property
    def axes(self) -> dict:
        c = self.config
        return {"dataset": c.dataset, "noise": "real" if c.label_set else c.noise, "label_set": c.label_set,
                "strength": None if c.label_set else c.strength, "trusted": c.trusted, "method": c.method,
                "seed": c.seed}


@dataclass
class SweepConfig:
    name: str
    grid: dict
    run: dict = field(default_factory=dict)
    method_options: dict = field(default_factory=dict)
    published: dict = field(default_factory=dict)
    description: str = ""
    notes: str = ""
    source: str = ""  # the file or preset it came from
    cluster: dict = field(default_factory=dict)  # the [cluster] table: resources of one run (not its identity)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "notes": self.notes, "grid": self.grid,
                "run": self.run, "method_options": self.method_options, "published": self.published,
                "source": self.source, **({"cluster": self.cluster} if self.cluster else {})}

    # ------------------------------------------------------------------ grid
    def runs(self) -> list[RunSpec]:
        """Every run of the grid, in the order they are run."""
        g = self.grid
        specs = []
        order = 0
        for dataset, seed in itertools.product(g["datasets"], g["seeds"]):
            noise_axis = ([(None, ls) for ls in g["label_sets"]] if g["label_sets"]
                          else [(noise, None) for noise in g["noises"]])
            for noise, label_set in noise_axis:
                for trusted in g["trusted"]:
                    strengths = [None] if label_set else g["strengths"]
                    for strength in strengths:
                        for method in g["methods"]:
                            values = dict(self.run)
                            values.update(dataset=dataset, seed=seed, trusted=trusted, method=method,
                                          method_options=copy.deepcopy(self.method_options.get(method, {})))
                            if label_set:
                                values.update(label_set=label_set, noise="none", strength=0.0)
                            else:
                                values.update(noise=noise, strength=float(strength))
                            config = RunConfig.from_dict(values)
                            specs.append(RunSpec(run_id(config), order, config))
                            order += 1
        seen = {}
        for s in specs:
            if s.run_id in seen:
                raise SweepConfigError(f"the grid names run {s.run_id} twice (a value repeated in a list?)")
            seen[s.run_id] = s
        return specs


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:g}"
    return str(x)


def run_id(config: RunConfig) -> str:
    """A readable identifier, also the run folder's name: ``mnist-flip-t0.01-s0.3-mlc-seed0``."""
    ds = Path(str(config.dataset)).stem if "/" in str(config.dataset) else str(config.dataset)
    noise = f"{config.label_set}" if config.label_set else f"{config.noise}-s{_fmt(config.strength)}"
    return f"{ds}-{noise}-t{_fmt(config.trusted)}-{config.method}-seed{config.seed}"


# ---------------------------------------------------------------------- loading

def _arange(spec: dict, where: str) -> list[float]:
    unknown = set(spec) - {"start", "stop", "step"}
    if unknown or not {"start", "stop", "step"} <= set(spec):
        raise SweepConfigError(f"{where}: a range is {{start = ..., stop = ..., step = ...}} (stop included), "
                               f"got {spec}")
    start, stop, step = (float(spec[k]) for k in ("start", "stop", "step"))
    if not step > 0 or stop < start:
        raise SweepConfigError(f"{where}: a range needs step > 0 and stop >= start, got {spec}")
    n = int(math.floor((stop - start) / step + 1e-9)) + 1
    return [round(start + i * step, 10) for i in range(n)]


def _as_list(value, key: str) -> list:
    if isinstance(value, dict):
        if key != "strengths":
            raise SweepConfigError(f"grid.{key}: only strengths may be a range table")
        return _arange(value, f"grid.{key}")
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``KEY=VALUE`` → (dotted key path, value)."""
    if "=" not in text:
        raise SweepConfigError(f"--set expects KEY=VALUE, got {text!r}")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key:
        raise SweepConfigError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if "," in raw:
            value = [_scalar(v.strip()) for v in raw.split(",") if v.strip()]
        else:
            value = raw
    return [k.replace("-", "_") for k in key.split(".")], value


def _scalar(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(data: dict, path: list[str], value) -> None:
    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    if len(path) == 1:
        key = path[0]
        if key in GRID_KEYS:
            path = ["grid", key]
        elif key in run_fields and key not in GRID_OWNED:
            path = ["run", key]
        elif key in TOP_KEYS:
            pass
        else:
            raise SweepConfigError(f"--set {key}: unknown key; use one of the [grid] keys ({', '.join(GRID_KEYS)}), "
                                   f"a run setting ({', '.join(sorted(run_fields - set(GRID_OWNED)))}) or a dotted "
                                   f"key such as method_options.mlc.update_every")
    node = data
    for k in path[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise SweepConfigError(f"--set {'.'.join(path)}: {k} is not a table")
    node[path[-1]] = value


def load_sweep_config(source: str | Path, overrides: list[str] | None = None, *,
                      check_datasets: bool = True) -> SweepConfig:
    """Read a sweep file (or a preset by name), apply ``KEY=VALUE`` overrides and validate."""
    text_source = str(source)
    path = Path(text_source)
    if not path.exists() and preset_path(text_source).exists():
        path = preset_path(text_source)
        origin = f"preset {text_source}"
    elif path.exists():
        origin = str(path)
    else:
        raise SweepConfigError(f"{text_source!r} is neither a sweep file nor a preset; presets: "
                               f"{', '.join(preset_names())}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SweepConfigError(f"{path}: not valid TOML: {exc}") from None
    for item in overrides or []:
        apply_override(data, *parse_override(item))
    config = sweep_config_from_dict(data, default_name=path.stem, check_datasets=check_datasets)
    config.source = origin
    return config


def sweep_config_from_dict(data: dict, default_name: str = "sweep", *, check_datasets: bool = True) -> SweepConfig:
    from ..methods import METHODS, create_method
    from ..noise import NOISE_TYPES

    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise SweepConfigError(f"unknown key(s) {', '.join(unknown)} at the top level; known: {', '.join(TOP_KEYS)}")
    if "grid" not in data or not isinstance(data["grid"], dict):
        raise SweepConfigError("a sweep needs a [grid] table (datasets, noises, strengths, trusted, methods, seeds)")
    raw = data["grid"]
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise SweepConfigError(f"unknown key(s) {', '.join(unknown)} in [grid]; known: {', '.join(GRID_KEYS)}")
    grid = {"datasets": _as_list(raw.get("datasets", []), "datasets"),
            "noises": _as_list(raw.get("noises", []), "noises"),
            "strengths": [float(s) for s in _as_list(raw.get("strengths", []), "strengths")],
            "trusted": _as_list(raw.get("trusted", []), "trusted"),
            "methods": _as_list(raw.get("methods", []), "methods"),
            "seeds": _as_list(raw.get("seeds", [0]), "seeds"),
            "label_sets": _as_list(raw.get("label_sets", []), "label_sets")}
    required = ["datasets", "trusted", "methods", "seeds"]
    if not grid["label_sets"]:
        required += ["noises", "strengths"]
    elif raw.get("noises") or raw.get("strengths"):
        raise SweepConfigError("grid: label_sets (real noisy labels) replace noises × strengths; give one or the other")
    empty = [k for k in required if not grid[k]]
    if empty:
        raise SweepConfigError(f"the grid is empty: grid.{', grid.'.join(empty)} "
                               f"{'has' if len(empty) == 1 else 'have'} no values")

    for m in grid["methods"]:
        if m not in METHODS:
            raise SweepConfigError(f"grid.methods: unknown method {m!r}; expected one of {', '.join(sorted(METHODS))}")
    for n in grid["noises"]:
        if n not in NOISE_TYPES:
            raise SweepConfigError(f"grid.noises: unknown noise {n!r}; expected one of {', '.join(NOISE_TYPES)}")
    for s in grid["strengths"]:
        if not 0.0 <= s <= 1.0:
            raise SweepConfigError(f"grid.strengths: {s:g} is outside [0, 1]")
    for t in grid["trusted"]:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 \
                or (isinstance(t, float) and t >= 1 and not t.is_integer()):
            raise SweepConfigError(f"grid.trusted: {t!r} is neither a fraction in (0, 1) nor a count >= 1")
    grid["trusted"] = [int(t) if isinstance(t, float) and t >= 1 else t for t in grid["trusted"]]
    for s in grid["seeds"]:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise SweepConfigError(f"grid.seeds: {s!r} is not an integer >= 0")
    if check_datasets:
        from ..data import dataset_names
        names = set(dataset_names())
        for d in grid["datasets"]:
            if d not in names and not Path(str(d)).expanduser().exists():
                raise SweepConfigError(f"grid.datasets: unknown dataset {d!r}; expected one of "
                                       f"{', '.join(sorted(names))} or a path to your own data")

    run = dict(data.get("run", {}))
    run_fields = {f.name for f in dataclasses.fields(RunConfig)}
    owned = sorted(set(run) & set(GRID_OWNED))
    if owned:
        raise SweepConfigError(f"[run] may not set {', '.join(owned)}: the grid sets it "
                               f"(use [grid] or [method_options.<method>])")
    unknown = sorted(set(run) - run_fields)
    if unknown:
        raise SweepConfigError(f"unknown run setting(s) {', '.join(unknown)} in [run]; known: "
                               f"{', '.join(sorted(run_fields - set(GRID_OWNED)))}")
    try:
        RunConfig.from_dict(run)
    except (ValueError, TypeError) as exc:
        raise SweepConfigError(f"[run]: {exc}") from None

    method_options = data.get("method_options", {}) or {}
    if not isinstance(method_options, dict):
        raise SweepConfigError("method_options must be a table of tables: [method_options.mlc] ...")
    for m, opts in method_options.items():
        if m not in METHODS:
            raise SweepConfigError(f"[method_options.{m}]: unknown method {m!r}; expected one of "
                                   f"{', '.join(sorted(METHODS))}")
        if not isinstance(opts, dict):
            raise SweepConfigError(f"method_options.{m} must be a table of option = value")
        try:
            create_method(m, **opts)
        except (ValueError, TypeError) as exc:
            raise SweepConfigError(f"[method_options.{m}]: {exc}") from None

    published = data.get("published", {}) or {}
    if not isinstance(published, dict):
        raise SweepConfigError("published must be a table")

    cluster = data.get("cluster", {}) or {}
    if not isinstance(cluster, dict):
        raise SweepConfigError("cluster must be a table: [cluster] partition = ..., time = ...")
    from .cluster import ClusterOptionError, ClusterOptions
    try:
        ClusterOptions.build("local", cluster)  # every value checked now (slurm's required --time at launch)
    except ClusterOptionError as exc:
        raise SweepConfigError(str(exc)) from None

    config = SweepConfig(name=str(data.get("name", default_name)), grid=grid, run=run,
                         method_options=method_options, published=published,
                         description=str(data.get("description", "")), notes=str(data.get("notes", "")),
                         cluster=dict(cluster))
    config.runs()  # builds every RunConfig: catches bad values early
    return config


def config_json(config: RunConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


__all__ = ["RunSpec", "SweepConfig", "SweepConfigError", "load_sweep_config", "preset_names", "preset_path",
           "run_id", "sweep_config_from_dict", "parse_override", "apply_override"]
