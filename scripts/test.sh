#!/usr/bin/env bash
# The test suite, from a fresh machine: install (with test dependencies), then pytest.
CAIRN_EXTRAS=test source "$(dirname "$0")/env.sh"
python -m pytest -q "$@"
