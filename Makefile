# The two commands a newcomer needs: `make demo` (the main job) and `make test`.
# Each runs tools/setup.sh first, which is idempotent (seconds when nothing changed).
SHELL := /bin/bash
DURATION ?= 30

.PHONY: setup demo test bench soak clean

setup:
	@bash tools/setup.sh

demo: setup
	@source env.sh && python -m loom_ros.cli demo --duration $(DURATION) $(if $(VIEW),--view) $(if $(TRACE),--trace)

test: setup
	@source env.sh && python -m pytest -n 2 --dist loadgroup

clean:
	rm -rf build install log env.sh demo_output .pytest_cache

bench: setup
	@source env.sh && export ROS_DOMAIN_ID=$${ROS_DOMAIN_ID:-77} && for b in bus router agents perception speech plugins sandbox telemetry bridge cloud flows; do \
		echo "== bench/$${b}_bench.py"; python bench/$${b}_bench.py || exit 1; done

# The whole system under a bounded hostile load against a quiet run (about 5 minutes).
soak: setup
	@source env.sh && export ROS_DOMAIN_ID=$${ROS_DOMAIN_ID:-79} && python bench/soak_hostile.py
