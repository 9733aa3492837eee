"""One learner rank: a DeepSpeed ZeRO engine over a Hugging Face causal LM.

A ``Learner`` is a plain object; :mod:`safer_dist.cluster.group` runs one per Ray actor. Ranks form
their own torch.distributed group (gloo on CPU, NCCL on CUDA) from the address rank 0
publishes. Each rank derives its shard of every global batch itself (see
:mod:`safer_dist.train.sft_data`), so no tokens pass through the driver. Step-level DPO (ERPO's
training) is the :class:`~safer_dist.train.step_dpo.StepDpo` half of the class, in its own module;
the weight sync to rollout workers is this rank's end of :mod:`safer_dist.weights`.

Loss scaling: DeepSpeed divides the loss by the gradient-accumulation steps (GAS) and
averages gradients over the W data-parallel ranks. Each micro-batch's loss is the summed
token NLL over the *global* count N of labelled tokens, multiplied by GAS*W to undo both,
so the applied gradient is exactly that of mean NLL over the global batch — identical for
any split into ranks and micro-batches.

Token log-probs come from :class:`safer_dist.train.lm_head.LMHead`: by default the final hidden
states are projected onto the vocabulary ``learner.loss_chunk_tokens`` labelled tokens at a time,
so full fp32 logits never exist. ``setup`` reports the parameter count MFU is computed from
and the device's peak FLOP/s (:mod:`safer_dist.train.throughput`).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import record_function

from safer_dist.checkpointing.checkpoint import rank_digests
from safer_dist.checkpointing.async_save import save_in_background
from safer_dist.checkpointing.safe_load import weights_only_torch_load
from safer_dist.checkpointing.streamed_export import export_module
from safer_dist.config import DataSection, DpoLossSection, LearnerSection, ModelSection, OptimSection
from safer_dist.data.chat import system_prompt, with_system_records
from safer_dist.data.records import load_records
from safer_dist.train.attention import tree_packing_unsupported
from safer_dist.train.engine import (
    BACKWARD, FORWARD_LOSS, OPTIMIZER_STEP, client_optimizer_kwargs, deepspeed_config, init_distributed, read_numbers,
    resolve_device, resolve_dtype, rng_state, set_rng_state,
)
from safer_dist.train import lora_reference
from safer_dist.train.lm_head import LMHead
from safer_dist.train.lora import Adapters, check_adapters, export_merged, load_quantized
from safer_dist.train.losses import sft_loss
from safer_dist.train.models import count_params, load_model, load_tokenizer
from safer_dist.train.partitioned_load import load_model_partitioned
from safer_dist.train.step_dpo import StepDpo
from safer_dist.train.sft_data import (
    Encoded, SFTData, StepPrefetcher, encode_example, eval_micro_batches, num_label_tokens, pack, split_valid,
)
from safer_dist.train.tree_attention import PackedLayout, packed_layout
from safer_dist.runtime.log import get_logger, quiet_libraries
from safer_dist.train.throughput import device_peak_flops, non_embedding_params
from safer_dist.weights.ends import LearnerEnd
from safer_dist.weights.layout import Member, free_address

log = get_logger("learner")


class Learner(StepDpo):
    """One data-parallel rank. Methods are called by the driver through Ray.

    ``optim`` is the stage's optimisation (``cfg.train`` for SFT, ``cfg.erpo.optim`` for
    ERPO); ``model_path`` overrides ``model.path`` (ERPO starts from the SFT export);
    ``dpo_loss`` is the step-DPO loss :meth:`dpo_step` trains with.
    """

    def __init__(
        self, learner: LearnerSection, optim: OptimSection, model: ModelSection, data: DataSection,
        *, seed: int, device: str = "auto", model_path: str | None = None, dpo_loss: DpoLossSection | None = None,
    ):
        self.cfg, self.optim, self.model_cfg, self.data_cfg = learner, optim, model, data
        self.model_path = model_path or model.path
        self.dpo_loss = dpo_loss
        self.seed = seed
        self.device = resolve_device(device)
        if self.device == "cpu":
            torch.set_num_threads(learner.cpus_per_learner)
        self.engine = None
        self.adapters = None  # safer_dist.train.lora.Adapters with model.lora.rank > 0
        self._hf_ds_config = None  # ZeRO-3: transformers' HfDeepSpeedConfig, which it only references weakly
        self._data = None
        self._batches: StepPrefetcher | None = None
        self._valid = None  # the encoded validation set (eval_loss)
        self._pairs = None
        self._pair_batches: StepPrefetcher | None = None
        self.sync: LearnerEnd | None = None  # this rank's end of the weight sync to rollout workers (set up in setup)

    # -- set-up ---------------------------------------------------------------------------
    def address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to publish."""
        return free_address()

    def setup(self, rank: int, world_size: int, master_addr: str, master_port: int) -> dict:
        import deepspeed  # heavy, and it picks its accelerator when first imported: in the actor, at set-up

        self.rank, self.world_size = rank, world_size
        quiet_libraries()
        import ray  # as in address()

        init_distributed(
            rank, world_size, master_addr, master_port, "nccl" if self.device == "cuda" else "gloo",
            local_ip=ray.util.get_node_ip_address(),
        )
        random.seed(self.seed + rank)
        np.random.seed(self.seed + rank)
        torch.manual_seed(self.seed)
        self.dtype = resolve_dtype(self.model_cfg.dtype, self.device)
        self.tokenizer = load_tokenizer(self.model_path, trust_remote_code=self.model_cfg.trust_remote_code)
        t = self.optim
        ds_config = deepspeed_config(self.cfg, t, world_size, self.dtype)
        model = self._load_model(ds_config)
        if self.model_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            # transformers checkpoints a decoder layer only in training mode, and from_pretrained
            # returns the model in eval mode: without this, checkpointing would save no memory.
            # (Dropout then applies in training where the model has any; eval_loss switches to eval.)
            model.train()
        if self.model_cfg.lora.enabled:
            self.adapters = Adapters(self.model_cfg.lora, model, gradient_checkpointing=self.model_cfg.gradient_checkpointing)
            if rank == 0:
                log.info("%s", self.adapters.describe())
        trainable = [p for p in model.parameters() if p.requires_grad]  # all of them without adapters
        self.attn_implementation = model.config._attn_implementation
        optimizer = None
        if self.cfg.offload_optimizer:
            ds_config["optimizer"] = {
                "type": "AdamW",
                "params": {"lr": t.lr, "betas": [t.adam_beta1, t.adam_beta2], "weight_decay": t.weight_decay},
            }
        else:
            optimizer = torch.optim.AdamW(
                trainable, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
                **client_optimizer_kwargs(self.device),
            )
        # A plain function (not the bound method): LambdaLR then keeps it out of its state_dict.
        def lr_factor(step: int) -> float:
            return t.lr_factor(step)

        scheduler = (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)) if optimizer is None else (
            torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        )
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config,
            model_parameters=trainable if optimizer is None else None,
        )
        self.head = LMHead(self.engine.module, self.cfg.loss_chunk_tokens, self.device)
        self.share_prefix = self._share_prefix()
        self.sync = LearnerEnd(rank=rank, device=self.device, zero3=self.cfg.zero_stage == 3, lora=self.adapters)
        return {
            "rank": rank, "device": self.device, "dtype": str(self.dtype).replace("torch.", ""),
            "attn_implementation": self.attn_implementation, "loss_head": self.head.mode,
            "share_prefix": self.share_prefix,
            "num_params": count_params(model), "num_params_non_embedding": non_embedding_params(model),
            # with adapters, the parameters that get a weight gradient (MFU: safer_dist/train/throughput.py)
            **({"num_params_trained": self.adapters.num_trainable} if self.adapters is not None else {}),
            "peak_flops": device_peak_flops(self.device, self.cfg.peak_tflops),
        }

    def _load_model(self, ds_config: dict):
        """The model to train. Under ZeRO-3 it is built and loaded partitioned, so no rank ever
        holds the full weights (:mod:`safer_dist.train.partitioned_load`); otherwise every rank
        loads it whole, as rollout workers do."""
        m = self.model_cfg
        if m.quantization == "4bit":
            check_adapters(m, self.device)
            return load_quantized(self.model_path, attn_implementation=m.attn_implementation,
                                  trust_remote_code=m.trust_remote_code)
        if self.cfg.zero_stage == 3:
            model, self._hf_ds_config = load_model_partitioned(
                self.model_path, dtype=self.dtype, ds_config=ds_config, attn_implementation=m.attn_implementation,
                device=self.device, trust_remote_code=m.trust_remote_code,
            )
            return model
        return load_model(self.model_path, dtype=self.dtype, attn_implementation=m.attn_implementation,
                          device=self.device, trust_remote_code=m.trust_remote_code)

    def _share_prefix(self) -> bool:
        """Whether step-DPO packs each pair's context once (``dpo_loss.share_prefix`` and an
        attention backend that takes trees); says once why not when it was asked for."""
        if self.dpo_loss is None or not self.dpo_loss.share_prefix:
            return False
        why = tree_packing_unsupported(self.attn_implementation, self.device)
        if why is not None and self.rank == 0:
            log.warning("erpo.loss.share_prefix: %s; each pair's context is encoded twice", why)
        return why is None

    # -- training -------------------------------------------------------------------------
    def _sum_over_ranks(self, values: list) -> torch.Tensor:
        """Sums over ranks of ``values`` (numbers or 0-d tensors): a float64 ``[len(values)]`` tensor on
        the device, not read back (no host synchronisation; numbers go to the device in non-blocking
        copies, as a blocking one would wait for the device's queued work)."""
        t = torch.stack([v.to(self.device, torch.float64) if torch.is_tensor(v) else
                         torch.tensor(float(v), dtype=torch.float64).to(self.device, non_blocking=True)
                         for v in values])
        dist.all_reduce(t)
        return t

    def _all_reduce(self, values: list) -> list[float]:
        """:meth:`_sum_over_ranks` read back as numbers; one host synchronisation."""
        return self._sum_over_ranks(values).tolist()

    def _on_device(self, batch: dict, keys: tuple[str, ...] | None = None) -> tuple[dict, PackedLayout]:
        """``batch``'s tensors (those of ``keys``) on the learner's device, in non-blocking copies (a
        blocking one waits for the device's queued work), and its sequence boundaries, computed here
        once from the host ``position_ids`` for every layer's attention
        (:class:`~safer_dist.train.tree_attention.PackedLayout`)."""
        layout = packed_layout(batch["position_ids"]).to(self.device)
        return {k: batch[k].to(self.device, non_blocking=True) for k in keys or batch}, layout

    def _backward_and_step(self, scaled_loss: torch.Tensor) -> None:
        with record_function(BACKWARD):
            self.engine.backward(scaled_loss)
        with record_function(OPTIMIZER_STEP):
            self.engine.step()

    def sft_step(self, step: int) -> dict:
        """One optimizer step on global batch ``step``. Returns global metrics (same on all ranks).

        The global counts stay on the device (the loss divides by the labelled-token count there)
        and every metric is read back once, at the end: one host synchronisation per step."""
        t0 = time.perf_counter()
        batches, counts = self._sft_batches().get(step)
        local_label = sum(num_label_tokens(b) for b in batches if b is not None)
        local_tokens = sum(b["input_ids"].numel() for b in batches if b is not None)
        totals = self._sum_over_ranks([local_label, local_tokens, counts["truncated"], counts["dropped"]])
        # fp32 like the loss: the division rounds as it did by the count as a number (exact below 2**24)
        n_label = totals[0].clamp_min(1.0).float()
        scale = self.engine.gradient_accumulation_steps() * self.world_size
        lr = self.engine.get_lr()[0]
        # Summed on the device: no host synchronisation per micro-batch.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for b in batches:
            if b is None:  # every example of this micro-batch was dropped: keep ranks in step
                b = pack([Encoded([self.tokenizer.eos_token_id], [-100])])
            b, layout = self._on_device(b)
            with record_function(FORWARD_LOSS):
                loss = self.head.sft_loss(self.engine, b, n_label, layout)
            self._backward_and_step(loss * scale)
            loss_sum += loss.detach().double()
        loss_global = self._sum_over_ranks([loss_sum])
        loss, n_label, n_tokens, n_trunc, n_drop, grad_norm = read_numbers(
            [loss_global, totals, self.engine.get_global_grad_norm()], self.device
        )
        return {
            "loss": loss, "lr": lr, "num_tokens": int(n_tokens), "num_loss_tokens": int(n_label),
            "truncated": int(n_trunc), "dropped": int(n_drop), "grad_norm": grad_norm,
            "step_time_s": time.perf_counter() - t0,
        }

    def eval_loss(self) -> dict:
        """Validation loss under the current weights, no update. Collective.

        Each rank scores its shard of the validation set (``data.valid``, else the held-out
        ``data.valid_fraction`` of ``data.train``) with the training loss's formula
        (:func:`~safer_dist.train.losses.sft_loss`, summed NLL over labelled tokens); the sums
        and token counts are all-reduced, so ``valid_loss`` = total NLL / total labelled tokens
        over the whole set, for any number of ranks and micro-batch size. Validation prompts
        are encoded without ``data.segment_dropout``: every evaluation sees the same tokens.
        Returns ``{"valid_loss", "num_valid_tokens"}`` (same on all ranks).
        """
        batches = eval_micro_batches(
            self._valid_examples(), rank=self.rank, world_size=self.world_size,
            micro_batch_size=self.optim.micro_batch_size, share_prefix=self._share_sft_prefix(),
        )
        nll_sum, n_label = torch.zeros((), dtype=torch.float64, device=self.device), 0
        was_training = self.engine.training
        self.engine.eval()
        try:
            with torch.no_grad():
                for b in batches:
                    if b is None:  # this rank's shard ran out: a forward pass anyway (ZeRO-3 is collective)
                        b = pack([Encoded([self.tokenizer.eos_token_id], [-100])])
                    n_label += num_label_tokens(b)
                    b, layout = self._on_device(b)
                    logits = self.engine(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False,
                                         **layout.model_kwargs()).logits
                    nll_sum += sft_loss(logits, b["labels"], 1.0).double()  # summed on the device
        finally:
            self.engine.train(was_training)
        nll_global, n_global = self._all_reduce([nll_sum, n_label])
        return {"valid_loss": nll_global / max(n_global, 1.0), "num_valid_tokens": int(n_global)}

    def _train_and_valid_records(self) -> tuple[list, list]:
        train, valid = split_valid(load_records(self.data_cfg.train, "sft"), self.data_cfg.valid_fraction, self.seed)
        if self.data_cfg.valid:
            valid = list(load_records(self.data_cfg.valid, "sft"))
        system = system_prompt(self.data_cfg)
        return with_system_records(train, system), with_system_records(valid, system)

    def _valid_examples(self) -> list:
        if self._valid is None:
            _, records = self._train_and_valid_records()
            if not records:
                raise ValueError("no validation set: set data.valid=FILE or data.valid_fraction")
            self._valid = [
                encode_example(self.tokenizer, r["prompt"], r["response"], max_seq_len=self.data_cfg.max_seq_len,
                               overlong=self.data_cfg.overlong)
                for r in records
            ]
        return self._valid

    def _sft_batches(self) -> StepPrefetcher:
        """This rank's micro-batches of a step, the next step's prepared in the background."""
        if self._batches is None:
            t = self.optim
            self._batches = StepPrefetcher(
                lambda step: self._sft_data().micro_batches(
                    step, global_batch_size=t.global_batch_size, rank=self.rank, world_size=self.world_size,
                    micro_batch_size=t.micro_batch_size,
                ),
                enabled=self.cfg.prefetch_batches,
            )
        return self._batches

    def _sft_data(self):
        if self._data is None:
            train, _ = self._train_and_valid_records()
            self._data = SFTData(
                train, self.tokenizer, seed=self.seed,
                max_seq_len=self.data_cfg.max_seq_len, overlong=self.data_cfg.overlong,
                segment_dropout=self.data_cfg.segment_dropout, share_prefix=self._share_sft_prefix(),
            )
        return self._data

    def _share_sft_prefix(self) -> bool:
        """Whether SFT micro-batches encode their examples' common prompt prefix once: SFT only
        (``optim`` is then ``cfg.train``), with attention that takes a shared prefix."""
        return self.optim.share_prefix and tree_packing_unsupported(self.attn_implementation, self.device) is None

    def reference_logprobs(self, items: list, share_prefix: bool = True) -> list[tuple[float, int]]:
        """ERPO's ``erpo.reference=sft`` on LoRA learners: log p(continuation | prompt, prefix)
        and its token count per (prompt, prefix, continuation, ends_with_eos) item, under this
        model with every adapter off, i.e. the model ERPO started from
        (:mod:`safer_dist.train.lora_reference`). Collective; the same list on every rank."""
        assert self.adapters is not None, "the adapters-off reference needs model.lora.rank > 0"
        share = share_prefix and tree_packing_unsupported(self.attn_implementation, self.device) is None
        return lora_reference.reference_logprobs(self.engine, self.head, self.adapters, self.tokenizer, items,
                                                 share_prefix=share, rank=self.rank, world_size=self.world_size,
                                                 device=self.device)

    # -- weight sync to rollout workers -----------------------------------------------------
    def init_sync(self, host: str, port: int, member: Member) -> None:
        """Rank 0 opens its end of the weight sync as member 0 (``member``; other
        ranks have nothing to open), leaving the one it opened before, if any (the channel is
        rebuilt when a rollout worker restarts)."""
        import ray  # as in address()

        self.sync.open(host, port, member, local_ip=ray.util.get_node_ip_address())

    def send_weights(self, version: int) -> int:
        """Send the current weights to the rollout workers as ``version`` (with adapters: the
        adapters alone, safer_dist/weights/ends.py). Collective under ZeRO-3."""
        return self.sync.send(self.engine.module, version)

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, root: str, tag: str, client_state: dict, hash_files: bool = True,
                        background: bool = False) -> dict:
        """Write this rank's shards and RNG state into ``root/tag``; return the size (and sha256)
        of the files this rank wrote, fsynced (``checkpoint.rank_digests``). Collective.
        ``background``: copy them to host memory and write them on a thread, reporting there
        (safer_dist/checkpointing/async_save.py); returns {} once copied."""
        if background:
            save_in_background(self.engine, root, tag, client_state, rank=self.rank, hash_files=hash_files,
                               extra_files={f"rng_rank{self.rank}.pt": rng_state()})
            return {}
        self.engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
        torch.save(rng_state(), Path(root) / tag / f"rng_rank{self.rank}.pt")
        return rank_digests(Path(root) / tag, self.rank, hash_files)

    def load_checkpoint(self, root: str, tag: str, *, load_optimizer: bool = True, universal: bool = False) -> dict:
        """Restore shards, scheduler and this rank's RNG from ``root/tag``. Collective."""
        self.engine._config.load_universal_checkpoint = universal
        # DeepSpeed asks torch.load for full pickle; force weights-only (safer_dist/checkpointing/safe_load.py).
        with weights_only_torch_load():
            path, client_state = self.engine.load_checkpoint(
                root, tag=tag, load_optimizer_states=load_optimizer, load_lr_scheduler_states=load_optimizer,
                load_module_strict=True,
            )
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {root}/{tag}")
        rng_file = Path(root) / tag / f"rng_rank{self.rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return client_state or {}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Consolidated weights on rank 0 (None elsewhere). Collective under ZeRO-3."""
        if self.cfg.zero_stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            sd = self.engine.module.state_dict() if self.rank == 0 else None
        if sd is None or self.rank != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in sd.items()}

    def export_hf(self, out_dir: str) -> None:
        """Write a Hugging Face directory (safetensors, config, tokenizer), streamed tensor by
        tensor (:mod:`safer_dist.checkpointing.streamed_export`). Collective. With
        adapters: the merged model, plus the adapters alone in ``<out_dir>/adapter/``
        (:mod:`safer_dist.train.lora`)."""
        if self.adapters is not None:
            return export_merged(self.adapters, self.engine.module, self.tokenizer, out_dir, base_model=self.model_path,
                                 zero3=self.cfg.zero_stage == 3, rank=self.rank,
                                 trust_remote_code=self.model_cfg.trust_remote_code)
        export_module(self.engine.module, self.tokenizer, out_dir, zero3=self.cfg.zero_stage == 3, rank=self.rank)

    def logits(self, input_ids: list[int]) -> torch.Tensor:
        """Logits of one unpacked sequence under the current weights (for tests). Collective under ZeRO-3."""
        ids = torch.tensor([input_ids], device=self.device)
        with torch.no_grad():
            return self.engine(input_ids=ids, use_cache=False).logits[0].float().cpu()
