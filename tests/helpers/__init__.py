"""Plain helpers shared by the tests (no fixtures: those are in tests/conftest.py).

- :mod:`tests.helpers.cifar`: tiny CIFAR-10 copies in the official format;
- :mod:`tests.helpers.runs`: composing tiny configs, running the CLI (in this process or
  as ``python -m dp_sweeps``), and re-evaluating a run's saved weights;
- :mod:`tests.helpers.audit`: the convnet audit's settings shared by the audit tests.

A test file imports from here, never from another test file.
"""
