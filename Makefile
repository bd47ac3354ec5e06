# The two commands a newcomer needs: `make demo` and `make test`. Both set the machine up first if needed.
STAMP := .venv/.setup-done

.PHONY: setup demo test bench bench-backends lint clean
setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup $(wildcard */apt-packages*.txt)
	scripts/setup
	touch $@

demo: $(STAMP)
	.venv/bin/python -m rig -- .venv/bin/python -m nvmetd.demo

test: $(STAMP)
	scripts/test

bench: $(STAMP)
	.venv/bin/python -m rig --memory 4G -- .venv/bin/python -m target.bench

bench-backends: $(STAMP)
	.venv/bin/python -m rig --memory 4G -- .venv/bin/python -m backends.bench

lint: $(STAMP)
	.venv/bin/ruff check .

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache
