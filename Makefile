# Every target creates .venv and installs the kit (with its extras) when needed.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
EXTRAS  ?= dev,demo,medical
export MPLBACKEND ?= Agg
export GRADIO_ANALYTICS_ENABLED ?= False

.PHONY: tour test lab demo screenshot export clean-venv lessons

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

## The main job: degrade held-out images, run what the kit has, write tour/index.html
tour: $(STAMP)
	$(BIN)/diffsr tour --out tour

## The whole suite: notebooks and package in sync, undefined names, pytest (incl. nbdev-test)
test: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash .ci/sync_check
	$(BIN)/ruff check --select F821 diffsr_kit
	$(BIN)/python -m pytest tests -q -p no:cacheprovider

## Execute every lesson in full mode with the shipped checkpoints and store its outputs (two at a time)
lessons: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python scripts/run_lessons.py --jobs 2

## JupyterLab on the lessons
lab: $(STAMP)
	$(BIN)/python -m pip install -q jupyterlab
	$(BIN)/jupyter lab nbs/lessons

## The Gradio demo on 127.0.0.1
demo: $(STAMP)
	$(BIN)/diffsr demo

## Screenshot of the demo for the README (real headless Chromium: Debian's chromium + chromium-driver)
screenshot: $(STAMP)
	DIFFSR_SCREENSHOT=$(CURDIR)/assets/demo.png $(BIN)/python -m pytest tests/test_demo_browser.py -q -p no:cacheprovider
	$(BIN)/python -c "from PIL import Image; Image.open('assets/demo.png').convert('RGB').quantize(256, dither=Image.Dither.NONE).save('assets/demo.png', optimize=True)"  # 256 colours: a third of the size

## Re-export the package from the notebooks (contributor loop)
export: $(STAMP)
	$(BIN)/nbdev-clean
	$(BIN)/nbdev-export

clean-venv:
	rm -rf $(VENV)
