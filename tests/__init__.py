"""spartan test suite: tests import their helpers as tests.tiny_models, tests.toy_data."""
