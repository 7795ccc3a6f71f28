# Two entry points: `make run` serves the worker, `make test` runs every check CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
NPM ?= npm

$(VENV)/.run: requirements.txt
	@echo "setting up $(VENV): installing requirements.txt (torch, diffusers; a few minutes the first time)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --progress-bar off -r requirements.txt
	$(VENV)/bin/python tools/torchvision_on_cpu_torch.py
	touch $@

$(VENV)/.dev: $(VENV)/.run requirements-dev.txt
	$(VENV)/bin/pip install -q -r requirements-dev.txt
	touch $@

# The seed systems' clients whose pins clash with the worker's (requirements-clients.txt): a virtualenv of their own.
.venv-clients/.installed: requirements-clients.txt
	$(PYTHON) -m venv .venv-clients
	.venv-clients/bin/pip install -q -r requirements-clients.txt
	touch $@

# newman, which runs postman_collection.json in the tests: exactly the versions package-lock.json pins.
node_modules/.installed: package.json package-lock.json
	@command -v $(NPM) >/dev/null || { echo "npm is not installed: install Node.js 18+ (apt-get install nodejs npm)" >&2; exit 1; }
	$(NPM) ci --no-audit --no-fund
	touch $@

.PHONY: run test test-quick lint system-tools image image-test gpu-wheels
# make run serves on this machine only (HOST=127.0.0.1) unless HOST says otherwise; the image keeps 0.0.0.0.
run: $(VENV)/.run  ## bake MODEL_ID (skipped when already baked), then serve on HOST:PORT
	$(PY) download.py
	HOST=$(or $(HOST),127.0.0.1) $(PY) app.py

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint Dockerfile

# The tests start a real redis-server and check compose.yaml with docker-compose: each is installed with apt-get
# when missing (as root, or through sudo).
SYSTEM_TOOLS := redis-server docker-compose
system-tools:
	@for tool in $(SYSTEM_TOOLS); do \
	  command -v $$tool >/dev/null && continue; \
	  if ! command -v apt-get >/dev/null; then \
	    echo "$$tool is not installed: install it (brew, dnf, ...) and run make test again" >&2; exit 1; \
	  elif [ "$$(id -u)" = 0 ]; then SUDO=; \
	  elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "$$tool is not installed and this user cannot install it: run 'apt-get install $$tool' as root, then make test again" >&2; exit 1; \
	  fi; \
	  echo "installing $$tool with apt-get"; \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$tool; \
	  command -v $$tool >/dev/null || { echo "apt-get did not install $$tool" >&2; exit 1; }; \
	done

# pytest-xdist runs the suite on every core, each file whole on one worker (its module's servers start once), the
# files with a slow check first (tests/conftest.py orders them), so that the longest never start last.
# ARGS goes to pytest: make test ARGS="-k lora -x"; make test-quick leaves out the checks marked slow.
PYTEST := $(PY) -m pytest -n auto --dist loadfile --no-loadscope-reorder
TEST_DEPS := $(VENV)/.dev node_modules/.installed system-tools .venv-clients/.installed

test: lint $(TEST_DEPS)  ## lint, then the whole test suite (what CI runs)
	$(PYTEST) $(ARGS)

test-quick: $(TEST_DEPS)  ## the suite without its few minute-long checks (the GPU check's, schemathesis, compile)
	$(PYTEST) -m "not slow" $(ARGS)

# The Docker image. Both start a Docker engine when none answers (as root). BASE_IMAGE=... builds on another base,
# BASE_IMAGE=standin on one made from Debian's mirror; image-test uses that one by itself when the default base
# cannot be pulled (see docker/image.py).
image: $(VENV)/.run  ## build the image of MODEL_ID (else build_args.env's), HF_TOKEN as a build secret
	$(PY) docker/image.py build $(if $(BASE_IMAGE),--base-image $(BASE_IMAGE))

image-test: $(VENV)/.run  ## build the tiny-sd image and check the running container; figures to bench/results/
	$(PY) docker/image.py test --out bench/results/image-cpu.json

# The prepared GPU check's packages (bench/gpu_wheels.py): the wheels a GPU machine with torch lacks, for its
# Python 3.12, into .gpu-wheels/ (about 54 MiB), which the check's call carries.
gpu-wheels: $(VENV)/.run
	$(PY) bench/gpu_wheels.py download
