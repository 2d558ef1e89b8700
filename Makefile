# Two commands on a fresh machine: `make setup`, then `make test`. `make demo` runs the pipeline on generated data;
# `make run CONFIG=path/to/config.json [OUT=runs/NAME]` runs it on your own config.
PYTHON ?= python3
VENV ?= .venv
# Installed before the project so that its `torch>=2.4` requirement is already met (and no CUDA build is pulled).
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
ST := $(BIN)/st
# The Python that runs the small input-listing helper of `make run` / `make dvc-params` (needs `pipeline`).
ST_PYTHON ?= $(BIN)/python
DEMO ?= demo

.PHONY: setup test wheel-test demo demo-data demo-controlnet run dvc-params bench clean-demo FORCE

# The last step builds optimum-quanto's CPU kernel for int4/int2 weights (a minute or two), which it would otherwise
# compile on first use; a failure there is only a note.
setup:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	-$(BIN)/python -c "from optimum.quanto.library.extensions import get_extension; get_extension('quanto_cpp').lib" \
		>/dev/null 2>&1 || echo "note: optimum-quanto's CPU kernel did not build now; it builds on first int4/int2 use"

# TEST_WORKERS=2 runs the tests in two pytest-xdist workers (the tests pin torch to one thread, so each keeps one core
# busy); --dist loadfile runs a test file whole on one worker, so its module fixtures are built once. 0: one process.
TEST_WORKERS ?= 2
test:
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Builds the wheel, installs it into a fresh virtualenv without the source tree and runs the four stages with it.
wheel-test:
	ST_PYTHON=$(abspath $(BIN)/python) bash tests/wheel_check.sh

bench:
	$(BIN)/python bench/prepare.py

clean-demo:
	rm -rf $(DEMO) $(CONTROLNET_DEMO)

# ---------------------------------------------------------------------------------------------------------------------
# The stage chain as Make rules.
#
# Why stamps: a stage that finds itself up to date writes nothing, so after `touch caption.txt` its manifest stays
# older than that caption. With the manifest as the only target, Make would run the stage on every invocation (and,
# if we touched the manifest to stop that, every later stage would run too, because the manifest would then be newer
# than their outputs). So each stage has two files, like ninja's `restat`:
#   OUT/.make/STAGE.stamp    "st STAGE was run after its inputs last changed": has the real prerequisites and the
#                            recipe; it is touched after every successful run, so Make runs a stage at most once per
#                            change of its inputs;
#   OUT/STAGE/manifest.json  the stage's output; its rule has no recipe, only the stamp as prerequisite. Make checks a
#                            file's time again after updating it, so the next stage runs only when st really rewrote
#                            the manifest (st's own key decides), not merely because the stamp was touched.
# A missing manifest (an output folder deleted by hand) forces its stage at the next run. OUT/.make/STAGE.cmd holds
# the stage's command line and is rewritten (when the Makefile is read) only when it changes, so `make demo
# DEMO_STEPS=60` re-runs `st train` while an unchanged command line changes no file. A stage's inputs are listed when
# the Makefile is read, files and the folders holding them (a folder's time changes when an image is added, removed
# or renamed); each gets an empty rule, so that a file that disappears during the run does not stop Make.
# Paths with spaces are not supported (a Make limitation).

# $(call remember,FILE,TEXT): write TEXT into FILE now, unless FILE already holds exactly TEXT.
remember = $(shell mkdir -p $(dir $(1)) && t='$(subst ','\'',$(strip $(2)))' && \
	{ [ -f $(1) ] && [ "$$(cat $(1))" = "$$t" ] || printf '%s\n' "$$t" > $(1); })

# $(call st_command,OUT,STAGE,CONFIG,PARENT_STAGE,EXTRA_ARGS): the st command line of one stage.
st_command = $(strip $(ST) $(2) --config $(3) $(if $(4),--input $(1)/$(4)) --output $(1)/$(2) $(5))

# $(call st_stage,OUT,STAGE,CONFIG,PARENT_STAGE,EXTRA_ARGS,INPUTS): the rules of one stage.
define st_stage
$(call remember,$(1)/.make/$(2).cmd,$(call st_command,$(1),$(2),$(3),$(4),$(5)))
$(1)/.make/$(2).stamp: $(3) $(if $(4),$(1)/$(4)/manifest.json) $(6) $(1)/.make/$(2).cmd \
		$(if $(wildcard $(1)/$(2)/manifest.json),,FORCE)
	$(call st_command,$(1),$(2),$(3),$(4),$(5))
	@touch $$@
