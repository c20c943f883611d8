"""`resume=<run dir>`: the run continues with the config it started with (its config.yaml, every `auto` resolved
then), and only the keys of RESUMABLE may change; an override of any other key must equal the saved value."""

import copy
import logging
import time
from pathlib import Path
from pydoc import locate
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from protein_mlm import composition
from protein_mlm.composition import compose_checked
from protein_mlm.errors import ConfigError
from protein_mlm.overrides import override_key
from protein_mlm.plan import RESOLVED_KEYS

log = logging.getLogger(__name__)

# What a resume may change: how the run is watched, logged, checkpointed and fed, and how long it trains; never
# what one update computes. A key names itself and everything below it (docs/reliability.md lists them with why).
RESUMABLE = (
    "trainer.max_steps",  # train longer (or shorter); a decaying schedule is re-planned to the new end
    "trainer.val_check_interval",  # validation reads no training data
    "trainer.num_sanity_val_steps",
    "trainer.log_every_n_steps",  # how often the metrics are read off the device
    "logger",  # logger choice (logger=csv) and settings; TensorBoard events are written anyway
    "callbacks.progress_bar",
    "callbacks.plain_progress",
    "callbacks.model_summary",
    "callbacks.lr_monitor",
    "callbacks.zero_shot",  # downstream scores after each validation
    "callbacks.divergence_guard",  # when to stop, not what is trained
    "callbacks.resume_checkpoint.every_n_train_steps",
    "model.compile",  # the same model, compiled where this machine can
    "data.num_workers",  # loader processes (the data position decides whether a stream continues exactly)
    "data.pin_memory",
    "data.cache_dir",  # where tokenized caches live (rebuilt there from the same file)
    "paths.cache_dir",
    "paths.log_dir",
    "print_config",
    "plan_only",
    "num_threads",
    "perf",  # the memory check and the MFU peak
    "faults",  # test aids
)
DEBUG_CALLBACKS = "protein_mlm.training.debug."  # test aids (interrupts, recorders) may be added or changed too
PINNED = ("resume",)  # set by the resume itself


def resumable(key: str, cfg: DictConfig, target: str | None = None) -> bool:
    """Whether `key` may change on resume: in RESUMABLE, or inside a test-aid callback."""
    if any(key == k or key.startswith(f"{k}.") for k in RESUMABLE):
        return True
    parts = key.split(".")
    if parts[0] != "callbacks" or len(parts) < 2:
        return False
    target = target or OmegaConf.select(cfg, f"callbacks.{parts[1]}._target_", default=None)
    return str(target).startswith(DEBUG_CALLBACKS)


def resume_run(run_dir: str | Path, overrides_now: list[str], config_name: str = "train") -> DictConfig:
    """The run dir's config as it started (config.yaml) with the allowed `overrides_now` on top, continuing from its
    last.ckpt into the same dir; the whole config, the Hydra node included, ready for the task (not yet checked)."""
    run_dir = Path(run_dir)
    saved = load_saved(run_dir)
    parsed = [parse(o) for o in overrides_now if override_key(o) not in PINNED]
    hydra_now = [o.input_line for o in parsed if o.key_or_group.startswith("hydra")]
    check_run_dir(run_dir, hydra_now)
    groups_now = [o for o in parsed if is_group(o.key_or_group)]
    changed_groups = [o.input_line for o in groups_now if resumable(o.key_or_group, saved.config)]
    try:
        base = compose_checked(config_name, [*saved_choices(saved), *changed_groups, *hydra_now])
    except ConfigError as e:
        raise ConfigError(f"resume={run_dir}: the run's config groups do not compose in this version: {e}") from None
    cfg = restore(base, saved, run_dir, [override_key(o) for o in changed_groups])
    task_now = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    for override in sorted(task_now, key=lambda o: not is_group(o.key_or_group)):  # groups first, as Hydra does
        apply(cfg, base, saved, override)
    finish(cfg, run_dir, [o.input_line for o in task_now])
    return cfg


class Saved:
    """What a run dir records about how it started: config.yaml, its overrides and its group choices."""

    def __init__(self, config: DictConfig, overrides: list[str], choices: dict[str, Any]):
        self.config, self.overrides, self.choices = config, overrides, choices


def load_saved(run_dir: Path) -> Saved:
    """Read the run dir's record, refusing a dir that is not a resumable run."""
    config_file = run_dir / "config.yaml"
    if not (run_dir / "checkpoints" / "last.ckpt").is_file() or not config_file.is_file():
        raise ConfigError(
            f"resume={run_dir} is not a run dir with checkpoints/last.ckpt and config.yaml; "
            "pass the dir of a train.py run that saved a checkpoint (or use ckpt_path=<file>)"
        )
    overrides, choices = run_dir / ".hydra" / "overrides.yaml", run_dir / ".hydra" / "hydra.yaml"
    overrides = OmegaConf.to_container(OmegaConf.load(overrides)) if overrides.is_file() else []  # ${...} as typed
    choices = OmegaConf.select(OmegaConf.load(choices), "hydra.runtime.choices") if choices.is_file() else None
    choices = OmegaConf.to_container(choices) if choices else {}
    return Saved(OmegaConf.load(config_file), [str(o) for o in overrides], choices)


