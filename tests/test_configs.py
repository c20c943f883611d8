"""Every option of every config group composes, and what it describes instantiates."""

import logging
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from protein_mlm.data.datamodule import ProteinDataModule
from protein_mlm.plan import build_schedule, split_optimizer_config
from protein_mlm.preflight import check_config
from protein_mlm.train import build_datamodule
from tests.conftest import CONFIG_DIR, compose_config

GROUPS = ["data", "model", "optimizer", "scheduler", "trainer", "callbacks", "logger", "paths", "debug", "experiment"]
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONFIG_DIR / g).glob("*.yaml"))]


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS)


def leaves(node, prefix: str = ""):
    """(dotted path, value) of every leaf of a plain dict."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{path}.")
        else:
            yield path, value


def declared(path: Path, package: str) -> tuple[dict, list[tuple[str, str]]]:
    """An option file's own values placed at its package, with those of the files it includes (`- /group/option`),
    and its `override /group: option` entries."""
    text = path.read_text()
    content = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    package = "" if text.startswith("# @package _global_") else package
    values, overrides = {}, []
    for entry in content.pop("defaults", []):
        if isinstance(entry, str) and entry.startswith("/"):
            name, _, at = entry[1:].partition("@")
            included, more = declared(CONFIG_DIR / f"{name}.yaml", package if at == "_here_" else name.split("/")[0])
            values.update(included)
            overrides += more
        elif isinstance(entry, dict):
            overrides += [(k.removeprefix("override /"), v) for k, v in entry.items() if k.startswith("override /")]
    values.update({f"{package}.{k}" if package else k: v for k, v in leaves(content)})
    return values, overrides


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_with_its_own_values(group, option):
    """Every value an option file sets (or includes) arrives in the composed config, and its group overrides hold."""
    cfg = compose_config(f"{group}={option}")
    composed = OmegaConf.to_container(cfg, resolve=False)
    values, overrides = declared(CONFIG_DIR / group / f"{option}.yaml", group)
    for path, value in values.items():
        if path.startswith("hydra."):
            continue  # Hydra's own node (launcher settings) is not part of the job's config
        node = composed
        for key in path.split("."):
            node = node[key]
        assert node == value, f"{path}: {node!r} != {value!r}"
    for overridden, choice in overrides:
        if overridden == "model":
            assert cfg.model.name == choice
        if overridden == "scheduler":
            assert cfg.scheduler.name == f"lr-{choice}"
    assert values or overrides, "an option that sets nothing"


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "optimizer"])
def test_optimizers_instantiate_as_partials(option):
    optimizer_cfg, _ = split_optimizer_config(compose_config(f"optimizer={option}").optimizer)
    optimizer = instantiate(optimizer_cfg)([torch.nn.Parameter(torch.zeros(2))])
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert optimizer.param_groups[0]["lr"] == optimizer_cfg["lr"]


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "scheduler"])
def test_schedulers_are_step_functions_with_lightning_keys(option):
    cfg = compose_config(f"scheduler={option}")
    assert (cfg.scheduler.interval, cfg.scheduler.frequency, cfg.scheduler.name) == ("step", 1, f"lr-{option}")
    schedule = build_schedule(cfg)
    assert schedule(0) == 0.0 and schedule(cfg.scheduler.warmup_steps) == pytest.approx(1.0)


def test_adamw_has_esm2_values():
    opt = compose_config().optimizer
    assert opt._target_ == "torch.optim.AdamW" and opt._partial_
    assert list(opt.betas) == [0.9, 0.98] and opt.eps == 1e-8 and opt.weight_decay == 0.01


def test_default_groups_instantiate(tmp_path):
    cfg = compose_config("trainer=cpu", f"paths.output_dir={tmp_path}")
    assert isinstance(build_datamodule(cfg, check_config(cfg)), ProteinDataModule)
    assert all(instantiate(c) is not None for c in cfg.callbacks.values() if c is not None)
    logger = instantiate(cfg.logger.tensorboard)
    trainer = instantiate(cfg.trainer, precision="32-true", logger=logger)
    assert trainer.max_steps == cfg.trainer.max_steps and trainer.log_every_n_steps == 10


def test_a_run_that_cannot_fit_the_machine_is_refused_before_it_starts(monkeypatch):
    from protein_mlm.errors import ConfigError
    from protein_mlm.model import memory
    from protein_mlm.preflight import check_memory

    monkeypatch.setattr(memory, "available_bytes", lambda on_gpu: 24 * 2**30)  # a 24 GiB machine
    check_memory(compose_config("trainer=cpu"))  # ESM-2 8M at 4,096 tokens fits
    with pytest.raises(ConfigError, match=r"model=esm2_3b .* needs at least \d+\.\d GiB .* 24\.0 GiB free"):
        check_memory(compose_config("trainer=cpu", "model=esm2_3b"))
    check_memory(compose_config("trainer=cpu", "model=esm2_3b", "perf.check_memory=false"))  # the override
    monkeypatch.setattr(memory, "available_bytes", lambda on_gpu: 3 * 2**30)
    with pytest.raises(ConfigError, match="model.activation_checkpointing=true"):  # activations dominate here
        check_memory(compose_config("trainer=cpu", "model=esm2_35m", "data.max_tokens=16384"))
    check_memory(
        compose_config("trainer=cpu", "model=esm2_35m", "data.max_tokens=16384", "model.activation_checkpointing=true")
    )


def test_the_cli_checks_a_run_once_and_hands_its_plan_to_train(tmp_path, monkeypatch):
    """The CLI checks before Hydra runs the job; `train` gets that plan and checks nothing again."""
    import sys

    from protein_mlm import cli, preflight

    plans, handed = [], []
    quiet_hydra = ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]  # no log handlers left behind
    monkeypatch.setattr(
        sys, "argv", ["train.py", "model=tiny", "trainer.max_steps=7", f"hydra.run.dir={tmp_path}/run", *quiet_hydra]
    )
    loggers = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    disabled, root_level = [lg.disabled for lg in loggers], logging.root.level
    try:
        cli.run(
            "train",
            lambda cfg, plan: handed.append(plan) or {},
            lambda cfg: plans.append(preflight.check_config(cfg)) or plans[-1],
        )
    finally:  # Hydra's logging config disables every existing logger: later tests read theirs (caplog)
        for logger, was_disabled in zip(loggers, disabled):
            logger.disabled = was_disabled
        logging.root.setLevel(root_level)
    assert len(plans) == 1 and handed == plans
    assert plans[0].max_steps == 7 and plans[0].parameters > 0


@pytest.mark.parametrize(
    ("on_gpu", "varlen", "data", "expected"),
    [
        (False, True, {}, False),  # CPUs train padded batches
        (True, True, {}, True),  # CUDA with varlen flash attention packs
        (True, False, {}, False),  # a torch without varlen_attn
        (True, True, {"data.streaming": True, "data.max_tokens": None}, False),  # streaming has no lengths up front
        (True, True, {"data.max_tokens": None}, False),  # packing needs a token budget
    ],
)
def test_packing_auto_resolves_where_packed_rows_run_fast(monkeypatch, on_gpu, varlen, data, expected):
    from protein_mlm import plan as plan_module

    monkeypatch.setattr(plan_module, "varlen_available", lambda: varlen)
    cfg = compose_config(*(f"{k}={'null' if v is None else str(v).lower()}" for k, v in data.items()))
    assert cfg.data.packing == "auto"
    assert plan_module.resolve_packing(cfg.data.packing, on_gpu, cfg.data, 0.0) is expected
    assert plan_module.resolve_packing(True, False, cfg.data, 0.0) is True  # an explicit value is kept
    assert plan_module.resolve_packing("auto", True, compose_config().data, 0.1) is False  # attention dropout


def test_num_workers_auto_is_zero_on_cpus_and_a_few_per_gpu(monkeypatch):
    from protein_mlm import launch
    from protein_mlm import plan as plan_module

    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert plan_module.resolve_num_workers("auto", on_gpu=False, devices=1) == 0
    assert plan_module.resolve_num_workers("auto", on_gpu=True, devices=1) == plan_module.AUTO_WORKERS
    assert plan_module.resolve_num_workers("auto", on_gpu=True, devices=8) == 1  # 16 cores over 8 ranks
    assert plan_module.resolve_num_workers(3, on_gpu=True, devices=8) == 3
    assert check_config(compose_config("trainer=cpu")).num_workers == 0


def test_the_datamodule_refuses_an_unresolved_auto():
    from protein_mlm.errors import ConfigError

    with pytest.raises(ConfigError, match="build_datamodule"):
        ProteinDataModule(packing="auto")
    with pytest.raises(ConfigError, match="build_datamodule"):
        ProteinDataModule(num_workers="auto")
