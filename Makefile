# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv and
# installs what it needs on a fresh machine.
VENV := .venv
PY := $(VENV)/bin/python
LJ := $(VENV)/bin/llamajobs
STAMP := $(VENV)/.installed
# Tests and the demo install exact versions (constraints.txt); `make constraints` refreshes them.
PIP := $(PY) -m pip install -q -c constraints.txt
# The demo keeps its runs and site profile inside the checkout.
DEMO_ENV := LLAMAJOBS_HOME=$(CURDIR)/.demo XDG_CACHE_HOME=$(CURDIR)/.demo/cache

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
.PHONY: demo test golden clean constraints install

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(MAKE) --no-print-directory install VENV=$(VENV) PIP="$(PIP)"
	touch $@

# What a test environment needs, with PIP's constraints (none when `constraints` calls it).
install:
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch (on this machine's disk); the package itself asks only torch>=2.9,
	# which unpinned would pull a multi-GB CUDA build.
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	# The real LLaMA-style 32k tokenizer.model.v1 for tests; its dependencies would downgrade numpy.
	$(PIP) --no-deps mistral-common
	# transformers loads a mistral model_type's tokenizer through mistral-common when it is installed:
	# its other requirements, which leave numpy alone.
	$(PIP) jsonschema pydantic-extra-types pycountry pillow requests

demo: $(STAMP)
	mkdir -p .demo
	$(DEMO_ENV) $(LJ) estimate hours --size 7b --strategy fsdp --nodes 1 --gpus-per-node 8 --gpu a100-80g --tokens 2.5B
	$(DEMO_ENV) $(LJ) submit --cluster local --size tiny --strategy fsdp --procs-per-node 2 \
		--seq-len 128 --global-batch 8 --micro-batch 2 --epochs 20 --lr 3e-3 --name demo --wait --json \
		| tee .demo/last-submit.json
	$(DEMO_ENV) $(LJ) status
	$(DEMO_ENV) $(LJ) estimate hours $$($(PY) -c "import json; print(json.load(open('.demo/last-submit.json'))['id'])")

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

# Re-render the committed golden scripts under sbatch/ after a deliberate template change.
golden: $(STAMP)
	$(PY) -m tests.golden

# Refresh constraints.txt deliberately: a fresh venv takes what the registries serve today, unpinned.
# Run `make test` on the result before committing it.
constraints:
	rm -rf .venv-pins
	python3 -m venv .venv-pins
	$(MAKE) --no-print-directory install VENV=.venv-pins PIP=".venv-pins/bin/python -m pip install -q"
	{ sed -n '1,/^$$/p' constraints.txt | grep '^#'; .venv-pins/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-pins

clean:
	rm -rf $(VENV) .demo build *.egg-info