def parse(override: str):
    """Hydra's own reading of one override (quotes, lists, null, +/~)."""
    try:
        return OverridesParser.create().parse_overrides([override])[0]
    except HydraException as e:
        raise ConfigError(f"cannot read the override {override!r}: {e}") from None


def is_group(key: str) -> bool:
    """A config group (model, logger, hydra/launcher ...), chosen by name rather than set as a value."""
    return "." not in key and (composition.CONFIG_DIR / key).is_dir()


def saved_choices(saved: Saved) -> list[str]:
    """The run's group choices (model=tiny, ...) as overrides: keys new since it started take its groups' defaults."""
    return [f"{g}={c}" for g, c in saved.choices.items() if c is not None and not g.startswith("hydra")]


def check_run_dir(run_dir: Path, hydra_now: list[str]) -> None:
    """A requeued command may repeat hydra.run.dir, but a resumed run writes only into its own dir."""
    for override in hydra_now:
        if override_key(override) == "hydra.run.dir":
            value = str(parse(override).value())
            if Path(value).resolve() != run_dir.resolve():
                raise ConfigError(
                    f"hydra.run.dir={value} differs from resume={run_dir}: a resumed run continues in its own dir; "
                    "drop hydra.run.dir (or start a new run from the checkpoint with ckpt_path=<file>)"
                )


def restore(base: DictConfig, saved: Saved, run_dir: Path, replaced: list[str]) -> DictConfig:
    """config.yaml over today's composition of the run's groups: every saved value wins; keys new since the run
    started take today's defaults; keys and code paths gone since are dropped or followed (each with a warning)."""
    restored = copy.deepcopy(saved.config)
    for group in replaced:  # chosen anew now (logger=csv): today's composition of that choice replaces it
        restored.pop(group, None)
    drop_removed_keys(restored, base, added_keys(saved.overrides), "")
    moved = follow_moved_targets(restored, base, "")
    if moved:
        log.warning("resume=%s: code moved since the run started; today's is used for %s", run_dir, ", ".join(moved))
    saved_leaves = set(leaf_keys(restored))
    new = [
        key
        for key in sorted(set(leaf_keys(base)) - saved_leaves)
        if not key.startswith(("hydra", *(f"{group}." for group in replaced)))
        and not any(key.startswith(f"{leaf}.") for leaf in saved_leaves)
    ]
    if new:
        log.warning("resume=%s: keys new since the run started take today's defaults: %s", run_dir, ", ".join(new))
    for key in RESOLVED_KEYS:
        if OmegaConf.select(restored, key, default=None) == "auto":
            log.warning(
                "resume=%s: config.yaml was written before %s's `auto` was recorded as resolved; it resolves again on "
                "this machine (pass %s=<the value the run used> to pin it)",
                run_dir,
                key,
                key,
            )
    OmegaConf.set_struct(base, False)
    cfg = OmegaConf.merge(base, restored)
    moved_from = OmegaConf.select(restored, "paths.output_dir", default=None)
    if moved_from and Path(str(moved_from)).resolve() != run_dir.resolve():
        log.warning("resume=%s: the run dir moved from %s; the run's paths follow it", run_dir, moved_from)
        repoint(cfg, str(moved_from), str(run_dir.resolve()))
    return cfg


def added_keys(overrides: list[str]) -> set[str]:
    """Keys the run added on purpose (`+callbacks.recorder._target_=...`): kept though today's configs lack them."""
    return {override_key(o) for o in overrides if o.startswith("+")}


def drop_removed_keys(restored: DictConfig, base: Any, added: set[str], prefix: str) -> None:
    """Remove saved keys that today's config of the same node lacks (a setting removed since), unless added."""
    if not isinstance(base, DictConfig) or base._is_none():
        return  # a node today's configs leave empty (callbacks.zero_shot: null): the run's content stays
    for name in list(restored.keys()):
        key = f"{prefix}{name}"
        if name not in base:
            if not any(a == key or a.startswith(f"{key}.") for a in added):
                log.warning("resume: %s of the run's config.yaml no longer exists in this version; dropped", key)
                del restored[name]
        elif isinstance(restored[name], DictConfig):
            drop_removed_keys(restored[name], child(base, name), added, f"{key}.")


