import importlib

import companion


def test_every_public_name_resolves_to_its_module():
    for name in companion.__all__:
        value = getattr(companion, name)
        module = companion._LAZY.get(name)
        if module is not None:
            assert value is getattr(importlib.import_module(module), companion._ALIASES.get(name, name)), name


def test_unknown_name_raises_attribute_error():
    try:
        companion.not_a_thing  # noqa: B018
    except AttributeError as err:
        assert "not_a_thing" in str(err)
    else:
        raise AssertionError("expected AttributeError")


def test_rope_scaling_bf16_queries_and_weight_mapping_are_exported():
    import companion.models
    import companion.models.hf
    import companion.nn
    import companion.nn.positional
    import companion.runtime

    assert companion.RopeScaling is companion.nn.RopeScaling is companion.nn.positional.RopeScaling
    assert companion.cpu_has_native_bf16 is companion.runtime.cpu_has_native_bf16
    assert companion.cuda_has_native_bf16 is companion.runtime.cuda_has_native_bf16
    assert {"RopeScaling", "cpu_has_native_bf16", "cuda_has_native_bf16"} <= set(companion.__all__)
    assert companion.models.weight_mapping_rules is companion.models.hf.weight_mapping_rules
    assert "weight_mapping_rules" in companion.models.__all__
    assert not hasattr(companion.models.hf, "_rules")  # renamed: notebooks import no private names
