"""The expert bank: a frozen base model carrying a growing list of LoRA experts.

An :class:`ExpertBank` wraps a model once (replacing the target modules with
:class:`~moe_lora.layers.LoRALayer`) and then grows: ``add_expert``, ``freeze``, ``remove_expert``.
Experts are addressed by name; their bank index (the position used in routing tensors) is
``bank.index(name)``. Every forward reads the routing set with ``bank.use(...)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moe_lora.core.config import ExpertConfig
from moe_lora.core.io import CorruptFileError, sha256_bytes
from moe_lora.core.layers import LoRALayer, RoutingContext
from moe_lora.core.routing import Routing
from moe_lora.core.storage import read_bank_tensors, read_manifest, write_bank
from moe_lora.core.targets import resolve_targets

__all__ = ["ExpertBank", "ExpertInfo"]


@dataclass
class ExpertInfo:
    """Metadata of one expert (saved in the bank's manifest).

    Attributes:
        name: unique name in the bank.
        config: the expert's hyper-parameters.
        task: the task it was trained for (any JSON scalar), if any.
        created: ISO-8601 UTC creation time.
        trained_steps: optimiser steps taken while the expert was trainable.
        trainable: whether it currently receives gradients.
        meta: free-form JSON metadata.
    """

    name: str
    config: ExpertConfig
    task: Any = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    trained_steps: int = 0
    trainable: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["config"] = asdict(self.config)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ExpertInfo:
        """Inverse of :meth:`to_json`."""
        d = dict(d)
        d["config"] = ExpertConfig(**d["config"])
        return cls(**d)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


class ExpertBank(nn.Module):
    """A frozen base model with LoRA experts injected into its ``targets``.

    Args:
        model: any ``nn.Module``; its parameters are frozen. It is modified in place.
        targets: which modules get experts (see :mod:`moe_lora.core.targets`).
        base_id: a name for the base model, recorded in saved banks (e.g. ``"minilm"``).

    Raises:
        ValueError: ``targets`` select nothing or an unsupported module (lists what exists).
    """

    def __init__(
        self, model: nn.Module, targets: str | Sequence[str] = "auto", base_id: str | None = None
    ):
        super().__init__()
        if any(isinstance(m, LoRALayer) for m in model.modules()):
            raise ValueError("model already carries LoRA layers; wrap the original model once")
        self.model = model
        model.requires_grad_(False)
        self.base_id = base_id or type(model).__name__
        self.ctx = RoutingContext()
        self.layers: dict[str, LoRALayer] = {}
        for path in resolve_targets(model, targets):
            layer = LoRALayer(model.get_submodule(path), self.ctx, path)
            _set_submodule(model, path, layer)
            self.layers[path] = layer
        self._experts: list[ExpertInfo] = []
        self._positions: dict[str, int] = {}  # name -> bank index, rebuilt on every change
        self._merged: dict[str, float] | None = None

    # ------------------------------------------------------------------ experts
    @property
    def names(self) -> list[str]:
        """Expert names in bank order (index i is routing column i)."""
        return [e.name for e in self._experts]

    def __len__(self) -> int:
        return len(self._experts)

    def __contains__(self, name: object) -> bool:
        return name in self._positions

    def index(self, name: str) -> int:
        """Bank index of expert ``name``.

        Raises:
            KeyError: no such expert (the message lists the names).
        """
        i = self._positions.get(name)
        if i is None:
            raise KeyError(f"no expert named {name!r}; the bank has {self.names}")
        return i

    def info(self, name: str) -> ExpertInfo:
        """Metadata of expert ``name``."""
        return self._experts[self.index(name)]

    @property
    def experts(self) -> list[ExpertInfo]:
        """Metadata of all experts in bank order (a copy of the list)."""
        return list(self._experts)

    def add_expert(
        self,
        name: str,
        config: ExpertConfig | None = None,
        *,
        task: Any = None,
        trainable: bool = True,
        meta: dict[str, Any] | None = None,
    ) -> int:
        """Add an expert to every LoRA layer and return its bank index.

        Raises:
            ValueError: the name is taken or invalid.
        """
        if not name or "/" in name or name != name.strip():
            raise ValueError(f"expert name must be non-empty, without '/' or edge spaces: {name!r}")
        if name in self._positions:
            raise ValueError(f"an expert named {name!r} already exists")
        self._refuse_if_merged("add_expert")
        cfg = config or ExpertConfig()
        for layer in self.layers.values():
            layer.add(cfg).requires_grad_(trainable)
        self._experts.append(
            ExpertInfo(name=name, config=cfg, task=task, trainable=trainable, meta=dict(meta or {}))
        )
        self._changed()
        return len(self._experts) - 1

    def remove_expert(self, name: str) -> None:
        """Remove expert ``name``; the indices of later experts shift down by one."""
        self._refuse_if_merged("remove_expert")
        i = self.index(name)
        for layer in self.layers.values():
            layer.remove(i)
        del self._experts[i]
        self._changed()

    def freeze(self, name: str | None = None) -> None:
        """Stop gradients to expert ``name`` (all experts when None)."""
        self._set_trainable(name, False)

    def unfreeze(self, name: str) -> None:
        """Let expert ``name`` receive gradients again."""
        self._set_trainable(name, True)

    def _set_trainable(self, name: str | None, flag: bool) -> None:
        ids = range(len(self)) if name is None else [self.index(name)]
        for i in ids:
            for layer in self.layers.values():
                layer.experts[i].requires_grad_(flag)
            self._experts[i].trainable = flag
        self._changed()

    def _changed(self) -> None:
        self.ctx.version += 1
        self._positions = {e.name: i for i, e in enumerate(self._experts)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive gradients: trainable experts' factors and attached gates."""
        return [p for layer in self.layers.values() for p in layer.parameters() if p.requires_grad]

    def expert_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """Expert ``name``'s factors keyed ``"<layer path>.lora_A"`` / ``".lora_B"``."""
        i = self.index(name)
        out: dict[str, nn.Parameter] = {}
        for path, layer in self.layers.items():
            f = layer.experts[i]
            out[f"{path}.lora_A"], out[f"{path}.lora_B"] = f.lora_A, f.lora_B
        return out

    def expert_state(self, name: str) -> dict[str, Tensor]:
        """Detached copies of :meth:`expert_parameters`."""
        return {k: v.detach().clone() for k, v in self.expert_parameters(name).items()}

    @torch.no_grad()
    def set_expert_state(self, name: str, tensors: Mapping[str, Tensor]) -> None:
        """Copy ``tensors`` (as from :meth:`expert_state`) into expert ``name``.

        Raises:
            ValueError: a key is missing or unexpected, or a shape differs (names the key).
        """
        params = self.expert_parameters(name)
        missing, extra = set(params) - set(tensors), set(tensors) - set(params)
        if missing or extra:
            raise ValueError(
                f"expert {name!r}: state keys differ; missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(extra)[:3]}"
            )
        for key, p in params.items():
            t = tensors[key]
            if t.shape != p.shape:
                raise ValueError(
                    f"expert {name!r}: {key} has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
                )
            p.copy_(t.to(p.dtype))
        self._changed()

    # ------------------------------------------------------------------ routing
    def _check(self, routing: Routing) -> Routing:
        n = len(self)
        if routing.kind in ("base", "gated"):
            return routing
        if self._merged is not None:
            raise RuntimeError("the bank is merged; call unmerge() before routing to experts")
        if routing.kind == "single":
            if not 0 <= int(routing.expert or 0) < n:
                raise IndexError(f"expert index {routing.expert} out of range for {n} experts")
        elif routing.kind == "dense":
            assert routing.weights is not None
            if routing.weights.shape[-1] != n:
                raise ValueError(
                    f"dense routing weights have {routing.weights.shape[-1]} columns, "
                    f"the bank has {n} experts"
                )
        else:
            assert routing.indices is not None
            if routing.indices.numel() and int(routing.indices.max()) >= n:
                raise IndexError(
                    f"routing index {int(routing.indices.max())} out of range for {n} experts"
                )
        return routing

    def as_routing(self, spec: Routing | str | int | None) -> Routing:
        """Normalise a routing spec: a :class:`Routing`, an expert name or index, or None (base)."""
        if spec is None:
            return Routing.base()
        if isinstance(spec, str):
            return Routing.single(self.index(spec))
        if isinstance(spec, int):
            return Routing.single(spec)
        return spec

    @contextlib.contextmanager
    def use(self, routing: Routing | str | int | None) -> Iterator[ExpertBank]:
        """Route the forwards inside the ``with`` block by ``routing``; restores the previous one."""
        previous = self.ctx.routing
        self.ctx.routing = self._check(self.as_routing(routing))
        try:
            yield self
        finally:
            self.ctx.routing = previous

    def set_routing(self, routing: Routing | str | int | None) -> None:
        """Set the routing for subsequent forwards (prefer :meth:`use`)."""
        self.ctx.routing = self._check(self.as_routing(routing))

    @property
    def routing(self) -> Routing:
        """The routing currently applied."""
        return self.ctx.routing

    def forward(self, *args: Any, routing: Routing | str | int | None = None, **kwargs: Any) -> Any:
        """Run the wrapped model, under ``routing`` when given (else the current routing)."""
        if routing is None:
            return self.model(*args, **kwargs)
        with self.use(routing):
            return self.model(*args, **kwargs)

    # ------------------------------------------------------------------ gates
    def attach_gates(self, factory: Any) -> None:
        """Give every LoRA layer a gate: ``factory(path, layer) -> nn.Module`` (a LayerGate).

        Gates act under ``Routing.gated()``; their parameters are trainable.
        """
        for path, layer in self.layers.items():
            layer.gate = factory(path, layer)

    def detach_gates(self) -> None:
        """Remove all layer gates."""
        for layer in self.layers.values():
            layer.gate = None

    def pop_aux_loss(self) -> Tensor:
        """Mean auxiliary loss over the gated layers since the last pop (0 when none)."""
        losses, self.ctx.aux_losses = self.ctx.aux_losses, []
        if not losses:
            return torch.zeros(())
        return torch.stack([loss.reshape(()) for loss in losses]).mean()

    # ------------------------------------------------------------------ merge
    def merge(self, weights: Mapping[str, float] | str) -> None:
        """Fold ``sum_e w_e * s_e B_e A_e`` into the base weights (``weights``: name -> weight).

        After merging, plain forwards (routing ``base``) include the experts at no extra cost.
        """
        if self._merged is not None:
            raise RuntimeError("already merged; call unmerge() first")
        w = {weights: 1.0} if isinstance(weights, str) else dict(weights)
        by_index = {self.index(n): float(v) for n, v in w.items()}
        for layer in self.layers.values():
            layer.merge(by_index)
        self._merged = w

    def unmerge(self) -> None:
        """Undo :meth:`merge` (no-op when nothing is merged)."""
        for layer in self.layers.values():
            layer.unmerge()
        self._merged = None

    @property
    def merged(self) -> dict[str, float] | None:
        """The merged combination, or None."""
        return None if self._merged is None else dict(self._merged)

    def _refuse_if_merged(self, what: str) -> None:
        if self._merged is not None:
            raise RuntimeError(f"cannot {what} while merged; call unmerge() first")

    def clear_cache(self) -> None:
        """Free every layer's cached frozen stack."""
        for layer in self.layers.values():
            layer.clear_cache()

    # ------------------------------------------------------------------ storage
    def base_fingerprint(self) -> str:
        """SHA-256 over the first two target layers' base weights (identifies the pretrained base)."""
        parts = []
        for layer in list(self.layers.values())[:2]:
            w = layer.base.weight.detach().to("cpu", torch.float32).contiguous()
            parts.append(w.numpy().tobytes())
        return sha256_bytes(b"".join(parts))

    def save(self, path: str | Path, names: Sequence[str] | None = None) -> Path:
        """Save experts (all, or ``names``) to folder ``path``; see :mod:`moe_lora.core.storage`.

        Raises:
            RuntimeError: the bank is merged (the base weights would not identify the base model).
        """
        self._refuse_if_merged("save")
        chosen = list(self.names if names is None else names)
        tensors: dict[str, Tensor] = {}
        for name in chosen:
            for key, t in self.expert_parameters(name).items():
                layer_path, _, which = key.rpartition(".")
                tensors[f"{name}/{layer_path}/{which}"] = t
        manifest = {
            "base": {"id": self.base_id, "class": type(self.model).__name__,
                     "fingerprint": self.base_fingerprint()},
            "layers": {p: {"in": la.in_features, "out": la.out_features}
                       for p, la in self.layers.items()},
            "experts": [self.info(n).to_json() for n in chosen],
        }
        return write_bank(Path(path), manifest, tensors)

    def save_expert(self, name: str, path: str | Path) -> Path:
        """Save one expert to folder ``path`` (the bank format with a single expert)."""
        return self.save(path, [name])

    def _check_saved_base(self, manifest: dict[str, Any], folder: Path, strict: bool) -> None:
        saved = manifest["layers"]
        if set(saved) != set(self.layers):
            raise ValueError(
                f"{folder}: saved for layers {sorted(saved)[:3]}... ({len(saved)}), but this bank "
                f"wraps {sorted(self.layers)[:3]}... ({len(self.layers)})"
            )
        for p, shape in saved.items():
            layer = self.layers[p]
            if (shape["in"], shape["out"]) != (layer.in_features, layer.out_features):
                raise ValueError(
                    f"{folder}: layer {p} was [in={shape['in']}, out={shape['out']}] when saved, "
                    f"the model has [in={layer.in_features}, out={layer.out_features}]"
                )
        base = manifest["base"]
        if strict and base["fingerprint"] != self.base_fingerprint():
            raise ValueError(
                f"{folder}: saved for base model {base['id']!r} ({base['class']}), whose weights "
                f"differ from this model's; pass strict_base=False to load anyway"
            )

    def load_experts(
        self, path: str | Path, names: Sequence[str] | None = None, *, strict_base: bool = True
    ) -> list[int]:
        """Add the experts saved in folder ``path`` (all, or ``names``); returns their indices.

        Raises:
            FileNotFoundError / CorruptFileError: missing, truncated or modified files.
            ValueError: base model, layer or tensor shapes disagree; a name is missing or taken.
        """
        folder = Path(path)
        manifest = read_manifest(folder)
        self._check_saved_base(manifest, folder, strict_base)
        infos = [ExpertInfo.from_json(d) for d in manifest["experts"]]
        available = [i.name for i in infos]
        wanted = available if names is None else list(names)
        for n in wanted:
            if n not in available:
                raise ValueError(f"{folder}: no expert {n!r}; it holds {available}")
        tensors = read_bank_tensors(folder, manifest)
        return [self._add_saved(info, tensors, folder) for info in infos if info.name in wanted]

    def _add_saved(self, info: ExpertInfo, tensors: dict[str, Tensor], folder: Path) -> int:
        idx = self.add_expert(info.name, info.config, task=info.task, trainable=info.trainable,
                              meta=info.meta)
        state = {}
        for layer_path in self.layers:
            for which in ("lora_A", "lora_B"):
                key = f"{info.name}/{layer_path}/{which}"
                if key not in tensors:
                    self.remove_expert(info.name)
                    raise CorruptFileError(f"{folder}: tensor {key!r} missing from the bank file")
                state[f"{layer_path}.{which}"] = tensors[key]
        try:
            self.set_expert_state(info.name, state)
        except ValueError:
            self.remove_expert(info.name)
            raise
        saved = self.info(info.name)
        saved.created, saved.trained_steps = info.created, info.trained_steps
        return idx

    def load_expert(self, path: str | Path, name: str | None = None) -> int:
        """Add one saved expert (the folder's only one, or ``name``); returns its index."""
        ids = self.load_experts(path, None if name is None else [name])
        if len(ids) != 1:
            raise ValueError(f"{path}: holds {len(ids)} experts; pass name= to pick one")
        return ids[0]

    @classmethod
    def load(
        cls, path: str | Path, model: nn.Module, *, strict_base: bool = True
    ) -> ExpertBank:
        """Wrap ``model`` with the targets saved in ``path`` and load all its experts.

        Raises:
            ValueError: the base model differs from the one the bank was saved with.
            moe_lora.io.CorruptFileError: a file is truncated, modified or unparsable.
        """
        manifest = read_manifest(path)
        bank = cls(model, targets=list(manifest["layers"]), base_id=manifest["base"]["id"])
        bank.load_experts(path, strict_base=strict_base)
        return bank
