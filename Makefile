# The two commands of the README: `make demo` and `make test`. Both create or reuse the
# virtualenv (.venv) and install fastmeta into it first (tools/bootstrap.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*.h)
# Require the C++ extension in tests unless the user asked for a pure-Python install.
REQUIRE_EXT := $(if $(filter 0,$(FASTMETA_BUILD_EXT)),0,1)

.PHONY: install test demo bench cuda-check aot-check aot-check-full device-plan ci clean peers bench-maml

$(VENV)/.installed: $(SOURCES) tools/bootstrap.sh
	bash tools/bootstrap.sh $(VENV)
	@touch $@

install: $(VENV)/.installed

test: install
	FASTMETA_REQUIRE_EXT=$(REQUIRE_EXT) $(PY) -m pytest tests -q

# Every learner on glyphs, MAML on sinusoid and MAML-TRPO on 2D navigation (by default 3.5 minutes of
# training shared by all runs); train longer: make demo DEMO_MINUTES=30 (minutes per run). Test
# accuracy next to a pixel nearest-neighbour baseline, then the op benchmark table.
# tools/demo.sh ends with the time of every phase of the run (install included when it ran).
DEMO_MINUTES ?=
DEMO_START := $(shell date +%s)
demo: install
	DEMO_START=$(DEMO_START) bash tools/demo.sh $(VENV) $(if $(DEMO_MINUTES),--minutes $(DEMO_MINUTES))

bench: install
	$(PY) bench/bench_proto.py
	$(PY) bench/bench_protonet.py

# MAML meta-step vs naive loop / higher / TorchOpt / torch.func vmap / learn2learn (the peers
# come from tools/install_peers.sh, never from `make install`). BENCH_MAML_ARGS=--quick: minutes.
BENCH_MAML_ARGS ?=
peers: install
	bash tools/install_peers.sh $(VENV)

bench-maml: peers
	$(PY) bench/bench_maml.py $(BENCH_MAML_ARGS)

cuda-check:
	bash csrc/check_cuda.sh

# Every Triton kernel compiled for sm_90 and sm_80 without a GPU, with ptxas's registers and
# spills per variant (tools/aot_check.py). CI runs the quick set; run the full set (every
# benchmark/test shape, every autotune config; it rewrites bench/results/triton_aot.md) before
# committing a kernel change.
aot-check: install
	$(PY) tools/aot_check.py --quick

aot-check-full: install
	$(PY) tools/aot_check.py --report bench/results/triton_aot.md

# The step plan and worst-case time of bench/device_check.sh (the one call on a lent GPU).
device-plan:
	bash bench/device_check.sh --dry-run

ci: cuda-check aot-check device-plan test

clean:
	rm -rf build *.egg-info fastmeta/_C*.so $(VENV)/.installed
