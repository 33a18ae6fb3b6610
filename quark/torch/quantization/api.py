"""``ModelQuantizer``: resolve configs -> swap modules -> drive calibration -> (freeze).

Calibration of decoder LLMs is block-sequential: each block is calibrated on the outputs of the
already-quantized blocks before it (see :mod:`.driver`). With ``device`` different from where the
model lives, only the block being processed is moved to ``device`` (``QuantFlow.per_block``); the
result is the same as with the whole model on ``device``, only the memory differs. Models without a
stack of decoder blocks (any ``nn.Module``) are calibrated with whole-model forward passes.
The stack is the algorithm configs' ``model_decoder_layers``, else ``QConfig.model_decoder_layers``
(templates fill it in), else a guess. Blocks the model does not call on the calibration data (Mllama's
cross-attention blocks on text-only batches) keep min-max weight qparams, get no algorithm and keep
their static activation quantizers uncalibrated (:meth:`ModelQuantizer._skipped_blocks`).

Besides ``nn.Linear`` layers (swapped for ``QuantLinear`` by :func:`.prepare.swap_linears`), the fused
3-D expert weights of transformers-5 MoE blocks are quantized in place, per expert
(:mod:`.fused_experts`); the algorithms reach them through :mod:`.moe` (the GPTQ family solves each
expert on its routed tokens, SmoothQuant / AWQ / AutoSmoothQuant scale into and inside them, AWQ clips
them).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from quark.torch.utils.model_loading import drop_gguf_marker

from .attention import enable_softmax_quantization
from .config.config import QConfig
from .config.type import QuantFlow
from .driver import (
    BlockStore,
    HiddenSpill,
    call_model,
    capture_block_inputs,
    find_decoder_layers,
    for_each_block,
    module_device,
    run_after_blocks,
    run_block,
)
from .fused_experts import (
    QuantFusedExperts,
    find_fused_experts,
    fused_experts_modules,
    projection_configs,
    projection_shape,
)
from .modules import QuantLinear, quantized_linears, weight_caching
from .prepare import check_layer_shapes, swap_linears
from .tensor_quantizer import TensorQuantizer, set_mode

logger = logging.getLogger(__name__)

def _quantizers(module: nn.Module) -> list[TensorQuantizer]:
    return [m for m in module.modules() if isinstance(m, TensorQuantizer)]


def _drop_weight_caches(module: nn.Module) -> None:
    """Free the fake-quantized weight copies: during calibration only the current block keeps one,
    so peak memory stays near the float model's size (they are rebuilt lazily on the next forward)."""
    for m in module.modules():
        if isinstance(m, QuantLinear):
            m._wq_cache = None
        elif isinstance(m, QuantFusedExperts):
            m.drop_weight_caches()


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _holds_quantized_layers(layers: nn.ModuleList) -> bool:
    return any(isinstance(m, (QuantLinear, QuantFusedExperts)) for m in layers.modules())


def _update_weight_qparams(module: nn.Module) -> None:
    """Static weight qparams of every quantized layer under ``module`` (linears and fused experts)."""
    for m in module.modules():
        if isinstance(m, (QuantLinear, QuantFusedExperts)):
            m.update_weight_qparams()


