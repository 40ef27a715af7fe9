# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch 2.13.0 lies on this machine's disk; pinning it here keeps pip from
# pulling a multi-GB CUDA build for the open `torch` requirement of transformers/peft.
TORCH ?= torch==2.13.0

# The oldest transformers pyproject.toml allows, in a venv of its own: CI runs the parts of the suite
# that touch transformers (its private Trainer members, the model call, the trainer) on it.
FLOOR_VENV ?= .venv-floor
TRANSFORMERS_FLOOR := $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)

# The recipes' tests (tests/test_recipes.py) run orpo as a user installs it: a plain install, no extras
# ($(RECIPE_VENV)/plain), and for each set of extras a recipe's `# Launch:` line names (pip install 'orpo[...]'),
# a venv layered on the plain one (its site-packages reads the plain one's through a .pth file), where pip adds
# only what those extras bring. Reused across runs, as $(VENV) is; rebuilt when pyproject.toml changes. orpo itself
# is installed as users get it, from a wheel (not editable: a module the wheel leaves out would fail there), built
# again and reinstalled (without its dependencies) when a source file changes.
RECIPE_VENV ?= .venv-recipes
RECIPE_EXTRAS := $(sort $(shell sed -n "s/^\# Launch: .*orpo\[\([a-z0-9_,-]*\)\].*/\1/p" recipes/*.yaml))
PLAIN_PY := $(RECIPE_VENV)/plain/bin/python
RECIPE_VENVS := plain $(RECIPE_EXTRAS)
ORPO_SOURCES := $(shell find orpo -name '*.py')

.PHONY: setup recipe-venvs demo test test-floor clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

recipe-venvs: $(RECIPE_VENV)/.orpo-installed

$(RECIPE_VENV)/.orpo-installed: $(ORPO_SOURCES) $(RECIPE_VENVS:%=$(RECIPE_VENV)/%/.installed)
	rm -rf $(RECIPE_VENV)/wheel build  # build/: setuptools would pack stale modules left there
	$(PLAIN_PY) -m pip wheel -q --no-deps . -w $(RECIPE_VENV)/wheel
	for v in $(RECIPE_VENVS); do \
		$(RECIPE_VENV)/$$v/bin/python -m pip install -q --no-deps --force-reinstall $(RECIPE_VENV)/wheel/*.whl || exit 1; \
	done
	touch $@

$(RECIPE_VENV)/plain/.installed: pyproject.toml
	rm -rf $(RECIPE_VENV)
	$(PYTHON) -m venv $(RECIPE_VENV)/plain
	$(PLAIN_PY) -m pip install -q $(TORCH)
	$(PLAIN_PY) -m pip install -q .
	touch $@

# $(TORCH) again: pip keeps the plain venv's torch (an extra's newest release might ask for another)
$(RECIPE_VENV)/%/.installed: $(RECIPE_VENV)/plain/.installed
	rm -rf $(RECIPE_VENV)/$*
	$(PYTHON) -m venv $(RECIPE_VENV)/$*
	$(PLAIN_PY) -c 'import site; print(site.getsitepackages()[0])' > \
		$$($(RECIPE_VENV)/$*/bin/python -c 'import site; print(site.getsitepackages()[0])')/orpo-plain.pth
	$(RECIPE_VENV)/$*/bin/python -m pip install -q '.[$*]' $(TORCH)
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/orpo demo

test: setup recipe-venvs
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-floor:
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install -q $(TORCH)
	$(FLOOR_VENV)/bin/python -m pip install -q -e '.[test]' 'transformers==$(TRANSFORMERS_FLOOR)'
	$(FLOOR_VENV)/bin/python -c 'import transformers as t; from packaging.version import Version as V; \
		assert V(t.__version__) == V("$(TRANSFORMERS_FLOOR)"), t.__version__; print("transformers", t.__version__)'
	HF_HUB_OFFLINE=1 $(FLOOR_VENV)/bin/python -m pytest -q tests/train/test_internals.py tests/ops \
		tests/run/test_trainer.py tests/run/test_plan.py tests/run/test_finish.py tests/train/test_checkpoints.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) $(RECIPE_VENV) build *.egg-info