$(1)/$(2)/manifest.json: $(1)/.make/$(2).stamp
endef

# $(call st_chain,LABEL,OUT,CONFIG,PREPARE_INPUTS,MODEL_INPUTS,TRAIN_ARGS,PUBLISH_ARGS)
# PREPARE_INPUTS: dataset list, images, captions; MODEL_INPUTS: model files (read by st cache and st train).
define st_chain
$(call st_stage,$(2),prepare,$(3),,,$(4))
$(call st_stage,$(2),cache,$(3),prepare,,$(5))
$(call st_stage,$(2),train,$(3),cache,$(6),$(5))
$(call st_stage,$(2),publish,$(3),train,$(7),)
$(if $(strip $(4) $(5)),$(sort $(4) $(5)):)
$(2)/.make/done: $(foreach s,prepare cache train publish,$(2)/.make/$(s).stamp) $(2)/publish/manifest.json
	@echo "$(1): published model in $(abspath $(2)/publish) (model card: README.md)"
	@touch $$@
endef

# ---------------------------------------------------------------------------------------------------------------------
# The demo: a tiny random-weight model and a generated dataset, then each stage in turn. A second `make demo` does
# nothing; editing a caption re-runs the stages from `st prepare` on (each one only if its output really changes).
DEMO_FAMILY ?= sd1x
DEMO_IMAGES ?= 24
DEMO_STEPS ?= 30
# Extra arguments for the demo's `st train`, e.g. DEMO_TRAIN_ARGS="--set validation_disable=true" (the tests use it).
DEMO_TRAIN_ARGS ?=
# The demo publishes ComfyUI's LoRA layout where ComfyUI has one for the family, else diffusers'.
NO_COMFYUI_FAMILIES := sana kolors lumina2 cosmos2image deepfloyd omnigen
DEMO_LORA_FORMAT ?= $(if $(filter $(DEMO_FAMILY),$(NO_COMFYUI_FAMILIES)),diffusers,comfyui)
DEMO_CONFIG := $(DEMO)/data/config.json
# Video families train on generated clips (`st sample-data --video`) and render short validation videos.
VIDEO_FAMILIES := wan ltxvideo
DEMO_VIDEO := $(filter $(DEMO_FAMILY),$(VIDEO_FAMILIES))
DEMO_VIDEO_ARGS := $(if $(DEMO_VIDEO),--set validation_num_video_frames=9)

ifneq ($(filter demo demo-data,$(MAKECMDGOALS)),)
ifeq ($(strip $(DEMO)),)
$(error DEMO must name a folder)
endif
DEMO_MODEL_CMD := $(ST) tiny-model $(DEMO_FAMILY) $(DEMO)/model
DEMO_DATA_CMD := $(ST) sample-data $(DEMO)/data $(if $(DEMO_VIDEO),--video,--images $(DEMO_IMAGES)) \
	--family $(DEMO_FAMILY) --model $(DEMO)/model
$(call remember,$(DEMO)/.make/model.cmd,$(DEMO_MODEL_CMD))
$(call remember,$(DEMO)/.make/data.cmd,$(DEMO_DATA_CMD))

$(DEMO)/model/model_index.json: $(DEMO)/.make/model.cmd
	rm -rf $(DEMO)/model
	$(DEMO_MODEL_CMD)

$(DEMO_CONFIG): $(DEMO)/.make/data.cmd | $(DEMO)/model/model_index.json
	rm -rf $(DEMO)/data
	$(DEMO_DATA_CMD)

# Listed when the Makefile is read (on the first run there is nothing yet, and no stamps either): files and folders,
# since a folder's time changes when a file in it is added, removed or renamed.
DEMO_DATA_FILES := $(filter-out $(DEMO_CONFIG),$(sort $(shell find $(DEMO)/data 2>/dev/null)))
DEMO_MODEL_FILES := $(filter-out $(DEMO)/model/model_index.json,$(sort $(shell find $(DEMO)/model 2>/dev/null)))
endif

ifneq ($(filter demo,$(MAKECMDGOALS)),)
$(eval $(call st_chain,demo,$(DEMO),$(DEMO_CONFIG),$(DEMO_DATA_FILES),$(DEMO)/model/model_index.json \
	$(DEMO_MODEL_FILES),--set max_train_steps=$(DEMO_STEPS) $(DEMO_VIDEO_ARGS) $(DEMO_TRAIN_ARGS),--set lora_format=$(DEMO_LORA_FORMAT)))