@contextlib.contextmanager
def _transformers_bars_off() -> Any:
    """transformers' loader shows a progress bar per call: one per block is noise."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def check_calibration_batch(batch: Any, index: int) -> None:
    """Refuse the batches a language model cannot take, naming the batch and the fix: text that was
    not tokenized, and 1-D token ids (iterating a ``[batch, seq]`` tensor yields its rows)."""
    hint = ("the dataloader must yield token ids: a tensor [batch, seq], or a dict with 'input_ids' "
            "(e.g. quark.torch.evaluation.calibration_dataloader(tokenizer, ...))")
    if isinstance(batch, dict):
        values = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        values = list(batch)
    else:
        values = [batch]
    if any(isinstance(v, (str, bytes)) for v in values):
        raise TypeError(f"calibration batch {index} holds text ({type(batch).__name__}), not tokens: {hint}")
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch if isinstance(batch, torch.Tensor) else None
    if isinstance(ids, torch.Tensor) and ids.dim() == 1 and not ids.is_floating_point():
        raise ValueError(f"calibration batch {index} is 1-D token ids {list(ids.shape)}: give [batch, seq] "
                         "(a 2-D tensor is not a dataloader: iterating it yields 1-D rows; pass [ids] or "
                         "list(ids.split(1)))")


class ModelQuantizer:
    """Quantize a model according to a :class:`QConfig`.

    >>> quantizer = ModelQuantizer(LLMTemplate.get("llama").get_config("int4_wo_128"))
    >>> model = quantizer.quantize_model(model, calibration_batches)   # fake-quantized
    >>> model = ModelQuantizer.freeze(model)                            # stored codes
    """

    def __init__(self, config: QConfig) -> None:
        if not isinstance(config, QConfig):
            raise TypeError(f"config must be a QConfig (e.g. LLMTemplate.get(...).get_config(...)), got {type(config).__name__}")
        self.config = config

    # -- public ------------------------------------------------------------------------------------
    def quantize_model(
        self,
        model: nn.Module,
        dataloader: Iterable[Any] | None = None,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> nn.Module:
        """Swap the model's linears for quantized ones and calibrate them; returns the model (changed
        in place), fake-quantized. ``dataloader`` yields batches passed as ``model(**batch)`` (dicts)
        or ``model(batch)``; it is required when some activation spec is static or algorithms run."""
        cfg = self.config
        batches = self._batches(dataloader)
        self._prepare(model)

        flow = cfg.quant_flow
        home = module_device(model)
        if device is not None and flow is not QuantFlow.per_block:
            model.to(device)
        compute = torch.device(device) if device is not None else home
        with torch.no_grad():
            if batches is None or not (cfg.needs_calibration() or cfg.algo_config):
                # weight-only / fully dynamic and no algorithm: the weights alone give every qparam
                _update_weight_qparams(model)
            else:
                found = self._decoder_layers(model)
                if found is None:
                    self._calibrate_whole(model, batches, compute, progress)
                else:
                    self._calibrate_blocks(model, *found, batches, compute, progress)
        set_mode(model, "quantize")
        return model

    def _batches(self, dataloader: Iterable[Any] | None) -> list | None:
        """The calibration batches, checked against what the config needs."""
        cfg = self.config
        batches = list(dataloader) if dataloader is not None else None
        if batches is not None and len(batches) == 0:
            raise ValueError("dataloader is empty: give at least one calibration batch")
        for i, batch in enumerate(batches or []):
            check_calibration_batch(batch, i)
        if batches is None and cfg.needs_calibration():
            raise ValueError(
                "this config has static activation quantization (is_dynamic=False), whose scales come from "
                "calibration data: pass dataloader=... (e.g. a list of {'input_ids': tensor} batches)"
            )
        if batches is None and cfg.algo_config:
            names = ", ".join(a.name for a in cfg.algo_config)
            raise ValueError(f"algorithm(s) {names} need calibration data: pass dataloader=...")
        return batches

    def _prepare(self, model: nn.Module) -> None:
        """Swap the quantized layers in (linears, fused experts, attention quantizers); nothing is
        calibrated yet."""
        drop_gguf_marker(model)
        model.eval()
        self._swap_linears(model)
        self._wrap_fused_experts(model)
        model._quark_qconfig = self.config  # export writes it into config.json
        attention_modules = self._setup_attention(model)
        if self.config.softmax_quant_spec is not None:
            enable_softmax_quantization(model, attention_modules, self.config.softmax_quant_spec)

    def direct_quantize_checkpoint(
        self,
        src_dir: Any,
        dst_dir: Any,
        *,
        device: torch.device | str | None = None,
        pack_method: str = "reorder",
        max_shard_size: int | str | None = None,
        overwrite: bool = False,
        progress: bool = True,
        dataloader: Iterable[Any] | None = None,
        custom_mode: str = "quark",
        weight_format: str = "real_quantized",
        hidden_states_budget: int | str | None = None,
    ) -> Any:
        """Quantize the float Hugging Face checkpoint in ``src_dir`` into an export in ``dst_dir`` without
        ever holding the whole model in memory; returns ``dst_dir`` as a Path. Resumable after a crash.

        - With a ``dataloader``: the streamed flow (:mod:`.streamed`), for every config ``quantize_model``
          takes (algorithms with rotation, static activations, fp8 KV cache and attention, fused MoE
          experts): one decoder block at a time is loaded from the memory-mapped shards onto ``device``,
          quantized and calibrated exactly as in memory, written and freed. Memory: the embeddings,
          lm_head, one block and the calibration hidden states. ``custom_mode`` / ``weight_format`` as
          in ``export_safetensors``; ``max_shard_size`` splits a block's file. The calibration hidden states
          carried from block to block stay in memory, in the model's dtype, unless they would exceed
          ``hidden_states_budget`` (bytes or ``"8GB"``): then they live in files next to the output.
        - Without: file-to-file (``QuantFlow.file2file``, :mod:`quark.torch.export.file2file`), shard by
          shard without building the model (memory: about one input + one output shard); weight-only
          and fully dynamic schemes only, quark real-quantized layout.

        Either way the result equals ``quantize_model`` + ``export_safetensors`` with the same arguments."""
        if dataloader is not None:
            return self._quantize_streamed(
                src_dir, dst_dir, dataloader, device=device, custom_mode=custom_mode, weight_format=weight_format,
                pack_method=pack_method, max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                hidden_states_budget=hidden_states_budget,
            )
        if hidden_states_budget is not None:
            raise ValueError("hidden_states_budget applies to the streamed flow: pass a dataloader")
        if custom_mode != "quark" or weight_format != "real_quantized":
            raise ValueError("without a dataloader direct_quantize_checkpoint goes file to file, which writes "
                             "custom_mode='quark', weight_format='real_quantized' only; pass a dataloader for the "
                             "streamed flow")
        from quark.torch.export.file2file import direct_quantize_checkpoint

        return direct_quantize_checkpoint(
            self.config, src_dir, dst_dir, device=device, pack_method=pack_method,
            max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
        )

    def _quantize_streamed(self, src_dir: Any, dst_dir: Any, dataloader: Iterable[Any], *,
                           device: torch.device | str | None, custom_mode: str, weight_format: str,
                           pack_method: str, max_shard_size: int | str | None, overwrite: bool,
                           progress: bool, hidden_states_budget: int | str | None = None) -> Any:
        """The streamed flow (:mod:`.streamed`): the model skeleton from the source's config.json, the
        part outside the decoder stack loaded on ``device``, then :meth:`_calibrate_blocks` with a
        :class:`.streamed.DiskBlockStore` that reads each block from the source and hands it to a
        :class:`~quark.torch.export.streamed_output.StreamedOutput` once done."""
        from pathlib import Path

        from quark.torch.algorithm import get_algorithm
        from quark.torch.export.safetensors_io import parse_size
        from quark.torch.export.source_checkpoint import SourceCheckpoint
        from quark.torch.export.streamed_output import StreamedOutput, check_destination, run_hash
        from quark.torch.export.writing import plan_export

        from .streamed import DiskBlockStore

        src, dst = Path(src_dir), Path(dst_dir)
        check_destination(src, dst, overwrite)
        batches = self._batches(dataloader)
        compute = torch.device(device) if device is not None else torch.device("cpu")
        limit = (1 << 62) if max_shard_size is None else parse_size(max_shard_size)
        budget = None if hidden_states_budget is None else parse_size(hidden_states_budget)

        source = SourceCheckpoint(src)
        model = source.skeleton()
        self._prepare(model)
        found = self._decoder_layers(model)
        if found is None:
            raise ValueError(f"the streamed flow goes block by block, but {type(model).__name__} has no decoder stack "
                             "that was found: set model_decoder_layers in the QConfig")
        path, layers = found
        # the output head runs after the blocks only: it is loaded when they are done (unless it is tied
        # to the input embeddings, which the capture needs)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        inputs_embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        # (nor when an algorithm's model-level preparation changes it: rotation)
        changes_head = any(get_algorithm(a.name).keeps_float_function for a in self.config.algo_config or [])
        deferred = [] if head is None or changes_head or \
            getattr(head, "weight", None) is getattr(inputs_embed, "weight", False) else [
                name for name, m in model.named_modules() if m is head][:1]
        with _transformers_bars_off():
            source.load(model, [""], compute, exclude=[path, *deferred])
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        plan = plan_export(model, custom_mode, weight_format, pack_method, check_calibration=False)
        settings = {"custom_mode": custom_mode, "weight_format": weight_format, "pack_method": pack_method,
                    "limit": limit}
        output = StreamedOutput(dst, source, plan, run_hash(self.config.to_dict(), settings, batches, source, model,
                                                            path, compute), limit)
        store = DiskBlockStore(source, output, model, path, compute, deferred)
        spill = None
        need = self._hidden_states_bytes(model, batches)
        if budget is not None and need is not None and need > budget:
            spill = HiddenSpill(output.partial / "spill")
            logger.info("the calibration hidden states (about %.2f GB) exceed hidden_states_budget (%.2f GB): they are "
                        "kept in files under %s", need / 1e9, budget / 1e9, spill.folder)
        with torch.no_grad(), _transformers_bars_off():
            self._calibrate_blocks(model, path, layers, batches, compute, progress, store=store, spill=spill)
        set_mode(model, "quantize")
        output.finish(model, path, len(layers))
        source.close()
        logger.info("quantized %s -> %s block by block (%d blocks)", src, dst, len(layers))
        return dst

    def _hidden_states_bytes(self, model: nn.Module, batches: list) -> int | None:
        """Bytes of the hidden states the block loop carries (two streams when an algorithm needs the
        float one): tokens x hidden size x the model's element size; None when it cannot tell."""
        from quark.torch.algorithm import get_algorithm

        config = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = getattr(text, "hidden_size", None)
        if not isinstance(hidden, int):
            return None
        tokens = 0
        for batch in batches:
            ids = batch.get("input_ids") if isinstance(batch, dict) else batch
            if not isinstance(ids, torch.Tensor):
                return None
            tokens += ids.numel()
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        streams = 2 if any(get_algorithm(a.name).needs_float_stream for a in self.config.algo_config or []) else 1
        return tokens * hidden * dtype.itemsize * streams

    @staticmethod
    def freeze(model: nn.Module) -> nn.Module:
        """Replace every fake-quantized weight by its stored (packed) codes; outputs are unchanged."""
        with torch.no_grad():
            for _, q in quantized_linears(model):
                q.freeze()
            for _, m in fused_experts_modules(model):
                m.freeze()
        return model

    # -- steps -------------------------------------------------------------------------------------
    def _swap_linears(self, model: nn.Module) -> int:
        """:func:`.prepare.swap_linears` with this quantizer's config."""
        return swap_linears(model, self.config)

    def _wrap_fused_experts(self, model: nn.Module) -> int:
        """Quantize the fused 3-D expert weights of transformers-5 MoE blocks in place, per expert
        (:mod:`.fused_experts`); each projection resolves its config by the parameter's full name
        (``model.layers.0.mlp.experts.gate_up_proj``) as a linear layer would."""
        cfg = self.config
        done = 0
        for name, module, layout in find_fused_experts(model):
            if isinstance(module, QuantFusedExperts):
                continue
            configs = projection_configs(cfg, name, module, layout)
            for proj in layout.projections:
                if proj.path in configs:
                    out_f, in_f = projection_shape(module, proj)
                    check_layer_shapes(f"{name}.{proj.path}", SimpleNamespace(in_features=in_f, out_features=out_f),
                                       configs[proj.path])
            if configs:
                QuantFusedExperts.wrap(module, layout, configs)
                # weights are static: their qparams exist before any calibration pass (algorithms run
                # the blocks with them; recomputed only if the weights change)
                module.update_weight_qparams()
                done += 1
        if done:
            logger.info("quantizing %d fused-experts modules per expert", done)
        return done

    def _setup_attention(self, model: nn.Module) -> list[nn.Module]:
        """Attention modules = parents of layers whose outputs are quantized as K/V/Q."""
        if self.config.softmax_quant_spec is None:
            return []
        parents: dict[str, nn.Module] = {}
        for name, q in quantized_linears(model):
            if q.output_quantizer is not None and "." in name:
                parent_name = name.rpartition(".")[0]
                parents[parent_name] = model.get_submodule(parent_name)
        if not parents:
            raise ValueError("attention_scheme=fp8: no q/k/v layer with a quantized output was found in the model")
        return list(parents.values())

    def _decoder_layers(self, model: nn.Module) -> tuple[str, nn.ModuleList] | None:
        """The decoder stack: the algorithm configs' ``model_decoder_layers``, else the QConfig's (the
        template's path, also for configs without algorithms), else a guess preferring the stacks that
        hold quantized layers (:func:`find_decoder_layers`)."""
        algorithms = self.config.algo_config or []
        path = next((a.model_decoder_layers for a in algorithms if a.model_decoder_layers), None)
        path = path or self.config.model_decoder_layers or None
        if path and not _has_submodule(model, path):
            if algorithms:
                names = ", ".join(a.name for a in algorithms)
                raise ValueError(
                    f"model_decoder_layers={path!r} does not exist in {type(model).__name__}: algorithm(s) {names} "
                    "run block by block over the model's decoder layers; set model_decoder_layers (in the QConfig "
                    "or the algorithm config) to the path of its nn.ModuleList of blocks"
                )
            logger.info("model_decoder_layers=%r does not exist in %s: calibrating the whole model at once",
                        path, type(model).__name__)
            return None
        found = find_decoder_layers(model, path, prefer=_holds_quantized_layers)
        if found is None or len(found[1]) < 2 and path is None:
            return None
        return found

    def _calibrate_whole(self, model: nn.Module, batches: list, device: torch.device | None, progress: bool) -> None:
        _update_weight_qparams(model)
        if self.config.algo_config:
            raise ValueError(
                "algorithms run block by block and need the model's decoder layers: set model_decoder_layers "
                "in the algorithm config"
            )
        self._observe(model, lambda: [call_model(model, b, device) for b in tqdm(batches, desc="calibrate", disable=not progress)])

    @staticmethod
    def _skipped_blocks(path: str, layers: nn.ModuleList, skipped: list[int], algorithms: list[str],
                        store: BlockStore) -> None:
        """Blocks the model did not call on the calibration data (Mllama's cross-attention blocks on
        text-only batches). Their weights are quantized from the weights, as everywhere (weights are
        static). Algorithms need the blocks' inputs: they are skipped there. Static activation
        quantizers get no qparams: none can be derived from data that never reached them, and a
        made-up range (a neighbour's, a fixed scale) would be silently wrong whenever the block does
        run. They stay uncalibrated, marked with the reason: running them raises, and
        ``export_safetensors`` refuses the model. Calibrating with inputs that reach the blocks (images
        for cross-attention) or excluding their layers gives a complete model."""
        static = []
        for i in skipped:
            for name, q in layers[i].named_modules():
                if isinstance(q, TensorQuantizer) and q.needs_calibration and not q.has_qparams \
                        and not name.endswith("weight_quantizer"):
                    q.uncalibrated_reason = (
                        f"{path}.{i}.{name} is in a decoder block the model did not call on the calibration data; "
                        "calibrate with inputs that reach it (e.g. images for cross-attention blocks) or exclude "
                        "its layer"
                    )
                    static.append(f"{i}.{name}")
            with store.visiting(i, layers[i], done=True):
                _update_weight_qparams(layers[i])
        parts = ["their weights are quantized from the weights"]
        if algorithms:
            parts.append(f"{', '.join(algorithms)} skipped there (they need the blocks' inputs)")
        if static:
            parts.append(
                f"their {len(static)} static activation quantizers (e.g. {static[0]}) stay uncalibrated: using them "
                "raises and export_safetensors refuses the model; calibrate with inputs that reach these blocks "
                "(e.g. images for cross-attention blocks) or exclude their layers"
            )
        logger.warning("blocks %s of %r were not called by the model on the calibration data: %s", skipped, path,
                       "; ".join(parts))

    def _observe(self, module: nn.Module, run: Any) -> None:
        """Calibrate the static quantizers under ``module`` that have no qparams yet: they observe
        (passing their input through in float) while ``run`` feeds data, then turn into quantizers."""
        pending = [(n, q) for n, q in module.named_modules()
                   if isinstance(q, TensorQuantizer) and q.needs_calibration and not q.has_qparams]
        if not pending:
            return
        for _, q in pending:
            q.mode = "observe"
        run()
        for name, q in pending:
            q.finalize()
            q.mode = "quantize"
            if getattr(q, "unobserved", None):
                logger.info(
                    "%s: experts %s received no calibration tokens; their static activation qparams are those "
                    "of the calibrated expert with the largest scale", name, q.unobserved,
                )

    def _min_weight_bits(self) -> int | None:
        """The fewest element bits of any weight spec in the config (None when no weight is quantized)."""
        bits = [s.dtype.bits for lc in self.config.layer_configs()
                for s in (lc.weight if isinstance(lc.weight, list) else [lc.weight])
                if s is not None]
        return min(bits, default=None)

    def _calibrate_blocks(self, model: nn.Module, path: str, layers: nn.ModuleList, batches: list,
                          device: torch.device | None, progress: bool, store: BlockStore | None = None,
                          spill: HiddenSpill | None = None) -> None:
        """Calibrate the decoder stack block by block (:func:`.driver.for_each_block`), then what lies
        outside it. ``store`` decides where blocks live between their turns (default: where they are,
        moved to ``device`` for their turn); a store with a resume point (the streamed flow's) starts
        there. With ``spill`` the hidden states carried from block to block live on disk."""
        from quark.torch.algorithm import BlockContext, float_check, get_algorithm, quantizers_off
        from quark.torch.algorithm.rotation import warn_if_round_to_nearest_follows

        algorithms = [(get_algorithm(a.name), a) for a in self.config.algo_config or []]
        probe = float_check.probe_batch(batches[0]) if batches else None
        store = store if store is not None else BlockStore(device)
        for algo, algo_cfg in algorithms:
            if store.loads_blocks:  # the blocks are not loaded yet: their part of prepare_model comes with each
                store.block_preparers.append(algo.prepare_model_streamed(model, algo_cfg))
                continue
            before = float_check.float_logits(model, probe) if algo.keeps_float_function and probe is not None else None
            algo.prepare_model(model, algo_cfg)
            if before is not None:
                float_check.check_unchanged(before, float_check.float_logits(model, probe, required=True),
                                            float_check.tolerances(model), algo.name)
        warn_if_round_to_nearest_follows(algorithms, self._min_weight_bits())
        experts = fused_experts_modules(layers)
        skipping = [a.name for algo, a in algorithms if not algo.acts_on_fused_experts]
        if skipping and experts:
            logger.info(
                "%s: the %d fused-experts modules are not solved (SmoothQuant, AutoSmoothQuant and AWQ only scale "
                "them, AWQ also clips them); their weights are quantized min-max per expert unless GPTQ, GPTAQ or "
                "Qronos solves them",
                ", ".join(skipping), len(experts),
            )
        # the capture runs one block per block class for real (to learn what blocks return): in float,
        # as the blocks' static quantizers are not calibrated yet
        with quantizers_off(layers):
            # at the model's own device (where its embeddings are): the batches may be elsewhere
            inputs = capture_block_inputs(model, layers, batches, device=module_device(model), progress=progress,
                                          store=store, spill=spill)
        float_stream = any(algo.needs_float_stream for algo, _ in algorithms)
        # the float stream takes the blocks' extra inputs (BlockInputs.links) from the quantized one
        state: dict[str, Any] = {"float_hidden": list(inputs.hidden) if float_stream else None, "previous": None}
        start = 0
        resumed = store.resume_point(inputs)
        if resumed is not None:
            start, state["float_hidden"] = resumed
        if inputs.skipped:
            self._skipped_blocks(path, layers, [i for i in inputs.skipped if i >= start],
                                 [a.name for _, a in algorithms], store)

        store.float_hidden = lambda: state["float_hidden"]

        def process(index: int, block: nn.Module, block_inputs: Any) -> contextlib.ExitStack:
            if state["previous"] is not None:  # the previous block is done: drop its cached fake-quantized weights
                _drop_weight_caches(layers[state["previous"]])
            state["previous"] = index
            ctx = BlockContext(block, index, block_inputs, state["float_hidden"])
            if float_stream:  # the float model's outputs of this block, before anything changes it
                with quantizers_off(block), contextlib.ExitStack() as observers:
                    for algo, algo_cfg in algorithms:
                        observers.enter_context(algo.float_pass(ctx, algo_cfg))
                    state["float_hidden"] = run_block(block, block_inputs, index, ctx.float_hidden, carried=True)
            for algo, algo_cfg in algorithms:
                algo.apply(ctx, algo_cfg)
            _update_weight_qparams(block)
            self._observe(block, lambda: run_block(block, block_inputs, index))
            replay = contextlib.ExitStack()  # around the output pass: algorithms may replay their work
            for algo, algo_cfg in algorithms:
                replay.enter_context(algo.output_pass(ctx, algo_cfg))
            return replay

        with weight_caching():
            for_each_block(layers, inputs, process, progress=progress, store=store, start=start)
        if state["previous"] is not None:
            _drop_weight_caches(layers[state["previous"]])
        store.blocks_done()
        # quantizers outside the blocks (a non-excluded lm_head with static inputs ...): one more pass
        inside = {id(q) for q in _quantizers(layers)}
        outside = [q for q in _quantizers(model) if id(q) not in inside]
        for _, q in quantized_linears(model):
            if q.weight_quantizer is not None and id(q.weight_quantizer) not in inside:
                q.update_weight_qparams()
        for _, m in fused_experts_modules(model):
            if module_device(m) is None or module_device(m).type != "meta":  # a streamed block is on disk by now
                m.update_weight_qparams()  # a no-op for those inside the blocks (weights unchanged)
        if any(q.needs_calibration and not q.has_qparams for q in outside):
            if store.loads_blocks:  # the blocks are on disk by now: what follows them gets their outputs
                self._observe(model, lambda: run_after_blocks(model, layers, inputs, inputs.hidden, batches,
                                                              module_device(model)))
            else:
                self._observe(model, lambda: [call_model(model, b, module_device(model)) for b in batches])
