# Copyright (c) medcbm contributors. Licensed under the Apache License, Version 2.0.
"""Option values: the runner's "None", YAML null and an empty override all mean "not given"."""

import pytest

from medcbm.options import is_unset, optional


@pytest.mark.parametrize("value", [None, "", "None", "none", "null", " NULL "])
def test_unset_values(value):
    assert is_unset(value) and optional(value) is None


@pytest.mark.parametrize("value", ["0", 0, False, "nonexistent.csv", "None.csv", [], {}])
def test_given_values_pass_through(value):
    assert not is_unset(value) and optional(value) is value
