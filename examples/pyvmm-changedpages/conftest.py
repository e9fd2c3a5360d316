# pyvmm's test kit: its fixtures and --pyvmm-algorithm (an installed pyvmm loads it by itself)
pytest_plugins = ["pyvmm.testing.pytest_plugin"]