endif

demo-data: $(DEMO_CONFIG)
demo: $(DEMO)/.make/done

# ---------------------------------------------------------------------------------------------------------------------
# The ControlNet example (examples/controlnet-sd1x): a tiny SD 1.x model, generated shapes with their edge images, and
# the example's config and dataset list, through `make run` into $(CONTROLNET_DEMO)/{prepare,cache,train,publish}.
CONTROLNET_DEMO ?= demo-controlnet
demo-controlnet:
	test -f $(CONTROLNET_DEMO)/model/model_index.json || $(ST) tiny-model sd1x $(CONTROLNET_DEMO)/model
	$(ST) sample-data $(CONTROLNET_DEMO)/data --images $(DEMO_IMAGES) --conditioning controlnet
	cp examples/controlnet-sd1x/config.json examples/controlnet-sd1x/multidatabackend.json $(CONTROLNET_DEMO)/data/
	$(MAKE) --no-print-directory run CONFIG=$(CONTROLNET_DEMO)/data/config.json OUT=$(CONTROLNET_DEMO)

# ---------------------------------------------------------------------------------------------------------------------
# Your own config: `make run CONFIG=examples/sdxl-lora/config.json` writes runs/sdxl-lora/{prepare,cache,train,
# publish} (OUT=... to choose). The files each stage reads are listed by loading the config with st's own code: the
# dataset list, every file and folder under each dataset folder, parquet caption files, and the files of a local model
# folder or checkpoint and of user_prompt_library. A hub id has no files to watch: pin `revision` in the config.
# (One line of Python: Make hands $(shell) commands to /bin/sh without their newlines.)
INPUTS_PY := import sys; from pipeline.config import load_config; from pipeline.datasets import load_dataset_list; \
	l = load_config(sys.argv[1]); c = l.config; tree = lambda p: [p] + (sorted(p.rglob("*")) if p.is_dir() else []); \
	data = [l.resolve_path(c.data_backend_config)] if c.data_backend_config else []; lists = load_dataset_list(l); \
	data += [f for d in lists.images for f in tree(d.root) + ([d.parquet.path] if d.parquet else [])]; \
	data += [f for d in lists.conditioning if d.root is not None for f in tree(d.root)]; \
	model = [c.pretrained_model_name_or_path, c.pretrained_vae_model_name_or_path, \
	         c.pretrained_t5_model_name_or_path, c.user_prompt_library]; \
	model = [f for v in model if v and l.resolve_path(v).exists() for f in tree(l.resolve_path(v))]; \
	print(*["data:" + str(p) for p in data if p.exists()], *["model:" + str(p) for p in model])

ifneq ($(filter run,$(MAKECMDGOALS)),)
ifeq ($(strip $(CONFIG)),)
$(error make run needs CONFIG=path/to/config.json (and optionally OUT=runs/NAME))
endif
OUT ?= runs/$(notdir $(patsubst %/,%,$(dir $(abspath $(CONFIG)))))
# Errors (a missing folder, a bad option) are left to `st prepare`, which explains them.
RUN_INPUTS := $(shell $(ST_PYTHON) -c '$(subst ','\'',$(INPUTS_PY))' '$(CONFIG)' 2>/dev/null)
$(eval $(call st_chain,run,$(OUT),$(CONFIG),$(patsubst data:%,%,$(filter data:%,$(RUN_INPUTS))),\
	$(patsubst model:%,%,$(filter model:%,$(RUN_INPUTS))),,))
run: $(OUT)/.make/done
endif

# ---------------------------------------------------------------------------------------------------------------------
# `make dvc-params CONFIG=...` prints, for each stage, the keys of CONFIG that the stage reads (and that can change
# its output), as the `params:` lists of dvc.yaml.
DVC_PARAMS_PY := import sys; from pipeline.config import load_config, normalise_key, read_config_file; \
	l = load_config(sys.argv[1]); keys = list(read_config_file(l.path)); \
	print("\n".join(f"{s}:" + "".join(f"\n  - {k}" for k in keys if normalise_key(k) in l.config.stage_keys(s)) \
	                for s in ("prepare", "cache", "train", "publish")))

dvc-params:
ifeq ($(strip $(CONFIG)),)
	$(error make dvc-params needs CONFIG=path/to/config.json)
endif
	@$(ST_PYTHON) -c '$(subst ','\'',$(DVC_PARAMS_PY))' '$(CONFIG)'
