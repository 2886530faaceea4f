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
