"""Typed config tree, strict YAML loading, dotted overrides; every problem reported at once.

Usage::

    from camopd_megatron.config import load_config
    cfg = load_config("examples/configs/camopd.yaml", ["optim.lr=1e-5", "teachers[0].tp=2"])
"""

from camopd_megatron.config.api import config_from_dict, config_to_dict, dump_config, load_config
from camopd_megatron.config.errors import ConfigError
from camopd_megatron.config.root import Config, default_teachers
from camopd_megatron.config.sections import (
    BranchDataConfig,
    CheckpointConfig,
    DataConfig,
    DTypeName,
    EvalConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    ParallelConfig,
    PrecisionConfig,
    RolloutConfig,
    RunConfig,
    SchedulerConfig,
    SelectionConfig,
    TeacherConfig,
)

__all__ = [
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "ConfigError",
    "Config",
    "default_teachers",
    "RunConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "TeacherConfig",
    "BranchDataConfig",
    "DataConfig",
    "RolloutConfig",
    "SchedulerConfig",
    "SelectionConfig",
    "LossConfig",
    "OptimConfig",
    "PrecisionConfig",
    "CheckpointConfig",
    "EvalConfig",
    "LoggingConfig",
    "DTypeName",
]
