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

.PHONY: demo test test-deploy eval calibrate bench install clean train perf-analyzer checkov

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 is pinned in [models]: pip takes the CPU wheel from local disk, never CUDA
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffugts demo --out demo_out

test: $(STAMP) corpus-sources data-sources perf-analyzer $(CHECKOV_STAMP)
	$(PY) -m pytest

# Debian packages the training corpus reads (`diffugts corpus`), installed when missing; without
# apt-get or root the corpus skips those sources with a warning.
CORPUS_DEBS := mricron-data invesalius-examples
.PHONY: corpus-sources corpus
corpus-sources:
	@missing=$$(for p in $(CORPUS_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else echo "corpus-sources: cannot install $$missing (needs apt-get as root); the corpus skips them"; fi; \
	fi

# Data that ships only in sdists (diffugts/sdists.py, which pins them): pyradiomics' real tumours
# with expert masks (evaluation only) and TotalSegmentator's example body CT and MR with organ maps
# (corpus). pip fetches each sdist once, at install time; each file's SHA-256 is checked.
.PHONY: data-sources
data-sources: $(STAMP)
	$(PY) -m diffugts.sdists

corpus: $(STAMP) corpus-sources data-sources
	$(VENV)/bin/diffugts corpus --out corpus

# The MONAI Deploy app (apps/monai_deploy) in a venv of its own: installed next to monai, the SDK
# (monai.deploy) makes every `import monai` load Holoscan, so it stays out of .venv.
DEPLOY_VENV ?= .venv-deploy
test-deploy:
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/python -m pip install -q --upgrade pip
	$(DEPLOY_VENV)/bin/python -m pip install -q -e ".[dev,deploy]"
	$(DEPLOY_VENV)/bin/python -m pytest tests/test_monai_deploy.py

# checkov (policies on deploy/) pins packaging, networkx, ... below what our venv holds: a venv of its own.
$(CHECKOV_STAMP):
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q "checkov==3.3.30"
	touch $@

checkov: $(CHECKOV_STAMP)
	$(CHECKOV_VENV)/bin/checkov -d deploy --framework kubernetes dockerfile --skip-download --compact --quiet

# Zero-shot evaluation of the README's ablation tables: lesions the demo weights never saw, on the
# phantoms and on real anatomy (the corpus's installed scans, lesion kinds kept out of training),
# and pyradiomics' five real tumours with expert masks (evaluation only; overlays beside them). Two sets
# hold 1 to 3 metastases a case (brain, liver; prompted in the plural): what the component rules cost there.
UNSEEN := liver cyst,pancreas tumor,spleen lesion,liver metastasis
UNSEEN_KINDS := brain metastasis,intracranial hemorrhage,brain abscess
BODY_UNSEEN_KINDS := pancreas tumor,spleen lesion,liver metastasis
eval: $(STAMP) corpus-sources data-sources
	$(VENV)/bin/diffugts phantom --out eval_data/unseen --n 16 --seed 2026 --categories "$(UNSEEN)"
	$(VENV)/bin/diffugts evaluate eval_data/unseen --out eval_out/unseen.json --preset demo --ablation all
	$(VENV)/bin/diffugts corpus --out eval_data/corpus
	$(VENV)/bin/diffugts lesions --corpus eval_data/corpus --out eval_data/anatomy_unseen --n 18 --seed 2026 --kinds "$(UNSEEN_KINDS)"
	$(VENV)/bin/diffugts evaluate eval_data/anatomy_unseen --out eval_out/anatomy_unseen.json --preset demo --ablation all
	$(VENV)/bin/diffugts lesions --corpus eval_data/corpus --out eval_data/anatomy_unseen_several --n 18 --seed 2026 --kinds "brain metastasis" --lesions-per-case 3
	$(VENV)/bin/diffugts evaluate eval_data/anatomy_unseen_several --out eval_out/anatomy_unseen_several.json --preset demo --ablation all
	$(VENV)/bin/diffugts lesions --corpus eval_data/corpus --out eval_data/body_unseen --n 18 --seed 2026 --kinds "$(BODY_UNSEEN_KINDS)"
	$(VENV)/bin/diffugts evaluate eval_data/body_unseen --out eval_out/body_unseen.json --preset demo --ablation all
	$(VENV)/bin/diffugts lesions --corpus eval_data/corpus --out eval_data/body_unseen_several --n 18 --seed 2026 --kinds "liver metastasis" --lesions-per-case 3
	$(VENV)/bin/diffugts evaluate eval_data/body_unseen_several --out eval_out/body_unseen_several.json --preset demo --ablation all
	$(VENV)/bin/diffugts real-tumours --out eval_data/real_tumours
	$(VENV)/bin/diffugts evaluate eval_data/real_tumours --out eval_out/real_tumours.json --preset demo --ablation all
	$(VENV)/bin/diffugts segment eval_data/real_tumours/dataset.json --out eval_out/real_tumours --preset demo
	$(PY) -m diffugts.benchmarks.real_tumours_figure --out eval_out/real_tumours_overlay.png
	$(VENV)/bin/diffugts real-lesion --out eval_out --preset demo
	$(PY) -m diffugts.benchmarks.served_vs_eager --out eval_out/served_vs_eager.json

# The demo preset's inpainting theta and head threshold: chosen on seen categories only.
SEEN := kidney tumor,liver tumor,lung nodule,brain tumor
SEEN_KINDS := brain tumor,glioma,brain cyst
calibrate: $(STAMP) corpus-sources data-sources
	$(VENV)/bin/diffugts phantom --out eval_data/seen77 --n 16 --seed 77 --categories "$(SEEN)"
	$(VENV)/bin/diffugts corpus --out eval_data/corpus
	$(VENV)/bin/diffugts lesions --corpus eval_data/corpus --out eval_data/anatomy_seen77 --n 12 --seed 77 --kinds "$(SEEN_KINDS)"
	$(VENV)/bin/diffugts lesions --corpus eval_data/corpus --out eval_data/anatomy_seen78 --n 36 --seed 78 --kinds "$(SEEN_KINDS)"
	$(VENV)/bin/diffugts calibrate eval_data/seen77 eval_data/anatomy_seen77 eval_data/anatomy_seen78 \
	  --out eval_out/calibration.json --preset demo

# The shipped file (model card, "Ensemble of two heads", then "The scan alone where the map
# floods"): two residual heads trained apart on the bundled backbone, AOVA and text projection,
# joined. (1) v14, "Head on larger crops": the head
# fine-tuned on 48^3 crops of the loop's outputs (seen-kind lesions in real anatomy + seen
# phantoms), 5000 steps, then resumed to 20000 (the cosine schedule restarts over the new total).
# (2) v17, "small lesions": (1) fine-tuned with tissue-class contrasts, crops drawn by lesion size
# and a Dice per lesion, 8000 -> 16000 -> 24000 steps. (2b) v21, "CT lesions as often as MR": (2)
# fine-tuned 8000 steps on 640 lesion cases drawn a modality first (~320 MR, ~320 CT; model card,
# "The scan alone where the map floods"). (3) join-heads of (1) and (2b), each on 4 mirrorings.
# (4) paraphrases: the prompt projection fit so that other wordings of the seen prompts read as
# the seen prompt (model card, "Paraphrases"; no images, seconds). (5) v23, "A homogeneous bright
# seen kind": member 2 of (4), split off, fine-tuned 6000 steps with its recipe on cases drawn over
# the three brain kinds and meningioma, joined again with member 1 of (4).
# TRAIN_FROM is the file (1) starts from: the shipped file's history used the file before it
# (`git show 701ffb2:diffugts/weights/demo.safetensors`); from the bundled (joined) file a run
# starts from its first member. Resumable: rerun with more --head-steps (loop outputs are cached).
# The shipped heads' cases came from the generator before 2026-11-30, which clipped MR at 1 before its
# 99.5th-percentile rescale (model card, "The generator's MR ceiling"); this recipe now draws them
# without that ceiling, so its loop outputs differ from the shipped file's in those MR cases.
TRAIN_FROM ?= diffugts/weights/demo.safetensors
# the corpus the shipped heads drew from: heads only (the body source came after them; with it the
# healthy cases, drawn from every volume, would differ)
SHIPPED_CORPUS := nilearn-mni152,mricron-colin27,invesalius-cranium,pydicom-data,phantom
HEADS_ON_CORPUS := $(VENV)/bin/diffugts train heads --corpus train_work/corpus --aova-steps 0 --cases 136 --head-crop 48
TRAIN_HEADS := $(HEADS_ON_CORPUS) --anatomy-volumes 320
TRAIN_HEADS_BALANCED := $(HEADS_ON_CORPUS) --anatomy-volumes 640 --anatomy-modalities balanced
SMALL_LESIONS := --head-synth tissue --head-sampling size --head-dice lesion
train: $(STAMP) corpus-sources data-sources
	$(VENV)/bin/diffugts corpus --out train_work/corpus --sources $(SHIPPED_CORPUS)
	$(TRAIN_HEADS) --work train_work/v14 --backbone $(TRAIN_FROM) --head-steps 5000
	$(TRAIN_HEADS) --work train_work/v14 --backbone $(TRAIN_FROM) --head-steps 20000
	for steps in 8000 16000 24000; do \
	  $(TRAIN_HEADS) --work train_work/v17 --backbone train_work/v14/demo.safetensors $(SMALL_LESIONS) --head-steps $$steps; \
	done
	$(TRAIN_HEADS_BALANCED) --work train_work/v21 --backbone train_work/v17/demo.safetensors $(SMALL_LESIONS) \
	  --head-steps 8000
	$(VENV)/bin/diffugts join-heads train_work/v14/demo.safetensors train_work/v21/demo.safetensors --mirrors 4 \
	  --out train_work/joined.safetensors
	$(VENV)/bin/diffugts paraphrases train_work/joined.safetensors --out train_work/paraphrased.safetensors
	$(VENV)/bin/diffugts split-heads train_work/paraphrased.safetensors --out train_work/members
	$(TRAIN_HEADS_BALANCED) --work train_work/v23 --backbone train_work/members/member2.safetensors $(SMALL_LESIONS) \
	  --anatomy-kinds "$(SEEN_KINDS),meningioma" --head-steps 6000
	$(VENV)/bin/diffugts join-heads train_work/members/member1.safetensors train_work/v23/demo.safetensors --mirrors 4 \
	  --out train_work/demo.safetensors

# Triton's perf_analyzer (tritonclient 2.40.0's wheel, libb64 from Debian, libcudart from PyPI) under
# .tools/; optional: where it cannot be installed, the bench says so and uses its own load generator.
perf-analyzer: $(STAMP)
	-$(PY) -m diffugts.benchmarks.perf_analyzer install

bench: $(STAMP) perf-analyzer
	$(VENV)/bin/diffugts bench --preset demo --out bench_out --theta 0.05
	$(PY) -m diffugts.benchmarks.int8_latency bench_out

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) $(CHECKOV_VENV) demo_out eval_data eval_out bench_out build *.egg-info .tools
