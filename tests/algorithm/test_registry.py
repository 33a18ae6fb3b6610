"""One declaration per algorithm: the config class registers its name (``@register_algo_config``), the
plugin its implementation (``register_algorithm``); every list of algorithms is derived from the two."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from typing import ClassVar

import pytest

import quark.torch.algorithm as algorithms
from quark.torch.algorithm import BlockAlgorithm, get_algorithm, register_algorithm, registered_algorithms
from quark.torch.quantization.config import template as template_module
from quark.torch.quantization.config.algo_configs import (
    ALGO_CONFIG_CLASSES,
    AlgoConfig,
    GPTQConfig,
    algo_config_from_dict,
    check_number,
    register_algo_config,
    with_field_overrides,
)
from quark.torch.quantization.config.config import QConfig
from quark.torch.quantization.config.template import LLMTemplate
from quark.torch.quantization.config.templates import _common
from tests.helpers import tiny_llama, token_batches

#: the built-in algorithms in the order the documentation lists them (LLMTemplate's docstring)
BUILTIN = ("awq", "gptq", "gptaq", "smoothquant", "autosmoothquant", "qronos", "rotation")


def derived_lists() -> dict[str, tuple[str, ...]]:
    """Every list of algorithm names the package derives from the registries."""
    return {
        "ALGO_CONFIG_CLASSES": tuple(ALGO_CONFIG_CLASSES),
        "template.SUPPORTED_ALGORITHMS": template_module.SUPPORTED_ALGORITHMS,
        "templates._common.algorithms()": tuple(_common.algorithms("model.layers")),
        "algorithm.registered_algorithms()": tuple(registered_algorithms()),
    }


@pytest.fixture
def clean_registries():
    """Registrations made by a test are undone afterwards."""
    configs = dict(ALGO_CONFIG_CLASSES)
    implementations = dict(algorithms._IMPLEMENTATIONS)
    yield
    ALGO_CONFIG_CLASSES.clear()
    ALGO_CONFIG_CLASSES.update(configs)
    algorithms._IMPLEMENTATIONS.clear()
    algorithms._IMPLEMENTATIONS.update(implementations)


def test_builtin_lists_agree():
    lists = derived_lists()
    for where, names in lists.items():
        assert names == BUILTIN, where
    implementations = registered_algorithms()
    assert len({type(a) for a in implementations.values()}) == len(implementations)  # one class per algorithm
    assert len(set(ALGO_CONFIG_CLASSES.values())) == len(ALGO_CONFIG_CLASSES)
    for name, config_class in ALGO_CONFIG_CLASSES.items():
        assert config_class.name == name
        algorithm = implementations[name]  # every config class has an implementation ...
        assert type(algorithm).config_class is config_class and algorithm.name == name
        assert get_algorithm(name) is algorithm
        # ... in the plugin module named after it (what get_algorithm imports on first use), as its ALGORITHM
        assert type(algorithm).__module__ == f"quark.torch.algorithm.{name}"
        assert sys.modules[f"quark.torch.algorithm.{name}"].ALGORITHM is algorithm
    for name, algorithm in implementations.items():  # and every implementation has a config class
        assert ALGO_CONFIG_CLASSES[name] is type(algorithm).config_class
    for model_type in LLMTemplate.list_available():
        assert tuple(LLMTemplate.get(model_type).algorithm_configs) == BUILTIN, model_type
    assert template_module.__all__.count("SUPPORTED_ALGORITHMS") == 1
    assert isinstance(template_module.SUPPORTED_ALGORITHMS, tuple)


def test_get_algorithm_imports_only_its_plugin():
    code = (
        "import sys\n"
        "from quark.torch.algorithm import get_algorithm\n"
        "assert get_algorithm('gptq').name == 'gptq'\n"
        "print(' '.join(m.rpartition('.')[2] for m in sys.modules if m.startswith('quark.torch.algorithm.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(out.split())
    assert "gptq" in loaded
    assert not loaded & (set(BUILTIN) - {"gptq"}), loaded  # the other plugins are not imported


def test_unknown_and_unimplemented_algorithms(clean_registries):
    with pytest.raises(ValueError, match="unknown algorithm 'nope'; allowed: awq, gptq, gptaq, smoothquant"):
        get_algorithm("nope")

    @register_algo_config
    @dataclass
    class UnimplementedConfig(AlgoConfig):
        name: ClassVar[str] = "test_unimplemented"

    with pytest.raises(NotImplementedError, match="'test_unimplemented' is not implemented"):
        get_algorithm("test_unimplemented")
    assert "test_unimplemented" not in registered_algorithms()  # what test_builtin_lists_agree catches


def test_registration_errors(clean_registries):
    with pytest.raises(TypeError, match="must declare its own algorithm name"):

        @register_algo_config
        @dataclass
        class Nameless(GPTQConfig):  # inherits "gptq"
            pass

    with pytest.raises(TypeError, match="not an AlgoConfig subclass"):
        register_algo_config(int)
    with pytest.raises(ValueError, match="'gptq' .* is already taken by .*GPTQConfig"):

        @register_algo_config
        @dataclass
        class OtherGPTQConfig(AlgoConfig):
            name: ClassVar[str] = "gptq"

    @dataclass
    class UnregisteredConfig(AlgoConfig):
        name: ClassVar[str] = "test_unregistered"

    class Unregistered(BlockAlgorithm):
        config_class = UnregisteredConfig

    with pytest.raises(ValueError, match="not a registered algorithm config; decorate it with @register_algo_config"):
        register_algorithm(Unregistered())
    with pytest.raises(TypeError, match="declares no config_class"):
        register_algorithm(BlockAlgorithm())
    with pytest.raises(TypeError, match="expected the AlgoConfig subclass"):

        class Wrong(BlockAlgorithm):
            config_class = int

    class SecondGPTQ(BlockAlgorithm):
        config_class = GPTQConfig

    with pytest.raises(ValueError, match="'gptq' .* is already implemented by quark.torch.algorithm.gptq.GPTQ"):
        register_algorithm(SecondGPTQ())
    assert get_algorithm("gptq") is sys.modules["quark.torch.algorithm.gptq"].ALGORITHM


def test_a_new_algorithm_appears_in_every_list(clean_registries):
    """Declaring a config class and a plugin class is all it takes: no list is edited."""

    @register_algo_config
    @dataclass
    class ScaleDownConfig(AlgoConfig):
        name: ClassVar[str] = "test_scale_down"
        factor: float = 0.5

        def validate(self) -> None:
            super().validate()
            check_number(self, "factor", 0, 1)

    calls = []

    class ScaleDown(BlockAlgorithm):
        config_class = ScaleDownConfig

        def apply(self, ctx, config):
            calls.append((ctx.index, type(ctx.module("mlp.up_proj")).__name__, config.factor))

    algorithm = register_algorithm(ScaleDown())
    assert algorithm.name == "test_scale_down"

    expected = (*BUILTIN, "test_scale_down")
    for where, names in derived_lists().items():
        assert names == expected, where
    assert get_algorithm("test_scale_down") is algorithm

    # the config layer knows it: (de)serialisation, --algo-config overrides, the CLI's checks, templates
    config = ScaleDownConfig(model_decoder_layers="model.layers", factor=0.25)
    assert algo_config_from_dict(config.to_dict()) == config
    assert QConfig.from_dict(QConfig(algo_config=[config]).to_dict()).algo_config == [config]
    assert with_field_overrides({"test_scale_down": config}, ["test_scale_down.factor=0.75"])[
        "test_scale_down"].factor == 0.75
    from quark.cli import _check_algo_config

    _check_algo_config(argparse.Namespace(algorithm=["test_scale_down"], algo_config=["test_scale_down.factor=1"]))
    template = LLMTemplate("test_model", algorithm_configs={"test_scale_down": config})
    qconfig = template.get_config("int8", algorithm="test_scale_down")
    assert qconfig.algo_config == [config] and qconfig.algo_config[0] is not config
    with pytest.raises(ValueError, match="has no default config"):
        LLMTemplate.get("llama").get_config("int8", algorithm="test_scale_down")
    qconfig = LLMTemplate.get("llama").get_config("int8", algorithm="test_scale_down", algo_configs={
        "test_scale_down": config})

    # and the quantizer runs it, block by block
    from quark.torch.quantization.api import ModelQuantizer

    ModelQuantizer(qconfig).quantize_model(tiny_llama(layers=2), token_batches(n=1, seq=8), progress=False)
    assert calls == [(0, "QuantLinear", 0.25), (1, "QuantLinear", 0.25)]


def test_a_test_registration_is_undone():
    """Runs after the test above: its algorithm is gone from every list again."""
    for where, names in derived_lists().items():
        assert names == BUILTIN, where
