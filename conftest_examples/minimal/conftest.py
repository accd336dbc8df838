# Nothing to write: the plugin is active once pytest-mtserve is installed. Pin the run's
# defaults in pytest.ini instead of typing them (see ../README.md).
