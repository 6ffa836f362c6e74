# The README's quick start: `make demo` and `make test`; `make serve` serves the demo's model.
PYTHON ?= python3

.PHONY: install test demo serve container

# make installs into the active Python: make a virtual environment first to keep them apart (README)
install:
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -r requirements-nodeps.txt

test: install
	$(PYTHON) -m pip install -r requirements-extra.txt
	$(PYTHON) -m pytest -q --durations=10 tests

# character-level Tiny Shakespeare, 3 minutes of training (the config's max_time) on whatever runs it, a sample
demo: install
	$(PYTHON) prepare.py shakespeare_char
	$(PYTHON) train.py config/shakespeare_char_moe.py --overwrite=True
	$(PYTHON) sample.py --out_dir=out-shakespeare-char-moe --max_new_tokens=500
	@echo
	@echo 'next: python sample.py --start "ROMEO:" --num_samples=3          # more from this model'
	@echo '      make serve                                               # the same model over HTTP, and a web page'
	@echo '      python train.py config/shakespeare_moe.py                 # GPT-2 tokens instead of characters (a GPU helps)'

# the demo's model behind an OpenAI-compatible API and a web page on http://127.0.0.1:8000
serve: install
	$(PYTHON) -m pip install -r requirements-extra.txt
	$(PYTHON) serve.py --out_dir=out-shakespeare-char-moe

# the demo in Docker: build, train briefly, serve, and one completion with the openai client (docs/serving.md)
container:
	bash tests/container.sh
