"""The training loop: accelerate for devices and processes, peft for LoRA, exact resume from checkpoints."""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .. import speed
from ..distributed import check_launcher, check_world_size, forward_view, global_batch
from ..errors import InputError, UserError
from ..families import Family, wan_i2v
from ..families.wan_vace import ZeroControl
from ..log import get_logger, quiet_libraries
from ..progress import progress_bar
from ..quantise import BasePrecision, adapter_dtype, cast_trainable, parameter_bytes, quantise
from ..prompts import ValidationPrompt
from . import (adapters, assistant, controlnet, crepa, evaluation, layersync, offload, reference, regularisation,
               text_encoders, tread)  # fmt: skip
from . import context_parallel, diff2flow
from .control import family_for_run, prepare_denoiser
from .family_options import FamilyText, FirstFrame, LoadBalancingLoss, load_base_parts
from .image_embeds import ImageEmbeds
from .checkpoint import (
    begin_checkpoint,
    finish_checkpoint,
    list_checkpoints,
    prune,
    read_checkpoint,
    save_rank_state,
)
from .data import Batch, CacheIndex, Cursor, EpochPlanner, SampleReader, TrainLoader
from .options import (
    AdapterOptions,
    CheckpointOptions,
    EvaluationOptions,
    ObjectiveOptions,
    OptimizerOptions,
    ValidationOptions,
)
from .seeding import isolated_rng, seed_global, training_seed

if TYPE_CHECKING:
    from ..notify import Notifier

log = get_logger("train")


class TrainingDiverged(UserError):
    """The loss became NaN or Inf."""


@dataclass
class RunState:
    step: int = 0
    cursor: Cursor = field(default_factory=Cursor)
    last_loss: float | None = None
    last_eval: float | None = None
    first_eval: float | None = None
    last_clip: float | None = None  # evaluation_type clip: the newest validation's mean CLIP score
    checkpoints: list[str] = field(default_factory=list)
    validations: list[str] = field(default_factory=list)
    interrupted: str | None = None


