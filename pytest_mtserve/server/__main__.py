import sys

from pytest_mtserve.server.main import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m pytest_mtserve.server"))
