"""Typed, frozen configuration for every pipeline stage.

Each stage has its own pydantic model; ``RunConfig`` nests them. Unknown keys are an error
(``extra="forbid"``), string options are ``Literal`` and validated at construction, so a typo
in a YAML file fails at load time with the bad key or value named.

Presets (``tiny``, ``demo``, ``srdd``) are YAML files in ``srdistill/presets/``; a user config
file and ``--set key.sub=value`` overrides are deep-merged on top of the chosen preset. What
the user sets wins over what a preset derives (``mine.patch_preset`` expands in the layer that
sets it; see ``load_config``); a conflict inside one layer is an error naming both values.
``describe_error`` turns a validation error into ``field.path: message`` lines for the CLI.

The parts: ``schema`` (the models) and ``loading`` (presets, files, overrides, errors); their
public names are re-exported here.
"""

from srdistill.config.loading import (PRESET_DIR, describe_error, load_config, parse_override, preset_names,
                                      read_yaml_mapping)
from srdistill.config.schema import (FEATURE_METHODS, LOWER_IS_HARDER, PATCH_PRESETS, RECIPES, AlignConfig, Arch,
                                     ClusterConfig, ComplexityConfig, ComplexityScore, CurriculumConfig, EmbedConfig,
                                     EvalConfig, FinetuneConfig, MZSRConfig, MineConfig, ProxyConfig, RayConfig,
                                     RunConfig, Score, SelectConfig, SelectScore, SynthConfig, TrainConfig)

__all__ = [
    "PRESET_DIR",
    "PATCH_PRESETS",
    "Score",
    "SelectScore",
    "ComplexityScore",
    "LOWER_IS_HARDER",
    "FEATURE_METHODS",
    "MineConfig",
    "EmbedConfig",
    "ComplexityConfig",
    "ClusterConfig",
    "ProxyConfig",
    "SelectConfig",
    "Arch",
    "AlignConfig",
    "CurriculumConfig",
    "TrainConfig",
    "RECIPES",
    "MZSRConfig",
    "FinetuneConfig",
    "SynthConfig",
    "EvalConfig",
    "RayConfig",
    "RunConfig",
    "preset_names",
    "parse_override",
    "read_yaml_mapping",
    "load_config",
    "describe_error",
]