class _Signals:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop at the next step boundary."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_Signals":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint at the end of this step, then stopping", self.received)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One training run over a cache output."""

    def __init__(self, *, config, family: Family, source: str, vae_source: str | None, cache_root: Path,
                 cache_manifest: dict[str, Any], shared_embeds: dict[str, dict[str, Any]],
                 prompts_by_text: dict[str, dict[str, Any]], out_dir: Path, base_dir: Path,
                 resume_from: Path | None = None, run_record: dict[str, Any] | None = None,
                 validation_prompts: Sequence[ValidationPrompt] = (),
                 notifier: Notifier | None = None) -> None:  # fmt: skip
        """`resume_from`: the checkpoint this run continues (chosen by the stage); `run_record`: what identifies the
        run (train key, resume key, options, cache digest), stored in every checkpoint. `validation_prompts`: what
        validations render (none: no validation), with their embeddings in `prompts_by_text`. `notifier`: where
        progress, checkpoint and validation events go (a no-op one on processes other than the main one)."""
        import torch
        from accelerate import Accelerator

        quiet_libraries()
        # a flavour may train another pipeline (Flux Kontext), and control: true Flux's control pipeline
        family = family_for_run(family, config, source)
        family = reference.for_pairs(family, cache_manifest, controlnet=bool(config.controlnet))  # FLUX.2's image input
        self.config, self.family, self.out_dir = config, family, out_dir
        self.source, self.vae_source, self.base_dir = source, vae_source, base_dir
        self.adapter_options = AdapterOptions.from_config(config)
        self.checkpoint_options = CheckpointOptions.from_config(config)
        self.validation_options = ValidationOptions.from_config(config)
        self.notifier = notifier
        _reset_accelerator_state()
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        check_launcher(self.accelerator.distributed_type)
        check_world_size(config.num_processes, self.world)
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.seed = config.seed or 0
        self.cache_manifest = cache_manifest
        # Dataset roles that the options cannot serve stop the run before the model loads.
        datasets = {d["id"]: d for d in cache_manifest["datasets"]}
        regularisation.check(datasets, config.model_type, controlnet=bool(config.controlnet))
        diff2flow.check(datasets, config.diff2flow_enabled, config.diff2flow_loss, family.prediction_type)
        reference.check(family, cache_manifest, controlnet=bool(config.controlnet))
        if self.accelerator.is_main_process:
            reference.note_unused(family, cache_manifest, controlnet=bool(config.controlnet))
        self.evaluation = EvaluationOptions.from_config(config)
        evaluation.chosen_datasets(datasets, self.evaluation)
        self.shared = shared_embeds
        speed.check_train_options(config, self.device)
        crepa_options = crepa.options_for(config, family)  # a family CREPA cannot train stops before the model loads
        layersync_options = layersync.options_for(config, family)  # so does one LayerSync cannot train
        tread.check(config, family.name)  # so does a tread_config this run cannot route
        # context_parallel_size: each group of consecutive ranks shares one replica's batches (train.context_parallel)
        context_parallel.check(config, config.model_family or family.name, family.denoiser.class_name, self.world,
                               takes_reference=family.takes_reference)  # fmt: skip
        self.cp = context_parallel.layout_for(config, self.rank, self.world)
        self.memory_options = offload.MemoryOptions.from_config(config)
        offload.check(self.memory_options, self.device)

        # Frozen weights in the training dtype (quantised when base_model_precision says so); LoRA / LyCORIS weights in
        # bf16 with a bf16 base, else fp32, as in SimpleTuner (quantise.adapter_dtype); full training and the ControlNet
        # in the same dtype (SimpleTuner's weight_dtype).
        self.base_precision = BasePrecision.from_config(config, base_dir)
        assistant_file = assistant.resolve(config, family.name, base_dir)  # a missing adapter stops before loading
        parts = load_base_parts(family, source, config, base_dir, self.base_precision)  # another denoiser, if set
        denoiser = parts["denoiser"]
        context_parallel.check_denoiser(denoiser, self.cp)
        self._check_image_sizes(denoiser.config, bool(validation_prompts))
        self.scheduler_config = dict(parts["scheduler"].config)
        prepare_denoiser(family, denoiser)  # control: true widens the input layer (pipeline.train.control)
        # controlnet: true trains a ControlNet, built from the base's weights before they are quantised.
        self.control = controlnet.start(config, family, denoiser, source=source, vae_source=vae_source,
                                        base_dir=base_dir, seed=self.seed) if config.controlnet else None  # fmt: skip
        # TF32, QKV fusion and gradient checkpointing (every block, or every Nth) before adapters are added.
        self.speed_setup = speed.setup_denoiser(denoiser, config)
        quantise(denoiser, self.base_precision, family.name, self.device)
        self.denoiser_bytes = parameter_bytes(denoiser)
        # Flux schnell / Z-Image turbo: SimpleTuner's frozen assistant LoRA under the trained one (or None).
        self.assistant = assistant.attach(assistant_file, family, denoiser, adapter_dtype(self.base_precision))
        with isolated_rng(seed=self.seed):  # the initial LoRA weights depend on `seed` only
            self.params = adapters.attach(denoiser, self.adapter_options, family, base_dir=self.base_dir,
                                          dtype=adapter_dtype(self.base_precision)) \
                if self.control is None else []  # fmt: skip
            self.text = text_encoders.attach(denoiser, family, source, config, cache_manifest, cache_root, self.device)
        cast_trainable(self.params, adapter_dtype(self.base_precision))
        # CREPA's hooks and projector (its teacher: a frozen encoder, or another block), before blocks are compiled.
        self.crepa = crepa.attach(crepa_options, family, denoiser, source=source, vae_source=vae_source,
                                  base_dir=base_dir, seed=self.seed, device=self.device) if crepa_options else None
        # LayerSync's hooks on its student and teacher blocks (no parameters, no checkpointed state).
        self.layersync = layersync.attach(layersync_options, family, denoiser) if layersync_options else None
        offload.place(denoiser, self.memory_options, self.device)  # RamTorch: frozen layers to host memory first
        denoiser.train()
        # Group offload or block swap: where frozen blocks wait between uses (manifest: stats.memory).
        self.memory = offload.hold(denoiser, self.memory_options, family.name, self.device)
        # TREAD token routing (tread_config): hooks on the transformer's blocks, or None.
        self.tread = tread.attach(config, family.name, denoiser, self.device)
        context_parallel.apply(denoiser, self.cp, self.device)  # after the adapters, before compiling and wrapping
        # In place, after the adapters (so that they are compiled in) and before accelerate wraps the model.
        self.compiled = speed.compile_module(denoiser, config)
        if self.control is not None:  # the model becomes base + ControlNet; the ControlNet's parameters train
            denoiser, self.params = self.control.wrap(denoiser, self.device, adapter_dtype(self.base_precision))
        self.trainable_names = [n for n, p in denoiser.named_parameters() if p.requires_grad]

        from .objectives import Objective
        from .optim import build_lr_scheduler, build_optimizer, effective_learning_rate, prepare_gradient_release

        self.family_text = FamilyText.for_run(config, family)  # Flux's T5 mask, SD3's caption-dropout embeddings
        self.first_frame = FirstFrame.for_run(config, family)  # LTX-Video's image-to-video conditioning, or None
        self.image_embeds = ImageEmbeds.for_run(family, source, self.device)  # Wan i2v's CLIP embeddings, or None
        # Wan VACE's zero-control conditioning (WanVACEPipeline without control inputs), or None.
        self.vace = ZeroControl.for_run(family, source, vae_source, denoiser, self.device, config)
        self.balance = LoadBalancingLoss.attach(config, family, denoiser)  # HiDream's expert-gate loss, or None
        self.objective = Objective(ObjectiveOptions.from_config(config), kind=family.prediction_type,
                                   scheduler_config=self.scheduler_config,
                                   default_shift=family.default_flow_shift,
                                   sigma_curve=family.sigma_curve, flow_sigmas=family.flow_sigmas,
                                   flow_loss_weight=family.flow_loss_weight)  # fmt: skip
        self.index = CacheIndex(cache_root, cache_manifest)
        wan_i2v.check_cached_frames(family, self.index, warn=self.is_main)  # a Wan t2v / i2v model on the other's cache
        self.eval_sets = evaluation.sample_sets(self.index.samples, self.index.datasets, self.evaluation)
        self.planner = EpochPlanner(self.index, seed=self.seed, sampling=config.data_backend_sampling,
                                    global_batch=global_batch(config.train_batch_size, self.cp.data_parallel),
                                    accumulation=config.gradient_accumulation_steps,
                                    processes=self.cp.data_parallel)  # fmt: skip
        micro_per_epoch = self.planner.batches_per_epoch()
        if micro_per_epoch == 0:
            sizes = ", ".join(f"{d}/{b}: {len(k)}" for (d, b), k in sorted(self.index.groups.items()))
            own = "".join(f", dataset '{d}': {n // self.cp.data_parallel}" for d, n in self.planner.batch_sizes.items())
            raise InputError(
                f"train_batch_size {config.train_batch_size}{own} x {self.world} process(es) is larger than every "
                f"bucket ({sizes}); lower train_batch_size, or re-run `st prepare` with allow_dataset_oversubscription"
            )
        self.accum = max(1, config.gradient_accumulation_steps)
        self.micro_per_epoch = micro_per_epoch
        self.steps_per_epoch = max(1, micro_per_epoch // self.accum)
        self.total_steps = config.max_train_steps or config.num_train_epochs * self.steps_per_epoch
        self.epochs = max(config.num_train_epochs, math.ceil(self.total_steps / self.steps_per_epoch))
        if config.max_train_steps:
            self.epochs = math.ceil(self.total_steps / self.steps_per_epoch) + 1
        if self.planner.scheduled:  # start/end epoch/step: epochs differ in length, so the run is counted from them
            self.total_steps, self.epochs = self.planner.run_length(config.max_train_steps, config.num_train_epochs)
        # num_processes equals the world size here (check_world_size): lr_scale scales by the real global batch.
        self.optimizer_options = OptimizerOptions.from_config(config)
        self.learning_rate = effective_learning_rate(self.optimizer_options)
        trained = self.params + (self.crepa.parameters() if self.crepa is not None else [])
        groups = trained if self.text is None else [{"params": trained}, self.text.param_group()]
        optimizer = build_optimizer(groups, self.optimizer_options, device_type=self.device.type)
        self.lr_scheduler = build_lr_scheduler(optimizer, self.optimizer_options, self.total_steps)
        self.model, self.optimizer = self.accelerator.prepare(denoiser, optimizer)
        # optimizer_release_gradients: optimi steps and frees each parameter during the backward pass (its hooks hold
        # the unwrapped optimizer), so the loop below neither clips nor calls optimizer.step().
        self.release_hooks = (prepare_gradient_release(optimizer) if self.optimizer_options.optimizer_release_gradients
                              else None)  # fmt: skip
        self.forward_model = forward_view(self.model)  # what the family forwards call (DDP: calls wrapped, attrs not)
        # The parameters as the prepared (possibly wrapped) model holds them, listed once: clipping runs every step.
        self.prepared_params = [p for p in self.model.parameters() if p.requires_grad]
        self.prepared_params += self.text.parameters() if self.text is not None else []
        self.prepared_params += self.crepa.parameters() if self.crepa is not None else []
        self.generator = torch.Generator(device="cpu").manual_seed(
            training_seed(self.seed, self.cp.data_rank, config.seed_for_each_device))
        ema_device = self.device if config.ema_device == "accelerator" and not config.ema_cpu_only else "cpu"
        self.ema = (adapters.EMA(self._named_trainable(), config.ema_decay, ema_device, not config.ema_foreach_disable)
                    if config.use_ema else None)  # fmt: skip
        self.loader = TrainLoader(self.index, self.planner, rank=self.cp.data_rank, world=self.cp.data_parallel,
                                  shared_text=self.shared,
                                  empty_key=cache_manifest["embeds"]["empty"],
                                  caption_dropout=config.caption_dropout_probability, seed=self.seed,
                                  conditioning_sampling=config.conditioning_multidataset_sampling,
                                  prefetch=config.dataloader_prefetch_qlen if config.dataloader_prefetch else 0)  # fmt: skip
        self.checkpoints_dir = out_dir / "checkpoints"
        self.resume_from = resume_from
        self.run_record = run_record or {}
        self.state = RunState()
        self.has_validation = bool(validation_prompts)  # the same on every process
        self.validator = None  # renders on the main process only
        if validation_prompts and self.is_main:
            from .validation import Validator

            self.validator = Validator(family, self.validation_options, source=source, vae_source=vae_source,
                                       family_text=self.family_text,
                                       denoiser=self.unwrapped, prompts=list(validation_prompts),
                                       control=self.control.for_validation(
                                           self.unwrapped, self.index, len(validation_prompts)) if self.control else
                                       reference.validation_control(family, self.unwrapped, self.index,
                                                                    len(validation_prompts)),
                                       embeds=prompts_by_text, out_dir=out_dir / "validation",
                                       device=self.device, text_encoders=self.text,
                                       model_cpu_offload=self.memory_options.enable_model_cpu_offload,
                                       base_dir=base_dir)  # fmt: skip
        self.clip_eval = None  # evaluation_type clip: scores each validation's renders (main process)
        if self.validator is not None and config.evaluation_type == "clip":
            from .clip_eval import ClipEvaluator

            self.clip_eval = ClipEvaluator(config.pretrained_evaluation_model_name_or_path, self.device)
        self.uploads: list[Any] = []  # checkpoint uploads to the hub (push_checkpoints_to_hub), awaited at the end

    def _check_image_sizes(self, denoiser_config, validating: bool) -> None:
        """Refuse, before the first step, a bucket or validation size larger than the denoiser accepts."""
        from ..families.limits import check_image_sizes, vae_scale_factor
        from .validation import parse_resolutions

        sizes = parse_resolutions(self.validation_options.validation_resolution) if validating else ()
        check_image_sizes(self.family, denoiser_config, vae_scale_factor(self.family, self.source, self.vae_source),
                          self.cache_manifest["buckets"], sizes)  # fmt: skip

    @property
    def samples_per_step(self) -> int:
        """Samples in one optimizer step across all processes."""
        return global_batch(self.config.train_batch_size, self.cp.data_parallel, self.accum)

    # ---------------------------------------------------------------------------------------------- helpers

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _named_trainable(self) -> dict[str, Any]:
        params = dict(self.accelerator.unwrap_model(self.model).named_parameters())
        return {n: params[n] for n in self.trainable_names}

    def _rank_state(self) -> dict[str, Any]:
        from .state_io import generator_state, rng_state

        state = {"rng": rng_state(), "generator": generator_state(self.generator)}
        return {**state, "tread": self.tread.state()} if self.tread is not None else state

    def save_checkpoint(self, kind: str = "checkpoint") -> Path | None:
        name = f"{kind}-{self.state.step}"
        if self.is_main:
            self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            begin_checkpoint(self.checkpoints_dir, name)
        self.accelerator.wait_for_everyone()
        save_rank_state(self.checkpoints_dir / f"{name}.tmp", self.rank, self._rank_state())
        self.accelerator.wait_for_everyone()
        path = None
        if self.is_main:
            info = {"step": self.state.step, "cursor": self.state.cursor.as_dict(), "world": self.world,
                    "plan": self.planner.fingerprint(), "model_type": self.config.model_type,
                    "family": self.family.name, "last_loss": self.state.last_loss, "run": self.run_record,
                    "threads": _intra_op_threads()}  # fmt: skip
            with self.memory.saving(self.unwrapped):  # offload_during_save
                trained = (adapters.trainable_state(self.unwrapped, self.config.model_type) if self.control is None
                           else controlnet.trainable_state(self.unwrapped))  # fmt: skip
                parts = {
                    "weights": {**trained,
                                **(self.text.state() if self.text is not None else {})},
                    "ema": self.ema.state() if self.ema else None,
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.lr_scheduler.state_dict(),
                    "crepa": self.crepa.state() if self.crepa is not None else None,
                }
                path = finish_checkpoint(self.checkpoints_dir, name, parts, info)
            if self.notifier is not None:
                from .. import notify

                self.notifier.checkpoint(self.state.step, path)
                notify.post_checkpoint(self.config, self.state.step, path, cwd=self.base_dir)
            if self.checkpoint_options.push_checkpoints_to_hub and kind == "checkpoint":
                from ..remote.hub import upload_checkpoint

                self.uploads.append(upload_checkpoint(self.config, path, self.state.step, self.base_dir))
            prune(self.checkpoints_dir, kind, self.checkpoint_options.limit(kind), self._of_this_run)
            log.info("saved %s", path)
        self.accelerator.wait_for_everyone()
        return path

    def _of_this_run(self, checkpoint: Path) -> bool:
        from .resume import recorded_run

        return recorded_run(checkpoint).get("resume_key") == self.run_record.get("resume_key")

    def resume(self) -> None:
        """Continue from `resume_from` (weights, optimizer, scheduler, random states, data cursor), or seed a fresh
        start: the global random streams then begin at `seed`, as in every other run with this seed."""
        from .state_io import set_generator_state, set_rng_state

        path = self.resume_from
        if path is None:
            seed_global(self.seed)
            return
        loaded = read_checkpoint(path)
        info = loaded["info"]
        if info.get("model_type") != self.config.model_type or info.get("family") != self.family.name:
            raise InputError(f"checkpoint {path} is a {info.get('family')} {info.get('model_type')} run; this run is "
                             f"{self.family.name} {self.config.model_type}")  # fmt: skip
        weights = loaded["weights"]
        if self.text is not None:
            weights, text_weights = self.text.split(weights)
            self.text.load_state(text_weights)
        adapters.load_trainable_state(self.unwrapped, weights)
        self.optimizer.load_state_dict(loaded["optimizer"])
        self.lr_scheduler.load_state_dict(loaded["scheduler"])
        if self.ema and loaded["ema"]:
            self.ema.load(loaded["ema"])
        if self.crepa is not None:
            self._resume_crepa(path, loaded.get("crepa"))
        state = loaded["ranks"].get(self.rank)
        if state is not None and info.get("world") == self.world:
            set_rng_state(state["rng"])
            set_generator_state(self.generator, state["generator"])
            if self.tread is not None and "tread" in state:
                self.tread.load_state(state["tread"])
            elif self.tread is not None:
                log.warning("checkpoint %s was saved without tread_config: TREAD's router starts from its seed, so "
                            "the routed tokens differ from a run that had it all along", path.name)  # fmt: skip
        else:
            seed_global(self.seed)
            log.warning("checkpoint %s was written by %s process(es), this run has %d: random streams restart, so "
                        "noise and timesteps differ from an uninterrupted run", path, info.get("world"), self.world)
        if info.get("threads", _intra_op_threads()) != _intra_op_threads() and self.device.type == "cpu":
            log.warning("checkpoint %s was written with %s CPU threads, this run uses %d: oneDNN convolutions round "
                        "differently per thread count, so the weights will differ from an uninterrupted run in the "
                        "last bits (set OMP_NUM_THREADS to match)", path.name, info.get("threads"),
                        _intra_op_threads())  # fmt: skip
        if info.get("plan") != self.planner.fingerprint():
            log.warning("the data plan changed since %s (seed, cache or global batch size differ): the order of "
                        "batches from here on differs from the uninterrupted run", path.name)  # fmt: skip
        self.state.step = int(info["step"])
        self.state.cursor = Cursor(**info["cursor"])
        self.state.last_loss = info.get("last_loss")
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.state.step, self.state.cursor.epoch,
                 self.state.cursor.batch)  # fmt: skip

    def _resume_crepa(self, path: Path, state: dict[str, Any] | None) -> None:
        if state is None:
            raise InputError(f"checkpoint {path} has no CREPA projector (it was saved without crepa_enabled); resume "
                             "without CREPA, or start a new run")  # fmt: skip
        self.crepa.load_state(state)

    # ------------------------------------------------------------------------------------------------ steps

    def _text(self, texts: list[dict[str, Any]], step: int) -> dict[str, Any]:
        collated = self.family_text.denoiser_text(texts, self.family.collate_text(texts))
        if self.text is not None:  # train_text_encoder: embeddings from the encoders being trained
            collated = self.text.embed(collated, step)
        return {k: v.to(self.device) for k, v in collated.items()}

    def _attention(self, phase: str = "training"):
        """The kernel choice of attention_mechanism for `phase` (training, or inference: validation renders);
        entered around forward and backward."""
        return speed.attention_context(self.config.attention_mechanism, phase=phase,
                                       usage=self.config.sageattention_usage)  # fmt: skip

    def forward_loss(self, noised, texts: list[dict[str, Any]], meta: list[dict[str, Any]], guidance, step: int,
                     batch: Batch | None = None, mask=None, extra_text: dict[str, Any] | None = None):  # fmt: skip
        """The objective's loss of one forward pass of the denoiser on a noised batch (training and evaluation).
        `batch`: the batch the latents came from, for its paired data (conditioning images, masks, regularisation);
        a regularisation batch's target is the base model's prediction (pipeline.train.regularisation).
        `mask`: a training batch's loss mask (`Objective.choose_mask`); evaluation uses none, as in SimpleTuner.
        `extra_text`: tensors added to the denoiser's text batch (LTX-Video's `frame_timestep_scale`)."""
        text, guidance = self._text(texts, step), _to(guidance, self.device)
        text = {**text, **extra_text} if extra_text else text
        if self.image_embeds is not None:
            text = {**text, **self.image_embeds.text_inputs(batch)}
        if self.vace is not None:
            text = {**text, **self.vace.text_inputs(noised.noisy, batch)}
        noisy, timesteps = noised.noisy, noised.timesteps

        def predict():
            with self.accelerator.autocast():
                if self.control is not None:  # base + ControlNet on the batch's conditioning (pipeline.train.controlnet)
                    return self.control.predict(self.forward_model, noisy, timesteps, text, meta, guidance, batch)
                return self.family.denoiser_forward(self.forward_model, noisy, timesteps, text, meta, guidance=guidance,
                                                    reference=reference.latents(self.family, batch))

        if batch is not None and batch.regularisation:
            noised = replace(noised, target=regularisation.base_prediction(predict, self.unwrapped).float())
        return self.objective.loss(predict().float(), noised, step, mask)

    def _forward_loss(self, batch: Batch, step: int):
        """A training batch's loss: noise, timesteps and guidance drawn from the run's generator."""
        latents = batch.latents.to(self.device)
        context_parallel.check_batch(latents, self.unwrapped.config, self.cp, f"dataset {batch.dataset_id}")
        offset = float(self.index.datasets.get(batch.dataset_id, {}).get("timestep_sampling_offset", 0.0))
        noised = self.objective.draw(latents, self.generator, step, offset)  # the dataset's timestep offset
        guidance = self.objective.guidance(latents.shape[0], self.generator)
        # (Wan VACE: a mask clip is the pipeline's `mask` input, inside the cached control latents, not a loss mask.)
        mask = None if self.vace is not None else self.objective.choose_mask(batch.mask_pixels, batch.mask_kind,
                                                                              self.generator)  # fmt: skip
        texts = self.family_text.training_texts(batch.texts, batch.dropped)
        if self.tread is not None:  # TREAD keeps the tokens under a mask / segmentation image (SimpleTuner's)
            self.tread.keep_masked(batch.mask_pixels, batch.mask_kind, latents, self.unwrapped.config)
        extra_text = None
        if self.first_frame is not None and self.first_frame.applies(self.index.datasets[batch.dataset_id], latents):
            noised, extra_text, frame_mask = self.first_frame.apply(noised, latents, self.generator)
            mask = frame_mask or mask  # (video datasets have no mask images)
        if self.balance is not None:
            self.balance.take()  # only this step's gates count
        loss = self.forward_loss(noised, texts, batch.meta, guidance, step, batch=batch, mask=mask,
                                 extra_text=extra_text)  # fmt: skip
        if self.balance is not None:
            loss = loss + self.balance.take().to(loss.device)
        if self.crepa is not None:  # loss + crepa_lambda * the alignment loss of this forward pass
            loss = loss + self.crepa.loss(latents)
        if self.layersync is not None:  # loss - layersync_lambda * the student / teacher blocks' mean cosine similarity
            loss = loss + self.layersync.loss()
        return loss

    def evaluate(self) -> dict[str, float]:
        """Mean losses over fixed samples at fixed timesteps and fixed noise: `eval_loss`, and `eval_loss/<id>` per
        eval dataset (`pipeline.train.evaluation` says which samples); empty when there is nothing to evaluate."""
        import torch

        if not any(self.eval_sets.values()):
            return {}
        from .optim import averaged_weights

        reader = SampleReader()
        losses: dict[str, list[float]] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            # Compiled blocks run eagerly here: batch 1 without gradients would only add graphs to compile.
            # A schedule-free optimizer's averaged weights are evaluated, as in SimpleTuner.
            with torch.no_grad(), self._attention(), speed.eager_stance(bool(self.compiled)), \
                    isolated_rng(self.device), averaged_weights(self.optimizer):  # fmt: skip
                for name, keys in self.eval_sets.items():
                    losses[name] = self._eval_losses(keys, reader)
        finally:
            reader.close()
            self.model.train(was_training)
        values = evaluation.summarise(losses)
        names = sorted(values)
        reduced = self.accelerator.reduce(torch.tensor([values[n] for n in names], device=self.device),
                                          reduction="mean")  # fmt: skip
        values = {name: float(value) for name, value in zip(names, reduced.tolist())}
        self.state.last_eval = values.get(evaluation.OVERALL)
        return values

    def _eval_losses(self, keys: list[str], reader: SampleReader) -> list[float]:
        """The losses of samples `keys`, each at every `evaluation.eval_fractions` point (eval_timesteps of them)
        with noise seeded by its position."""
        import torch

        losses = []
        for i, key in enumerate(keys):
            batch = self.loader.sample_batch(key, reader)  # with its conditioning image (ControlNet, Kontext)
            latent = batch.latents
            g = torch.Generator(device="cpu").manual_seed(10_000 + i)
            for fraction in evaluation.eval_fractions(self.evaluation.eval_timesteps):
                noise = torch.randn(latent.shape, generator=g)
                noised = self.objective.fixed(latent.to(self.device), torch.tensor([fraction]), noise.to(self.device))
                guidance = self.objective.guidance(1, torch.Generator().manual_seed(0))
                losses.append(float(self.forward_loss(noised, batch.texts, batch.meta, guidance, self.state.step,
                                                      batch=batch)))  # fmt: skip
        return losses

    def run(self, tracker) -> RunState:
        """Train to `total_steps` (or until SIGINT/SIGTERM); `tracker` receives metrics on the main process."""
        import torch

        from .optim import clip_gradients, optimizer_eval_mode, optimizer_metrics, optimizer_train_mode

        config = self.config
        self.resume()
        state = self.state
        # Signals are caught from here on: one that arrives during the first validation or evaluation stops the run
        # after its first step, with a checkpoint, like one that arrives during training.
        with _Signals() as signals:
            if self.has_validation and state.step == 0 and not self.validation_options.disable_benchmark:
                self._validate(tracker, "base")
            if self.has_validation and self.validation_options.validation_on_startup:
                self._startup_validation(tracker)
            if self.evaluation.enabled and state.step == 0:
                values = self.evaluate()
                state.first_eval = state.last_eval
                if self.is_main and tracker and values:
                    tracker.log({"step": 0, **values})
            optimizer_train_mode(self.optimizer)
            bar = progress_bar(total=self.total_steps, desc="train", unit="step", initial=state.step) if self.is_main \
                else nullcontext()  # fmt: skip
            micro = 0
            losses: list[float] = []
            step_started = time.perf_counter()
            order_log = self._open_order_log()
            with bar, order_log:
                for batch in self.loader.iterate(state.cursor, self.epochs):
                    if state.step >= self.total_steps:
                        break
                    order_log.write(json.dumps({"step": state.step + 1, "epoch": batch.epoch, "batch": batch.index,
                                                "keys": batch.keys, "dropped": batch.dropped}) + "\n")  # fmt: skip
                    last_micro = (micro + 1) % self.accum == 0
                    sync = nullcontext() if last_micro or self.world == 1 else self.accelerator.no_sync(self.model)
                    with sync, self._attention():
                        loss = self._forward_loss(batch, state.step)
                        self.accelerator.backward((loss * self.cp.loss_scale if self.cp.enabled else loss) / self.accum)
                    losses.append(float(loss.detach()))
                    micro += 1
                    state.cursor = Cursor(batch.epoch, batch.index + 1)
                    if not last_micro:
                        continue
                    if self.text is not None:
                        self.text.sync_gradients(self.accelerator)
                    if self.crepa is not None:
                        self.crepa.sync_gradients(self.accelerator)
                    grad_norm = None  # gradient release: already stepped and freed in backward, never whole
                    if self.release_hooks is None:
                        grad_norm = clip_gradients(self.prepared_params, self.optimizer_options)
                        self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=config.set_grads_to_none)
                    state.step += 1
                    speed.maybe_clear_cache(state.step, config.accelerator_cache_clear_interval)
                    mean_loss = torch.tensor(sum(losses) / len(losses), device=self.device)
                    step_loss = float(self.accelerator.reduce(mean_loss, reduction="mean"))
                    losses = []
                    if not math.isfinite(step_loss):
                        self._diverged(state)
                    if self.ema and state.step % max(1, config.ema_update_interval) == 0:
                        self.ema.update(self._named_trainable())
                    elapsed = time.perf_counter() - step_started
                    step_started = time.perf_counter()
                    state.last_loss = step_loss
                    record = {"step": state.step, "epoch": batch.epoch, "loss": step_loss,
                              "lr": self.lr_scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                              "samples_per_s": self.samples_per_step / max(elapsed, 1e-9)}  # fmt: skip
                    if grad_norm is None:
                        del record["grad_norm"]
                    if self.crepa is not None:
                        record.update(self.crepa.metrics())
                    if self.layersync is not None:
                        record.update(self.layersync.metrics())
                    record.update(optimizer_metrics(self.optimizer))  # prodigy's d, as SimpleTuner logs it
                    if self.evaluation.due(state.step, self.steps_per_epoch):
                        record.update(self.evaluate())
                    if self.is_main:
                        tracker.log(record)
                        if self.notifier is not None:
                            self.notifier.progress(state.step, self.total_steps, record)
                        bar.update(1)
                        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{record['lr']:.2e}",
                                        sps=f"{record['samples_per_s']:.1f}")  # fmt: skip
                    epoch_done = state.cursor.batch >= self.planner.epoch_length(batch.epoch) // self.accum * self.accum
                    self._periodic(state, tracker, epoch_done, batch.epoch)
                    if signals.received:
                        state.interrupted = signals.received
                        optimizer_eval_mode(self.optimizer)
                        self.save_checkpoint()
                        break
        optimizer_eval_mode(self.optimizer)
        with open(self._order_log_path(), "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": state.step, "weights_sha256": self.weights_digest()}) + "\n")
        if state.interrupted is None and self.has_validation:
            self._validate(tracker, f"step-{state.step}")
        if self.evaluation.enabled and state.interrupted is None and not self.evaluation.due(state.step,
                                                                                            self.steps_per_epoch):
            values = self.evaluate()
            if self.is_main and values:
                tracker.log({"step": state.step, **values})
        return state

    def _order_log_path(self) -> Path:
        return self.out_dir / "logs" / f"data-rank{self.rank}.jsonl"

    def _open_order_log(self):
        """Which samples this process trained on at each step (an audit trail; trimmed to the resume step)."""
        path = self._order_log_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.is_file() and self.state.step > 0:
            for line in path.read_text().splitlines():
                record = json.loads(line)
                if "keys" in record and record["step"] <= self.state.step:
                    kept.append(line)
        path.write_text("".join(k + "\n" for k in kept))
        return open(path, "a", encoding="utf-8")

    def weights_digest(self) -> str:
        """sha256 over the trainable weights' bytes (equal on every process of a correct data-parallel run)."""
        import hashlib

        digest = hashlib.sha256()
        for name, param in sorted(self._named_trainable().items()):
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()

    def _periodic(self, state: RunState, tracker, epoch_done: bool, epoch: int) -> None:
        """The checkpoint and validation that fall on this step (`epoch_done`: it ended epoch `epoch`)."""
        kind = self.checkpoint_options.due(state.step, epoch_done, epoch)
        if kind is not None:
            from .optim import averaged_weights

            with averaged_weights(self.optimizer):  # schedule-free: SimpleTuner saves the averaged weights (eval())
                self.save_checkpoint(kind)
        wants_validation = self.validation_options.due(state.step, epoch_done, epoch)
        if self.has_validation and wants_validation and state.step < self.total_steps:
            self._validate(tracker, f"step-{state.step}")

    def _validate(self, tracker, label: str) -> None:
        from .optim import averaged_weights

        if self.validation_options.validation_method == "external-script":
            self._external_validation(label)
            return
        # Every process moves a schedule-free optimizer's weights to their average and back (their weights stay
        # equal), and leaves them in the mode they were in: after the last step they stay averaged for the export.
        with averaged_weights(self.optimizer):
            if not self.is_main:
                self.accelerator.wait_for_everyone()
                return
            was_training = self.model.training
            self.unwrapped.eval()
            try:
                # Validation renders other shapes than training: compiled blocks run eagerly rather than recompiling.
                with self._attention("inference"), speed.eager_stance(bool(self.compiled)), \
                        isolated_rng(self.device), (self.assistant.for_validation() if self.assistant else nullcontext()):
                    with context_parallel.suspended(self.unwrapped):  # the main process renders alone
                        self._render(tracker, label)
            finally:
                self.unwrapped.train(was_training)
        self.accelerator.wait_for_everyone()

    def _startup_validation(self, tracker) -> None:
        """validation_on_startup: a validation before the first step of every run, a resumed one too (at the step it
        resumes from), as SimpleTuner's. An external-script validation needs a checkpoint of that step: before a
        fresh run there is none, and it is skipped (as in SimpleTuner)."""
        from .validation import startup_label

        step = self.state.step
        if self.validation_options.validation_method == "external-script" and \
                step not in dict(list_checkpoints(self.checkpoints_dir, "checkpoint")):  # fmt: skip
            log.info("validation_on_startup: no checkpoint of step %d for the external validation script; skipped",
                     step)
            return
        self._validate(tracker, startup_label(step))

    def _render(self, tracker, label: str) -> None:
        """Validation images (and their EMA twins) for one label."""
        validator = self.validator
        ema_validation = self.validation_options.ema_validation
        if self.ema is not None and ema_validation in ("ema_only", "comparison") and label != "base":
            if ema_validation == "comparison":
                paths = validator.render(self.state.step, label)
                tracker.images(f"validation/{label}", paths, self.state.step)
            with _swapped(self._named_trainable(), self.ema.state()):
                paths = validator.render(self.state.step, f"{label}-ema")
            tracker.images(f"validation/{label}-ema", paths, self.state.step)
        else:
            paths = validator.render(self.state.step, label)
            tracker.images(f"validation/{label}", paths, self.state.step)
        self.state.validations.append(label)
        if self.clip_eval is not None:
            scores = self.clip_eval.evaluate(paths, {p.name: p.text for p in validator.prompts})
            if scores:
                tracker.log({"step": self.state.step, **scores})
                self.state.last_clip = scores["clip/mean"]
        if self.notifier is not None:
            self.notifier.validation(self.state.step, paths, [p.text for p in validator.prompts])

    def _external_validation(self, label: str) -> None:
        """validation_method = external-script: hand the newest checkpoint to the user's script."""
        from .. import notify

        if label == "base":
            return
        found = dict(list_checkpoints(self.checkpoints_dir, "checkpoint"))
        path = found.get(self.state.step) or self.save_checkpoint()
        if self.is_main and path is not None:
            notify.external_validation(self.config, self.state.step, path, cwd=self.base_dir)
            self.state.validations.append(f"{label}-external")
        self.accelerator.wait_for_everyone()

    def _diverged(self, state: RunState) -> None:
        found = list_checkpoints(self.checkpoints_dir, "checkpoint")
        last = (f"the latest checkpoint is {found[-1][1]} (if its weights had already begun to diverge, resume from an "
                "earlier one)" if found else "no checkpoint was saved before it")  # fmt: skip
        raise TrainingDiverged(
            f"the loss became NaN/Inf at step {state.step}; {last}. Try a lower learning_rate, max_grad_norm 1.0 with "
            "grad_clip_method norm, or mixed_precision bf16 instead of fp16"
        )


def _intra_op_threads() -> int:
    """torch's intra-op thread count: CPU results are bit-identical only between runs with the same count."""
    import torch

    return torch.get_num_threads()


def _reset_accelerator_state() -> None:
    """Let one process run several trainings with different settings (notebooks, tests): accelerate keeps its
    mixed-precision state in a process-wide singleton and refuses a second Accelerator that differs."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=False)


class _swapped:
    """Temporarily load other weights (EMA) into the trainable parameters."""

    def __init__(self, params: dict[str, Any], weights: dict[str, Any]) -> None:
        self.params, self.weights, self.saved = params, weights, {}

    def __enter__(self) -> None:
        import torch

        with torch.no_grad():
            for name, param in self.params.items():
                self.saved[name] = param.detach().clone()
                param.copy_(self.weights[name].to(param.device, param.dtype))

    def __exit__(self, *exc) -> None:
        import torch

        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(self.saved[name])


def _to(value, device):
    return None if value is None else value.to(device)
