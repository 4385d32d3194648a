# Two entry points for people, CI and scripts alike: `make demo` and `make test`.
# The first call creates .venv and installs the pinned requirements (about 2-3 minutes).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test data clean-outputs

$(STAMP): requirements.txt requirements-nodeps.txt constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -c "import torchvision.ops, transformers.modeling_utils, diffusers, faiss"
	touch $(STAMP)

install: $(STAMP)

data: $(STAMP)
	$(PY) generate_data.py

# The main job on the embedded default, the whole study a -> e, ending in outputs/REPORT.md.
# Each step reuses what an earlier `make demo` left (feature cache, generated images) and redoes the rest.
demo: export HF_HUB_OFFLINE := 1
demo: export MPLBACKEND := Agg
demo: $(STAMP)
	$(PY) generate_data.py
	$(PY) retrieval.py --run-name baseline
	$(PY) task_a.py --run-name demo
	$(PY) task_b.py --run-name demo --experiments all  # schedulers, steps, cfg, eta, negative, trajectory
	$(PY) task_c.py --retrieval-run outputs/retrieval/baseline --run-name demo
# task_d and task_e generate with the study generator's few-step student (4 UNet evaluations per image against its
# teacher's 40; all-correct within 0.05 of it: README "A few-step student"); the teacher's full-size runs are in the README
	$(PY) task_d.py --run-name demo --model shapes-tiny-f2-turbo --max-candidates 600 --ratios ''  # no ratio arms: time
	$(PY) task_e.py --run-name demo --model shapes-tiny-f2-turbo --edit-steps 0  # the student's own 4 steps: time
	$(PY) bench.py --quick --run-name demo  # the speed section: ratios, share of peak FLOP/s, index scale
	$(PY) report.py --readme README.md  # REPORT.md, and the README's measured numbers from these runs

# One pytest-xdist worker per core (one torch thread each, tests/conftest.py); a test file stays on one worker so its
# module fixtures run once. pytest exits 5 when it collects nothing: the suite went missing, so fail loudly.
test: $(STAMP)
	@$(PY) -m pytest -q -n auto --dist loadfile tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

clean-outputs:
	rm -rf outputs/*/ .cache