def follow_moved_targets(restored: DictConfig | ListConfig, base: Any, prefix: str) -> list[str]:
    """A `_target_` names code, not a setting: one that no longer imports (code moved) takes today's; returns them."""
    moved = []
    names = list(restored.keys()) if isinstance(restored, DictConfig) else range(len(restored))
    for name in names:
        today = child(base, name)
        if isinstance(restored[name], DictConfig | ListConfig):
            moved += follow_moved_targets(restored[name], today, f"{prefix}{name}.")
        elif name == "_target_" and locate(str(restored[name])) is None and today is not None:
            moved.append(f"{prefix}{name}")
            restored[name] = today._value()
    return moved


def child(node: Any, name: str | int) -> Any:
    """`node[name]` unresolved, or None where `node` has no such key or index."""
    if isinstance(node, DictConfig) and not node._is_none() and name in node:
        return node._get_node(name)
    if isinstance(node, ListConfig) and not node._is_none() and isinstance(name, int) and name < len(node):
        return node._get_node(name)
    return None


def leaf_keys(node: Any, prefix: str = "") -> list[str]:
    """Every leaf of a config as `a.b.c` (unresolved)."""
    if not isinstance(node, DictConfig) or node._is_none() or not node.keys():
        return [prefix.rstrip(".")]
    return [key for name in node.keys() for key in leaf_keys(node._get_node(name), f"{prefix}{name}.")]


def repoint(node: DictConfig | ListConfig, old: str, new: str) -> None:
    """Every string path under `old` (the run dir where it was written) now under `new`."""
    for name in list(node.keys()) if isinstance(node, DictConfig) else range(len(node)):
        child = node._get_node(name)
        if isinstance(child, DictConfig | ListConfig) and not child._is_none():
            repoint(child, old, new)
        elif isinstance(child._value(), str) and (child._value() == old or child._value().startswith(f"{old}/")):
            node[name] = new + child._value()[len(old) :]


def apply(cfg: DictConfig, base: DictConfig, saved: Saved, override) -> None:
    """An override typed now: applied where its key may change, accepted where it repeats the run's value, else
    refused."""
    key = override.key_or_group
    if is_group(key):
        if resumable(key, cfg):
            cfg[key] = base[key]  # composed from today's files with this choice
        elif not same_choice(override, saved):
            refuse(override.input_line, key, saved.choices.get(key))
        return
    value = None if override.is_delete() else override.value()
    target = value if key.endswith("._target_") else None
    now = OmegaConf.select(cfg, key, default=None)
    if resumable(key, cfg, target) or (key in RESOLVED_KEYS and now == "auto"):
        set_key(cfg, base, key, value, override.is_delete())
    elif plain(now) != value:
        refuse(override.input_line, key, plain(now))


def same_choice(override, saved: Saved) -> bool:
    """`model=tiny` repeats the run's choice (its recorded choice, or the very override it was started with)."""
    choice = saved.choices.get(override.key_or_group)
    return override.input_line in saved.overrides or str(override.value()) == str(choice)


def refuse(line: str, key: str, saved: Any) -> None:
    shown = "null" if saved is None else str(saved).lower() if isinstance(saved, bool) else saved  # as typed
    raise ConfigError(
        f"{line} differs from the run's {key}={shown} (its config.yaml) and {key} may not change on resume; "
        "drop it (the keys that may change: docs/reliability.md), or start a new run from the checkpoint with "
        "ckpt_path=<run dir>/checkpoints/last.ckpt"
    )


def set_key(cfg: DictConfig, base: DictConfig, key: str, value: Any, delete: bool) -> None:
    """Set (or delete) `key`, and every key that today's configs define as exactly `${key}` (data.cache_dir follows
    paths.cache_dir)."""
    if delete:
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if node is not None and name in node:
            del node[name]
        return
    OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    for follower in leaf_keys(base):
        node = follower.rpartition(".")
        parent = OmegaConf.select(base, node[0]) if node[0] else base
        if isinstance(parent, DictConfig) and parent._get_node(node[2])._value() == f"${{{key}}}":
            OmegaConf.update(cfg, follower, value, merge=False, force_add=True)


def plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def finish(cfg: DictConfig, run_dir: Path, overrides_now: list[str]) -> None:
    """Continue from last.ckpt, in the same dir; Hydra writes this invocation's record to .hydra/resume-<time>/."""
    with open_dict(cfg):
        cfg.resume = str(run_dir)
        cfg.ckpt_path = str(run_dir / "checkpoints" / "last.ckpt")
        cfg.hydra.run.dir = str(run_dir)
        cfg.hydra.mode = RunMode.RUN
        cfg.hydra.overrides.task = overrides_now
        if cfg.hydra.output_subdir is not None:  # null: another rank of the run, which writes no record
            cfg.hydra.output_subdir = f".hydra/resume-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    OmegaConf.set_struct(cfg, True)
