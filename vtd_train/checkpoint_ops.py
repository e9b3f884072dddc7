"""Checkpoint operations of the CPF pipeline: an untrained checkpoint, and the merge of
fine-tuned decoders into one model (paper appendix H.3: "we combine the weights of each decoder
and the rest of the network to obtain our final network weights").

``vtd model init --config FILE --out URI`` and ``vtd model merge --base URI --decoder TASK=URI ...
--out URI`` are their command lines (pipeline stages run them as Ray jobs).
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import torch

from data_pipeline import fsio
from vtd_train.checkpoint import MODEL_WEIGHTS, CheckpointError, load_model, save_model
from vtd_train.model.vtdnet import VTDNet


def init_checkpoint(config_path: str, out: str) -> str:
    """Write the model of training config ``config_path``, initialised with its seed as
    ``vtd train`` would, untrained, as a checkpoint at ``out`` (a reference point)."""
    from vtd_train.train.config import load_train_config
    from vtd_train.train.families import build_model

    cfg = load_train_config(config_path)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)  # the config's model family
    save_model(out, model, cfg.model, meta={"step": 0, "epoch": 0, "run": cfg.name, "stage": cfg.stage,
                                            "config": cfg.to_dict()})
    return out


def decoder_prefixes(model: VTDNet, task: str) -> tuple[str, ...]:
    """Module names of ``task``'s decoder in ``model`` (``box_head``, ``seg_decoders.sem``...)."""
    names = {id(m): n for n, m in model.named_modules()}
    return tuple(names[id(m)] for m in model.decoder(task))


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def merge_checkpoints(base: str, decoders: dict[str, str], out: str) -> dict[str, Any]:
    """One checkpoint: every tensor of ``base`` except each task's decoder, which comes from
    ``decoders[task]`` (a checkpoint fine-tuned from ``base`` with everything else frozen).

    Checked tensor by tensor, and a :class:`CheckpointError` names the first offender:
    each fine-tuned checkpoint has the base's architecture, its tensors outside its decoder are
    bit-identical to the base's (nothing but the decoder trained), the decoders do not overlap,
    and the written checkpoint, read back, holds exactly the tensors it was merged from.
    Returns a summary (tensors taken per task)."""
    model, cfg, meta = load_model(base)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    owner: dict[str, str] = {}
    sources: dict[str, dict[str, torch.Tensor]] = {}
    taken: dict[str, int] = {}
    for task, uri in sorted(decoders.items()):
        ft_model, ft_cfg, _ = load_model(uri)
        if dataclasses.asdict(ft_cfg) != dataclasses.asdict(cfg):
            raise CheckpointError(f"{uri}: the {task} fine-tuning checkpoint is not the same model as {base}")
        try:
            prefixes = decoder_prefixes(model, task)
        except KeyError as e:
            raise CheckpointError(f"{base}: {e.args[0]}") from None
        if not prefixes:
            raise CheckpointError(f"{uri}: task {task!r} has no decoder of its own to merge")
        sources[task] = ft_state = ft_model.state_dict()
        n = 0
        for name, tensor in ft_state.items():
            if _under(name, prefixes):
                if name in owner:
                    raise CheckpointError(f"{uri}: tensor {name} belongs to the decoders of both {owner[name]} and {task}")
                owner[name] = task
                n += 1
            elif not torch.equal(tensor, base_state[name]):
                raise CheckpointError(
                    f"{uri}: tensor {name} outside the {task} decoder differs from {base}: it was not frozen while "
                    "fine-tuning (or the checkpoint was not fine-tuned from this base)"
                )
        if n == 0:
            raise CheckpointError(f"{uri}: no tensor of the {task} decoder ({', '.join(prefixes)}) found")
        taken[task] = n

    def expected(name: str) -> torch.Tensor:
        return sources[owner[name]][name] if name in owner else base_state[name]

    model.load_state_dict({name: expected(name) for name in base_state}, strict=True)
    save_model(out, model, cfg, meta={**meta, "merged_from": {"base": base, "decoders": dict(decoders)}})
    written = torch.load(io.BytesIO(fsio.read_bytes(fsio.join(out, MODEL_WEIGHTS))), map_location="cpu", weights_only=True)
    if set(written) != set(base_state):
        raise CheckpointError(f"{out}: the merged checkpoint's tensors are not the base's")
    for name, tensor in written.items():
        if not torch.equal(tensor, expected(name)):
            raise CheckpointError(f"{out}: merged tensor {name} does not match its source after writing")
    return {"base": base, "decoders": dict(decoders), "tensors_from_decoders": taken, "tensors": len(written)}
