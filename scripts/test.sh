#!/usr/bin/env bash
# The test suite, from a fresh machine: install (with test dependencies), then pytest, whose exit code is ours.
#
# CAIRN_REQUIRE_ALL=1: any skip (pytest.skip, importorskip, skipif, xfail) fails the run with its reason, so a
# green run means every test ran. Tests of hardware or kernel features a machine may lack carry a marker (cuda,
# netem); they are deselected (not skipped) where this machine cannot run them, and this script says which and why.
# Extra pytest arguments are passed on (a -m of yours replaces the deselection).
#
# When allowed (root, as in CI), tests run in a network namespace whose only interface is loopback, so no server,
# Ray node or client in them can reach any other address. The pool tests need that: where no such namespace can
# be made, they fail with that reason.
CAIRN_EXTRAS=test source "$(dirname "$0")/env.sh"
export CAIRN_REQUIRE_ALL=1

netns=0
if unshare -n true 2>/dev/null; then
    netns=1
else
    echo "test.sh: cannot create a network namespace (needs root or user namespaces): the pool tests will FAIL;" \
         "run as root, as CI does" >&2
fi

deselect=()
if ! why=$(python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "torch sees no CUDA device")' \
           2>&1); then
    deselect+=("cuda")
    echo "test.sh: deselecting tests marked cuda: ${why##*$'\n'}" >&2
fi
if [ "$netns" = 0 ]; then
    deselect+=("netem")
    echo "test.sh: deselecting tests marked netem: no network namespace to shape loopback traffic in" >&2
elif ! why=$(unshare -n sh -c 'ip link set lo up && tc qdisc add dev lo root netem delay 1ms' 2>&1); then
    deselect+=("netem")
    echo "test.sh: deselecting tests marked netem: 'tc qdisc add ... netem' fails here (kernel without" \
         "sch_netem?): ${why:-tc not found}" >&2
fi

marks=()
if [ ${#deselect[@]} -gt 0 ]; then
    expr="not ${deselect[0]}"
    for m in "${deselect[@]:1}"; do expr="$expr and not $m"; done
    marks=(-m "$expr")
fi

if [ "$netns" = 1 ]; then
    exec unshare -n sh -c 'ip link set lo up && exec python -m pytest -q "$@"' sh ${marks[@]+"${marks[@]}"} "$@"
fi
exec python -m pytest -q ${marks[@]+"${marks[@]}"} "$@"
