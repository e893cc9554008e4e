# Two entry points: `make demo` and `make test`. Both create .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Debian's python3.11 matches the libpython3.11 that Triton's Python-backend stub embeds.
PYTHON ?= $(shell command -v /usr/bin/python3.11 || command -v python3.11 || command -v python3)
STAMP  := $(VENV)/.installed
CHECKOV_VENV  ?= .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test eval calibrate bench install clean checkov

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned in [models]: pip takes the CPU wheel from local disk, never CUDA
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffugts demo --out demo_out

test: $(STAMP) $(CHECKOV_STAMP)
	$(PY) -m pytest

# checkov (policies on deploy/) pins packaging, networkx, ... below what our venv holds: a venv of its own.
$(CHECKOV_STAMP):
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q "checkov==3.3.30"
	touch $@

checkov: $(CHECKOV_STAMP)
	$(CHECKOV_VENV)/bin/checkov -d deploy --framework kubernetes dockerfile --skip-download --compact --quiet

# Zero-shot evaluation of the README's ablation table: categories the demo weights never saw.
UNSEEN := liver cyst,pancreas tumor,spleen lesion,liver metastasis
eval: $(STAMP)
	$(VENV)/bin/diffugts phantom --out eval_data/unseen --n 16 --seed 2026 --categories "$(UNSEEN)"
	$(VENV)/bin/diffugts evaluate eval_data/unseen --out eval_out/unseen.json --preset demo --ablation all
	$(VENV)/bin/diffugts real-lesion --out eval_out --preset demo

# The demo preset's inpainting theta and head threshold: chosen on seen categories only.
SEEN := kidney tumor,liver tumor,lung nodule,brain tumor
calibrate: $(STAMP)
	$(VENV)/bin/diffugts phantom --out eval_data/seen77 --n 16 --seed 77 --categories "$(SEEN)"
	$(VENV)/bin/diffugts calibrate eval_data/seen77 --out eval_out/calibration.json --preset demo

bench: $(STAMP)
	$(VENV)/bin/diffugts bench --preset demo --out bench_out --theta 0.05

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) demo_out eval_data eval_out bench_out build *.egg-info
