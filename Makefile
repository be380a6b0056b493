# `make test` and `make demo` each build .venv on a fresh machine, then run.
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install -q
STAMP  := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export PYTHONUNBUFFERED := 1

.PHONY: test test-autoscale test-label-follow test-long demo lint install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0 numpy wheel setuptools
	# DeepSpeed's build imports torch: build it against the pinned one, not an isolated download.
	$(PIP) --no-build-isolation "deepspeed>=0.19,<0.20"
	$(PIP) -e '.[test,tune]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: $(STAMP) lint
	$(PY) -m pytest -q --durations=15 tests

# Sweeps stopped by ASHA and killed mid-trial (minutes each): kept out of `make test`'s 15 min.
test-long: $(STAMP)
	$(PY) -m pytest -q -m long tests

# Jobs growing Ray's fake autoscaling cluster from zero nodes (slow: nodes come and go).
test-autoscale: $(STAMP)
	$(PY) -m pytest -q -m autoscale tests/test_autoscale.py

# Does a moved label move the synthetic retina? Trains four tiny networks in-process (minutes).
test-label-follow: $(STAMP)
	CALDM_LABEL_FOLLOW=1 $(PY) -m pytest -q -s -o timeout=1500 tests/test_label_follow.py

demo: $(STAMP)
	$(PY) jobs/pipeline.py --out demo

clean:
	rm -rf $(VENV) .cache demo
