"""The README's usage example runs as written."""

import pathlib
import re


def test_readme_usage_example_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["loss"] > 0
    assert namespace["merged"]["attn"]["q_proj"]["kernel"].shape == (64, 64)


def test_readme_your_own_model_example_runs():
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## Your own model", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (2, 16, 64)
    assert namespace["adapted_stack"]["ScanLayer_0"]["Dense_0"]["kernel"].stack_shape == (6,)
