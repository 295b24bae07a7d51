#!/usr/bin/env bash
# The test suite, from a fresh machine: install (with test dependencies), then pytest.
# When allowed (root, as in CI), tests run in a network namespace whose only interface is loopback, so no
# server, Ray node or client in them can reach any other address; the pool tests require that and skip otherwise.
CAIRN_EXTRAS=test source "$(dirname "$0")/env.sh"
if unshare -n true 2>/dev/null; then
    exec unshare -n sh -c 'ip link set lo up && exec python -m pytest -q "$@"' sh "$@"
fi
echo "note: cannot create a network namespace here; pool tests will skip" >&2
python -m pytest -q "$@"
